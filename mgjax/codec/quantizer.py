"""Residual vector quantizer: encode = nearest codeword on the running residual, decode = sum of codewords."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mgjax.config import CodecConfig


def nearest_codeword(x_NxD: jax.Array, codebook_CxD: jax.Array) -> jax.Array:
    """Index of the codeword closest in Euclidean distance, `[N, D] x [C, D] -> [N]` int32.

    Computed as the reference does (`|x|^2 - 2 x.e + |e|^2`), so near-ties break the same way.
    """
    distance = (jnp.sum(x_NxD ** 2, axis=-1, keepdims=True) - 2.0 * x_NxD @ codebook_CxD.T
                + jnp.sum(codebook_CxD ** 2, axis=-1)[None, :])
    return jnp.argmax(-distance, axis=-1).astype(jnp.int32)


class ResidualVQ(nn.Module):
    """Codebooks `[n_q, card, dim]`; `encode` `[B, T, D] -> [B, K, T]`, `decode` `[B, K, T] -> [B, T, D]`."""

    config: CodecConfig

    def setup(self):
        cfg = self.config
        self.codebooks = self.param(
            "codebooks", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("codebooks", "vocab", "embed")),
            (cfg.n_q, cfg.codebook_size, cfg.effective_codebook_dim))

    def encode(self, z_BxTxD: jax.Array) -> jax.Array:
        batch, frames, dim = z_BxTxD.shape

        def quantize_one(residual_NxD, codebook_CxD):
            codes_N = nearest_codeword(residual_NxD, codebook_CxD)
            return residual_NxD - codebook_CxD[codes_N], codes_N

        _, codes_KxN = jax.lax.scan(quantize_one, z_BxTxD.reshape(batch * frames, dim).astype(jnp.float32),
                                    self.codebooks.astype(jnp.float32))
        return jnp.transpose(codes_KxN.reshape(-1, batch, frames), (1, 0, 2))

    def decode(self, codes_BxKxT: jax.Array) -> jax.Array:
        num_codebooks = codes_BxKxT.shape[1]
        picked_BxKxTxD = jax.vmap(lambda book, idx: book[idx], in_axes=(0, 1), out_axes=1)(
            self.codebooks[:num_codebooks], codes_BxKxT)
        return jnp.sum(picked_BxKxTxD, axis=1)
