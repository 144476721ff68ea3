"""Multi-head attention behind one function, its implementation picked by backend (or named in config).

Shapes: B batch, T queries, S keys, H heads, Dh head width. Every implementation computes what the dense one does
(`dense_attention`, also the core of cached decoding): scores `q.k * Dh**-0.5` in float32, masked with float32's min,
softmax in float32, probabilities cast to v's dtype, times v. A query with no allowed key (e.g. the all-False
`kv_mask` of CFG's null condition) gets uniform weights there, i.e. the mean of v over all S keys; the kernels
would give something else for such rows (splash: the mean over the keys of the blocks it visits; cuDNN: its own),
so every kernel path overwrites them with that mean, which also gives the dense gradients (none into q, k; 1/S of
the row's cotangent into each v).

Implementations:
- "dense": einsums, any backend (the CPU default).
- "pallas": TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`), the TPU default.
  "pallas_interpret": the same kernel, the same program, with splash's `interpret=True`: Pallas' HLO interpreter
  runs the kernel body over the grid as plain XLA ops, so it runs on CPU (how the CPU tests check the kernel; the
  TPU lowering itself is checked by lowering for the "tpu" platform, which needs no TPU). Not Pallas' TPU
  interpret mode (`pltpu.InterpretParams()`): in jax 0.10.2 it fails on a vmapped kernel (it zips the grid, which
  vmap extended by the batch, with the kernel's own per-dimension semantics), and the batch is vmapped here.
  Why splash and not `flash_attention.py`: splash takes `interpret` as an argument (flash would need the global
  interpret context), its static mask (causal, with an offset) lets the forward and both backward kernels skip
  masked-out blocks without even copying them in, key padding goes in as segment ids, its custom VJP runs in
  interpret mode, and it is the TPU kernel MaxText trains with. Lengths are padded to the block multiple (padded
  keys masked, padded queries sliced off).
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, the GPU default. cuDNN takes only bf16/fp16:
  float32 inputs run the same wrapper with XLA's implementation.
"""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from mgjax.sharding import mesh_spec

Array = jax.Array
IMPLEMENTATIONS = ("auto", "dense", "pallas", "pallas_interpret", "cudnn")
BACKEND_DEFAULTS = {"tpu": "pallas", "gpu": "cudnn", "cpu": "dense"}
NEG_INF = float(jnp.finfo(jnp.float32).min)
LANES = 128  # splash's blocks are multiples of the TPU's 128 lanes
SPLASH_BLOCKS = (512, 256, 128)
CUDNN_LENGTH_MULTIPLE = 2  # cuDNN's training path with a bias (our masks) needs even T and S


def resolve_implementation(name: str = "auto") -> str:
    """The implementation `name` stands for: "auto" by `jax.default_backend()` (tpu -> "pallas", gpu -> "cudnn",
    otherwise "dense"), any other valid name as it is. Raises ValueError for unknown names."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r}; valid: {', '.join(IMPLEMENTATIONS)}")
    if name == "auto":
        return BACKEND_DEFAULTS.get(jax.default_backend(), "dense")
    return name


def attention(q: Array, k: Array, v: Array, *, causal: bool = False, kv_mask: Array | None = None,
              implementation: str = "auto", q_offset: int | Array = 0) -> Array:
    """q `[B, T, H, Dh]`, k/v `[B, S, H, Dh]`, kv_mask `[B, S]` bool (True = attend) or None -> `[B, T, H, Dh]` in
    v's dtype.

    causal: query t (at position `q_offset + t`) attends keys `s <= q_offset + t`; teacher-forced self-attention is
    T == S with q_offset 0. The Pallas paths need q_offset to be a non-negative Python int.
    """
    name = resolve_implementation(implementation)
    kv_mask = None if kv_mask is None else kv_mask.astype(bool)
    if name == "dense":
        return dense_attention(q, k, v, causal=causal, kv_mask=kv_mask, q_offset=q_offset)
    if name in ("pallas", "pallas_interpret"):
        def kernel(q, k, v, kv_mask):
            return splash_attention(q, k, v, causal=causal, kv_mask=kv_mask, q_offset=q_offset,
                                    interpret=name == "pallas_interpret")
        return per_shard(kernel, q, k, v, kv_mask)
    cudnn_ok = q.dtype in (jnp.bfloat16, jnp.float16)
    return _xla_sdpa(q, k, v, causal=causal, kv_mask=kv_mask, q_offset=q_offset,
                     implementation="cudnn" if cudnn_ok else None, length_multiple=CUDNN_LENGTH_MULTIPLE)


def per_shard(kernel, q: Array, k: Array, v: Array, kv_mask: Array | None) -> Array:
    """`kernel(q, k, v, kv_mask)` on each device's shard under the current mesh (`jax.set_mesh`), as it is without
    one: XLA cannot partition a Mosaic kernel, so it runs in `shard_map` over batch and heads (the
    `activation_batch` / `activation_heads` rules of `mgjax.sharding`; lengths and head width stay whole, so the
    kernel sees whole rows). Shapes as `attention`."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(q, k, v, kv_mask)
    axes = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
    q_spec, kv_spec = mesh_spec(axes, q.shape, mesh), mesh_spec(axes, k.shape, mesh)
    if kv_mask is None:
        return jax.shard_map(lambda q, k, v: kernel(q, k, v, None), in_specs=(q_spec, kv_spec, kv_spec),
                             out_specs=q_spec, check_vma=False)(q, k, v)
    mask_spec = jax.sharding.PartitionSpec(kv_spec[0] if len(kv_spec) else None)
    return jax.shard_map(kernel, in_specs=(q_spec, kv_spec, kv_spec, mask_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v, kv_mask)


def dense_attention(q: Array, k: Array, v: Array, *, causal: bool = False, kv_mask: Array | None = None,
                    q_offset: int | Array = 0, kv_heads_first: bool = False) -> Array:
    """The reference: shapes and masks as `attention` (q_offset may be traced); the `[B, H, T, S]` scores are
    materialised. `kv_heads_first`: k, v come as `[B, H, S, Dh]` (a per-layer KV cache's layout)."""
    kv = "bhsd" if kv_heads_first else "bshd"
    key_length = k.shape[2] if kv_heads_first else k.shape[1]
    mask = allowed_mask(q.shape[1], key_length, causal=causal, kv_mask=kv_mask, q_offset=q_offset)
    scores = jnp.einsum(f"bthd,{kv}->bhts", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = jnp.where(mask, scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum(f"bhts,{kv}->bthd", probs.astype(v.dtype), v)


def allowed_mask(length: int, key_length: int, *, causal: bool, kv_mask: Array | None,
                 q_offset: int | Array = 0) -> Array | None:
    """`[B or 1, 1, T, S]` bool, True where query t may attend key s; None when every pair may."""
    mask = None
    if causal:
        query_pos = q_offset + jnp.arange(length)
        mask = (jnp.arange(key_length)[None, :] <= query_pos[:, None])[None, None]
    if kv_mask is not None:
        keys = kv_mask[:, None, None, :]
        mask = keys if mask is None else mask & keys
    return mask


def rows_with_keys(length: int, key_length: int, *, causal: bool, kv_mask: Array | None,
                   q_offset: int | Array = 0) -> Array | None:
    """`[B or 1, T]` bool: whether query t has at least one allowed key; None when every query has one."""
    if kv_mask is None:
        if not causal or (_static_int(q_offset) is not None and q_offset >= 0):
            return None
        return (q_offset + jnp.arange(length) >= 0)[None]
    if not causal:
        return jnp.broadcast_to(kv_mask.any(axis=-1, keepdims=True), (kv_mask.shape[0], length))
    last_key = q_offset + jnp.arange(length)
    seen = jnp.cumsum(kv_mask, axis=-1) > 0  # [B, S]: an allowed key at or before s
    return jnp.take(seen, jnp.clip(last_key, 0, key_length - 1), axis=1) & (last_key >= 0)[None]


def fill_rows_without_keys(out: Array, v: Array, has_key: Array | None) -> Array:
    """out `[B, T, H, Dh]` with the rows where `has_key` `[B or 1, T]` is False replaced by the mean of v
    `[B, S, H, Dh]` over S (what uniform weights give)."""
    if has_key is None:
        return out
    mean = jnp.mean(v, axis=1, keepdims=True, dtype=jnp.float32).astype(out.dtype)
    return jnp.where(has_key[:, :, None, None], out, mean)


def splash_attention(q: Array, k: Array, v: Array, *, causal: bool = False, kv_mask: Array | None = None,
                     q_offset: int = 0, interpret: bool = False) -> Array:
    """`attention` on the TPU splash kernel (`interpret`: run by Pallas' HLO interpreter, so on CPU).

    Lengths are padded to the block multiple. The static mask (causal or full) carries the causal structure, so
    splash skips blocks above the diagonal; key padding (from `kv_mask` or the block padding) goes through segment
    ids: queries are segment 0, allowed keys 0, masked keys 1. Padded queries are sliced off. Under a multi-device
    mesh a Mosaic kernel must be called inside `shard_map` (XLA cannot partition it).
    """
    if _static_int(q_offset) is None or (causal and q_offset < 0):
        # A negative offset leaves whole query blocks with no visited key block: the kernel divides by zero there.
        raise ValueError(f"splash attention needs a static q_offset >= 0, got {q_offset!r}")
    q_offset = _static_int(q_offset)
    batch, length, heads, head_dim = q.shape
    key_length = k.shape[1]
    block_q, block_kv = splash_block_size(length), splash_block_size(key_length)
    q_pad, kv_pad = _round_up(length, block_q), _round_up(key_length, block_kv)
    # Splash does not scale the scores; for Dh = 64 the factor 1/8 is exact in any float dtype.
    q_h = _heads_first(q * head_dim ** -0.5, q_pad)
    k_h, v_h = _heads_first(k, kv_pad), _heads_first(v, kv_pad)
    kernel = _splash_kernel(heads, q_pad, kv_pad, causal=causal, q_offset=q_offset, block_q=block_q,
                            block_kv=block_kv, interpret=interpret)
    padded_keys_visible = kv_pad > key_length and (not causal or q_offset + length > key_length)
    if kv_mask is None and not padded_keys_visible:
        out = jax.vmap(kernel)(q_h, k_h, v_h)
    else:
        keys = jnp.ones((batch, key_length), bool) if kv_mask is None else kv_mask.astype(bool)
        keys = jnp.pad(keys, ((0, 0), (0, kv_pad - key_length)))
        segments = splash.SegmentIds(q=jnp.zeros((batch, q_pad), jnp.int32), kv=(~keys).astype(jnp.int32))
        out = jax.vmap(kernel)(q_h, k_h, v_h, segments)
    out = jnp.swapaxes(out[:, :, :length], 1, 2).astype(v.dtype)
    has_key = rows_with_keys(length, key_length, causal=causal, kv_mask=kv_mask, q_offset=q_offset)
    return fill_rows_without_keys(out, v, has_key)


def splash_block_size(length: int) -> int:
    """The largest of 512/256/128 that pads `length` no further than a multiple of 128 would (1503 -> 512)."""
    padded = _round_up(length, LANES)
    return next(block for block in SPLASH_BLOCKS if padded % block == 0)


def _splash_kernel(heads: int, q_length: int, kv_length: int, *, causal: bool, q_offset: int, block_q: int,
                   block_kv: int, interpret: bool):
    """A splash MHA kernel for `[H, T, Dh]` inputs (vmapped over B by the caller); the mask's block analysis is
    numpy at trace time (cached by splash)."""
    shape = (q_length, kv_length)
    head_mask = splash_mask.CausalMask(shape, offset=q_offset) if causal else splash_mask.FullMask(shape)
    blocks = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                               block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                               block_q_dq=block_q, block_kv_dq=block_kv)
    return splash.make_splash_mha(splash_mask.MultiHeadMask([head_mask] * heads), block_sizes=blocks,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)


def _xla_sdpa(q: Array, k: Array, v: Array, *, causal: bool, kv_mask: Array | None, q_offset: int | Array,
              implementation: str | None, length_multiple: int = 1) -> Array:
    """`attention` through `jax.nn.dot_product_attention` (`implementation` "cudnn", or None for XLA's, which runs
    anywhere and so tests this wrapper on CPU). Lengths are padded to `length_multiple`; the padding is masked by
    sequence lengths, which, like plain causality, cuDNN applies without a bias tensor."""
    batch, length, _, _ = q.shape
    key_length = k.shape[1]
    q_pad, kv_pad = _round_up(length, length_multiple), _round_up(key_length, length_multiple)
    plain_causal = causal and length == key_length and _static_int(q_offset) == 0
    mask = allowed_mask(q_pad, kv_pad, causal=causal and not plain_causal, q_offset=q_offset,
                        kv_mask=None if kv_mask is None else jnp.pad(kv_mask, ((0, 0), (0, kv_pad - key_length))))
    if mask is not None:
        mask = jnp.broadcast_to(mask, (mask.shape[0], 1, q_pad, kv_pad))  # cuDNN wants the bias over all of [T, S]
    lengths = {}
    if (q_pad, kv_pad) != (length, key_length):
        lengths = dict(query_seq_lengths=jnp.full((batch,), length, jnp.int32),
                       key_value_seq_lengths=jnp.full((batch,), key_length, jnp.int32))
    out = jax.nn.dot_product_attention(_pad_seq(q, q_pad), _pad_seq(k, kv_pad), _pad_seq(v, kv_pad), mask=mask,
                                       is_causal=plain_causal, implementation=implementation, **lengths)
    out = out[:, :length].astype(v.dtype)
    has_key = rows_with_keys(length, key_length, causal=causal, kv_mask=kv_mask, q_offset=q_offset)
    return fill_rows_without_keys(out, v, has_key)


def uses_attention_kernel(hlo_text: str) -> bool:
    """Whether a compiled (or lowered) TPU program's text calls a Pallas kernel: Mosaic kernels, splash's
    included, lower to the custom call `tpu_custom_call`."""
    return "tpu_custom_call" in hlo_text


def _heads_first(x: Array, length: int) -> Array:
    """`[B, S, H, Dh]` -> `[B, H, length, Dh]`, zero-padded along S."""
    return jnp.swapaxes(_pad_seq(x, length), 1, 2)


def _pad_seq(x: Array, length: int) -> Array:
    """`[B, S, ...]` zero-padded to `[B, length, ...]`."""
    if x.shape[1] == length:
        return x
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _static_int(x) -> int | None:
    """x as a Python int if it is a static integer (int, numpy integer), else None (e.g. a traced offset)."""
    return int(x) if isinstance(x, numbers.Integral) else None


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
