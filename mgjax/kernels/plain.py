"""The plain formulations (`lm.kernels='plain'`, the default off the CPU): einsums and autodiff, which XLA on
TPU/GPU fuses and shards well and remat policies see through. `mgjax.kernels.cpu` has the same interface.

Shapes: B batch, T positions, D model width, F feed-forward width, K codebooks.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mgjax.lm.remat import tag
from mgjax.sharding import constrain

Array = jax.Array


def einsum(spec: str, x: Array, weight: Array) -> Array:
    """`jnp.einsum(spec, x, weight)`: a projection of x by a float weight."""
    return jnp.einsum(spec, x, weight)


def gelu_mlp(x: Array, fc1: Array, fc2: Array) -> Array:
    """`gelu(x @ fc1) @ fc2` (exact erf GELU): x `[B, T, D]`, fc1 `[D, F]`, fc2 `[F, D]` -> `[B, T, D]`; the hidden
    `[B, T, F]` is sharded on F by the `activation_mlp` rule and tagged "mlp_hidden" for remat policies."""
    hidden = tag(constrain(x @ fc1, ("activation_batch", "activation_length", "activation_mlp")), "mlp_hidden")
    return jax.nn.gelu(hidden, approximate=False) @ fc2


def codebook_heads(x: Array, kernel: Array) -> Array:
    """x `[B, T, D]`, kernel `[K, D, card]` -> logits `[B, K, T, card]` float32."""
    return jnp.einsum("btd,kdc->bktc", x, kernel, preferred_element_type=jnp.float32)


def split_layers_by_default(lm_params) -> bool:
    """Decoding scans the stacked layer weights in place: no per-layer copy in accelerator memory."""
    del lm_params
    return False
