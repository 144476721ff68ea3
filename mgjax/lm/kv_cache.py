"""The decoder's KV cache: one structure, its two layouts and its logical axes.

Stacked (what `MusicGenLM.prefill` returns and the scanned layers carry; every backend):
    {'index':      int32 []                   the next write position (prefix + code columns written so far),
     'k', 'v':     [L, B, S, H*Dh]            self-attention keys/values, the heads folded into the last axis,
     'cross_k', 'cross_v': [L, B, Lc, H, Dh]  cross-attention keys/values of the condition (cross only),
     'cross_mask': [B, Lc] bool               which condition positions are real (cross only)}
with S = prefix + max_length (prefix: the prepend models' condition positions, 0 for cross). The code column t
sits at cache position prefix + t.

Why the heads are folded: a TPU tiles the two minor axes of an array to (8, 128); a minor axis of Dh = 64 (every
MusicGen size) is padded to 128 lanes, which doubled the `[L, B, H, S, Dh]` cache in XLA:TPU's compiled layouts.
H*Dh (1024, 1536, 2048) is a multiple of 128. The cross entries keep `[.., H, Dh]`: Lc is a few dozen positions.

Per-layer (`kernels.cpu.split_for_decoding`, the CPU's decoding layout): the same keys with 'k', 'v' each a
tuple of L arrays `[B, H, S, Dh]` (each head's keys contiguous, nothing transposed per step on XLA:CPU) and
'cross_k', 'cross_v' tuples of L arrays `[B, Lc, H, Dh]`.

`CACHE_AXES` names each stacked entry's logical axes (`mgjax.sharding.LOGICAL_RULES` maps them: batch over
data/fsdp, the folded heads over tensor, which splits whole heads since the heads axis is the major part).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from mgjax.sharding import constrain

Array = jax.Array

CACHE_AXES = {
    "index": (),
    "k": ("cache_layers", "cache_batch", "cache_length", "cache_heads"),
    "v": ("cache_layers", "cache_batch", "cache_length", "cache_heads"),
    "cross_k": ("cache_layers", "cache_batch", "cache_length", "cache_heads", "cache_kv"),
    "cross_v": ("cache_layers", "cache_batch", "cache_length", "cache_heads", "cache_kv"),
    "cross_mask": ("cache_batch", "cache_length"),
}


def empty_self_attention(num_layers: int, batch: int, length: int, num_heads: int, head_dim: int,
                         dtype) -> dict[str, Array]:
    """`{'k', 'v': zeros [L, B, S, H*Dh]}`, constrained to `CACHE_AXES`."""
    empty = constrain(jnp.zeros((num_layers, batch, length, num_heads * head_dim), dtype), CACHE_AXES["k"])
    return {"k": empty, "v": empty}


def constrain_cross(cross: dict[str, Array]) -> dict[str, Array]:
    """`{'k', 'v': [L, B, Lc, H, Dh]}` constrained to `CACHE_AXES`."""
    return {name: constrain(value, CACHE_AXES["cross_k"]) for name, value in cross.items()}


def write_stacked(cache: Array, new: Array, layer: Array, index: Array | int) -> Array:
    """new keys or values `[B, T, H, Dh]` written into the stacked `[L, B, S, H*Dh]` at `[layer, :, index:index+T]`."""
    batch, length, heads, head_dim = new.shape
    folded = new.reshape(1, batch, length, heads * head_dim).astype(cache.dtype)
    return lax.dynamic_update_slice(cache, folded, (layer, 0, index, 0))


def read_stacked(cache: Array, layer: Array, num_heads: int) -> Array:
    """The layer's keys or values of the stacked `[L, B, S, H*Dh]` -> `[B, S, H, Dh]`."""
    own = lax.dynamic_index_in_dim(cache, layer, keepdims=False)
    return own.reshape(own.shape[:2] + (num_heads, own.shape[-1] // num_heads))


def write_own(cache: Array, new: Array, index: Array | int) -> Array:
    """new keys or values `[B, T, H, Dh]` written into one layer's own `[B, H, S, Dh]` at `[:, :, index:index+T]`."""
    return lax.dynamic_update_slice(cache, jnp.swapaxes(new, 1, 2).astype(cache.dtype), (0, 0, index, 0))


def split_by_layer(cache: dict, num_heads: int) -> dict:
    """A stacked cache -> the per-layer layout (see the module docstring): one copy of the self-attention cache,
    made once before a decoding loop."""
    num_layers = cache["k"].shape[0]

    def heads_first(folded: Array) -> Array:  # [B, S, H*Dh] -> [B, H, S, Dh]
        batch, length, width = folded.shape
        return folded.reshape(batch, length, num_heads, width // num_heads).transpose(0, 2, 1, 3)

    per_layer = {name: tuple(heads_first(cache[name][i]) for i in range(num_layers)) for name in ("k", "v")}
    per_layer.update({name: tuple(cache[name][i] for i in range(num_layers))
                      for name in ("cross_k", "cross_v") if name in cache})
    return dict(cache, **per_layer)


def stack_layers(cache: dict) -> dict:
    """The per-layer layout back to the stacked one (`split_by_layer`'s inverse)."""
    def folded(heads_first: Array) -> Array:  # [B, H, S, Dh] -> [B, S, H*Dh]
        batch, heads, length, head_dim = heads_first.shape
        return heads_first.transpose(0, 2, 1, 3).reshape(batch, length, heads * head_dim)

    stacked = {name: jnp.stack([folded(layer) for layer in cache[name]]) for name in ("k", "v")}
    stacked.update({name: jnp.stack(cache[name]) for name in ("cross_k", "cross_v") if name in cache})
    return dict(cache, **stacked)
