"""EnCodec: SEANet encoder -> residual VQ -> SEANet decoder, and the `Codec` facade (`[B, C, N]` in and out)."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mgjax import checkpoint
from mgjax.codec.quantizer import ResidualVQ
from mgjax.codec.seanet import SEANetDecoder, SEANetEncoder
from mgjax.config import CodecConfig
from mgjax.runtime import jit_once


class EncodecModel(nn.Module):
    """Channels-last EnCodec. `encode`: `[B, N, C] -> [B, K, T]`; `decode`: `[B, K, T] -> [B, T*hop, C]`."""

    config: CodecConfig

    def setup(self):
        self.encoder = SEANetEncoder(self.config)
        self.decoder = SEANetDecoder(self.config)
        self.quantizer = ResidualVQ(self.config)

    def __call__(self, wav_BxNxC: jax.Array) -> jax.Array:
        """Round trip (used for initialisation): `[B, N, C] -> [B, T*hop, C]`."""
        return self.decode(self.encode(wav_BxNxC))

    def embed(self, wav_BxNxC: jax.Array) -> jax.Array:
        """Encoder latents before quantisation, `[B, N, C] -> [B, T, D]`."""
        return self.encoder(wav_BxNxC)

    def encode(self, wav_BxNxC: jax.Array) -> jax.Array:
        return self.quantizer.encode(self.encoder(wav_BxNxC))

    def decode(self, codes_BxKxT: jax.Array) -> jax.Array:
        return self.decoder(self.quantizer.decode(codes_BxKxT))


def init_codec_params(config: CodecConfig, seed: int = 0) -> dict:
    """Random codec params (unboxed), e.g. for benchmarks or training from scratch; traceable (called inside the
    codec trainer's jitted init)."""
    model = EncodecModel(config)
    wav = jnp.zeros((1, config.hop_length * 2, config.channels), jnp.float32)
    return nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed), wav)["params"])


@functools.partial(jax.jit, static_argnums=0)
def _encode(config: CodecConfig, params, wav_BxNxC):
    return EncodecModel(config).apply({"params": params}, wav_BxNxC, method=EncodecModel.encode)


@functools.partial(jax.jit, static_argnums=0)
def _decode(config: CodecConfig, params, codes_BxKxT):
    return EncodecModel(config).apply({"params": params}, codes_BxKxT, method=EncodecModel.decode)


@functools.partial(jax.jit, static_argnums=0)
def _embed(config: CodecConfig, params, wav_BxNxC):
    return EncodecModel(config).apply({"params": params}, wav_BxNxC, method=EncodecModel.embed)


class Codec:
    """A loaded EnCodec. `encode`: float32 `[B, C, N]` at `sample_rate` -> int32 `[B, K, T]`, T = ceil(N / hop);
    `decode`: int32 `[B, K, T]` -> float32 `[B, C, T * hop]`."""

    def __init__(self, config: CodecConfig, params):
        config.validate()
        self.config = config
        self.params = params

    @classmethod
    def load(cls, directory: str) -> "Codec":
        """A codec from a converted checkpoint directory (a codec alone or a whole MusicGen)."""
        config = checkpoint.load_codec_config(directory)
        abstract = jax.eval_shape(lambda: init_codec_params(config))
        return cls(config, checkpoint.restore_params(directory, {"codec": abstract})["codec"])

    @classmethod
    def from_config(cls, config: CodecConfig, seed: int = 0) -> "Codec":
        return cls(config, jit_once(lambda: init_codec_params(config, seed))())

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def frame_rate(self) -> float:
        return self.config.frame_rate

    @property
    def num_codebooks(self) -> int:
        return self.config.n_q

    def _check_wav(self, wav) -> jax.Array:
        wav = jnp.asarray(wav)
        if wav.ndim != 3:
            raise ValueError(f"wav must be [batch, channels, samples] (rank 3), got shape {tuple(wav.shape)}; "
                             f"add missing axes, e.g. wav[None, None] for a mono clip")
        if wav.shape[1] != self.config.channels:
            raise ValueError(f"wav has {wav.shape[1]} channels but the codec expects {self.config.channels}; "
                             f"mix down or duplicate channels first (shape is [batch, channels, samples])")
        if wav.shape[2] < 1:
            raise ValueError("wav has no samples")
        if not jnp.issubdtype(wav.dtype, jnp.floating):
            raise ValueError(f"wav must be floating point in [-1, 1], got dtype {wav.dtype}")
        return wav.astype(jnp.float32)

    def _check_codes(self, codes) -> jax.Array:
        codes = np.asarray(codes)
        if codes.ndim != 3:
            raise ValueError(f"codes must be [batch, codebooks, frames] (rank 3), got shape {codes.shape}")
        if codes.shape[1] != self.config.n_q:
            raise ValueError(f"codes have {codes.shape[1]} codebooks but the codec has {self.config.n_q}")
        if not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.config.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.config.codebook_size}), "
                             f"got values in [{codes.min()}, {codes.max()}]")
        return jnp.asarray(codes, jnp.int32)

    def embed(self, wav_BxCxN) -> jax.Array:
        """Encoder latents `[B, D, T]` (before quantisation), as transformers' `encoder(...)` returns them."""
        z_BxTxD = _embed(self.config, self.params, jnp.transpose(self._check_wav(wav_BxCxN), (0, 2, 1)))
        return jnp.transpose(z_BxTxD, (0, 2, 1))

    def encode(self, wav_BxCxN) -> jax.Array:
        return _encode(self.config, self.params, jnp.transpose(self._check_wav(wav_BxCxN), (0, 2, 1)))

    def decode(self, codes_BxKxT) -> jax.Array:
        wav_BxNxC = _decode(self.config, self.params, self._check_codes(codes_BxKxT))
        return jnp.transpose(wav_BxNxC, (0, 2, 1))
