"""Formulations that exist because XLA:CPU is slow at the plain ones (`lm.kernels='cpu'`, the CPU default).

Each computes what its plain counterpart in `mgjax.kernels.plain` computes (tests/test_kernels_cpu.py checks the
logits, gradients and sampled tokens both ways); only the program XLA:CPU gets differs. Same interface as `plain`:
`einsum`, `gelu_mlp`, `codebook_heads`, `split_layers_by_default`; plus the per-layer decoding layout
(`split_for_decoding`, `decode_layers_one_by_one`) that `split_layers_by_default` turns on.

Shapes: N rows, B batch, T positions, D model width, F feed-forward width, K codebooks, L layers.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax

from mgjax.lm.kv_cache import split_by_layer

Array = jax.Array


# --- matmuls ------------------------------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rows_matmul(x: Array, w: Array, out_dtype=None) -> Array:
    """x `[N, I]` @ w `[I, O]` -> `[N, O]` (in `out_dtype`, by default x's), with a backward that XLA:CPU runs as
    plain row-major products.

    The weight gradient `x.T @ g` contracts over the rows. Left to autodiff, XLA:CPU either folds the transpose into
    the product (Eigen's path, ~30 % slower than YNNPACK's) or fuses it into whatever produced g (a layer-norm
    backward written with strided stores, ~20x slower than a plain transpose). Here the transpose reads x, a saved
    forward activation, so it is a plain copy; the barrier keeps XLA from folding it back into the product."""
    return jnp.matmul(x, w, preferred_element_type=out_dtype)


def _rows_matmul_fwd(x, w, out_dtype):
    return rows_matmul(x, w, out_dtype), (x, w)


def _rows_matmul_bwd(out_dtype, residuals, g):
    x, w = residuals
    g = g.astype(x.dtype)
    return g @ w.T, (lax.optimization_barrier(x.T) @ g).astype(w.dtype)


rows_matmul.defvjp(_rows_matmul_fwd, _rows_matmul_bwd)


def einsum(spec: str, x: Array, weight: Array) -> Array:
    """`jnp.einsum(spec, x, weight)`; as one `rows_matmul` when the spec is a matmul over flattened axes: x's
    contracted axes trailing, the weight's leading (in the same order), output = x's batch axes + the weight's rest
    (e.g. "btd,dhk->bthk", "bthk,hkd->btd")."""
    inputs, out = spec.split("->")
    x_letters, w_letters = inputs.split(",")
    contracted = "".join(letter for letter in x_letters if letter not in out)
    batch, kept = x_letters[:len(x_letters) - len(contracted)], w_letters[len(contracted):]
    if not (contracted and x_letters.endswith(contracted) and w_letters.startswith(contracted) and out == batch + kept):
        return jnp.einsum(spec, x, weight)
    inner = math.prod(weight.shape[:len(contracted)])
    y = rows_matmul(x.reshape(-1, inner), weight.reshape(inner, -1))
    return y.reshape(x.shape[:len(batch)] + weight.shape[len(contracted):])


# --- feed-forward -------------------------------------------------------------------------------------------------
_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@jax.custom_vjp
def gelu_mlp(x: Array, fc1: Array, fc2: Array) -> Array:
    """`gelu(x @ fc1) @ fc2` (exact erf GELU): x `[..., D]`, fc1 `[D, F]`, fc2 `[F, D]` -> `[..., D]`.

    Its backward is written out (the same math as autodiff) so that GELU's derivative is one elementwise pass over
    `[..., F]` in the activations' own layout; XLA:CPU otherwise fused it into a transposing copy that cost as much
    as a matmul per layer."""
    return jax.nn.gelu(x @ fc1, approximate=False) @ fc2


def _gelu_mlp_fwd(x, fc1, fc2):
    h = x @ fc1
    return jax.nn.gelu(h, approximate=False) @ fc2, (x, fc1, fc2, h)


def _rows(a: Array) -> Array:
    """`[..., C]` -> `[N, C]`."""
    return a.reshape(-1, a.shape[-1])


def _gelu_mlp_bwd(residuals, dy):
    x, fc1, fc2, h = residuals
    cdf = 0.5 * (1.0 + lax.erf(h * _SQRT_HALF))
    activation = h * cdf
    dh = (dy @ fc2.T) * (cdf + h * jnp.exp(-0.5 * h * h) * _INV_SQRT_2PI)
    # The weight gradients contract over the rows. Transposing the narrow [N, D] operands (x, dy), not the wide
    # [N, F] ones, keeps the copies 4x smaller; the barriers keep XLA from folding the transposes back into the
    # products (its slower Eigen path) and make the [D, F] -> [F, D] transpose a copy of the small result.
    rows_x, rows_dy = lax.optimization_barrier((_rows(x).T, _rows(dy).T))  # [D, N]
    d_fc1 = rows_x @ _rows(dh)  # [D, F]
    d_fc2 = lax.optimization_barrier(rows_dy @ _rows(activation)).T  # [F, D]
    return dh @ fc1.T, d_fc1.astype(fc1.dtype), d_fc2.astype(fc2.dtype)


gelu_mlp.defvjp(_gelu_mlp_fwd, _gelu_mlp_bwd)


# --- codebook heads -----------------------------------------------------------------------------------------------
def codebook_heads(x: Array, kernel: Array) -> Array:
    """x `[B, T, D]`, kernel `[K, D, card]` -> logits `[B, K, T, card]` float32: `heads_one_position` for a
    decoding step (T = 1), else `heads_as_one_matmul`."""
    if x.shape[1] == 1:
        return heads_one_position(x, kernel)
    return heads_as_one_matmul(x, kernel)


def heads_one_position(x: Array, kernel: Array) -> Array:
    """x `[B, 1, D]`, kernel `[K, D, card]` -> logits `[B, K, 1, card]` float32, as K matrix-vector products batched
    over the codebook axis, each reading its `[D, card]` slice of the kernel in place.

    Why not the einsum "btd,kdc->bktc": XLA:CPU copies the whole kernel into a `[K*card, D]` layout for it, every
    decoding step (10 ms of a 107 ms musicgen-small step; this takes ~1 ms)."""
    rows = jnp.broadcast_to(x[:, 0][None], (kernel.shape[0],) + x[:, 0].shape)  # [K, B, D]
    logits = lax.dot_general(rows, kernel, (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)
    return logits.transpose(1, 0, 2)[:, :, None]  # [K, B, card] -> [B, K, 1, card]


def heads_as_one_matmul(x: Array, kernel: Array) -> Array:
    """x `[B, T, D]`, kernel `[K, D, card]` -> logits `[B, K, T, card]` float32, as one `[B*T, D] @ [D, K*card]`.

    Why not the einsum: XLA:CPU lowers "btd,kdc->bktc" to a transposed `[K*card, D] @ [D, B*T]` product behind a
    strided copy of the kernel, and its gradient arrives transposed, which then slows AdamW's elementwise update of
    this (the largest) parameter ~8x. One plain matmul over the flattened heads is ~1.8x faster for the heads' forward,
    backward and optimizer update on a 2-core CPU (d 512, card 2048, 604 positions: 53 ms against 94)."""
    b, t, d = x.shape
    k, _, card = kernel.shape
    flat_kernel = kernel.transpose(1, 0, 2).reshape(d, k * card)
    logits = rows_matmul(x.reshape(b * t, d), flat_kernel, jnp.float32)
    return logits.reshape(b, t, k, card).transpose(0, 2, 1, 3)


# --- decoding on per-layer weights --------------------------------------------------------------------------------
def split_for_decoding(stacked_layers: dict, cache: dict[str, Array]) -> tuple[tuple[dict, ...], dict[str, Array]]:
    """The scanned layers' params `{...: [L, ...]}` and a stacked cache from `prefill` -> (L per-layer param trees,
    the cache in the per-layer layout of `mgjax.lm.kv_cache`: 'k', 'v' as L arrays `[B, H, S, Dh]`, 'cross_k',
    'cross_v' as L arrays `[B, Lc, H, Dh]`), for `MusicGenLM.decode_step(..., layer_params)`.

    Why: a decoding step reads every weight once, so how fast it reads them is how fast it runs. Scanning over the
    stacked params makes XLA:CPU copy each layer's weights (and its cache) out of the stack before using them,
    every step: half of a musicgen-small step. Split once before the decoding loop, every layer's weights and cache
    are buffers of their own, read (and the cache updated) in place. Costs one copy of the layer weights while
    generating; weights a decoding step never reads (the cross-attention key/value projections) XLA drops. Same
    logits as the scan in float32; in bfloat16 within its rounding (XLA's default excess precision keeps different
    intermediates in float32 once the layers are unrolled; with `--xla_allow_excess_precision=false` they agree)."""
    num_layers = cache["k"].shape[0]
    layer_params = tuple(jax.tree.map(lambda leaf: leaf[i], stacked_layers) for i in range(num_layers))
    return layer_params, split_by_layer(cache, _num_heads(stacked_layers))


def _num_heads(stacked_layers: dict) -> int:
    """H of the stacked self-attention's query projection: `[L, D, H, Dh]`, or int8 with its scale `[L, H, Dh]`."""
    attn = stacked_layers["self_attn"]
    return attn["q_proj_scale"].shape[1] if "q_proj_scale" in attn else attn["q_proj"].shape[2]


# apply_layer(params, x [B, T, D], {'k','v': [B, H, S, Dh]}, cross {'k','v': [B, Lc, H, Dh]} or None) -> (x, kv)
LayerApply = Callable[[Any, Array, dict, Optional[dict]], tuple[Array, dict]]


def decode_layers_one_by_one(apply_layer: LayerApply, layer_params: tuple[dict, ...], x: Array, kv: dict,
                             cross_kv: dict | None) -> tuple[Array, dict]:
    """The cached decoder layers, unrolled, in `split_for_decoding`'s layout: x `[B, T, D]`, kv
    `{'k','v': L x [B, H, S, Dh]}`, cross_kv `{'k','v': L x [B, Lc, H, Dh]}` or None -> (x, kv); `apply_layer`
    runs one layer on its own params and cache."""
    keys, values = [], []
    for i, params in enumerate(layer_params):
        cross = None if cross_kv is None else {"k": cross_kv["k"][i], "v": cross_kv["v"][i]}
        x, own = apply_layer(params, x, {"k": kv["k"][i], "v": kv["v"][i]}, cross)
        keys.append(own["k"])
        values.append(own["v"])
    return x, {"k": tuple(keys), "v": tuple(values)}


def layer_weight_bytes(lm_params) -> int:
    """Bytes of the stacked decoder-layer params: a bound on what `split_for_decoding` copies (XLA drops the
    cross-attention key/value projections, which decoding never reads)."""
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(lm_params["layers"]))


def free_host_bytes(meminfo: str = "/proc/meminfo") -> Optional[int]:
    """Memory a new allocation can get: Linux's MemAvailable (free + reclaimable page cache, which a machine that
    has just read a checkpoint holds plenty of), else the free physical pages, else None where the OS cannot tell."""
    try:
        with open(meminfo) as lines:
            for line in lines:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def split_layers_by_default(lm_params) -> bool:
    """Whether decoding runs the layers one by one on split weights (`split_for_decoding`): yes, since XLA:CPU
    otherwise copies every layer's weights out of the stack every step (musicgen-small float32: 1.6x the steps/s),
    unless the split's one extra copy of the layer weights, with a quarter more for headroom, would not fit in
    available host memory."""
    free = free_host_bytes()
    return free is None or 1.25 * layer_weight_bytes(lm_params) < free
