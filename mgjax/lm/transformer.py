"""Decoder layers of the MusicGen LM: positions, attention, feed-forward, the pre-norm layer and its scanned stack.

Shapes: B batch, T query length, S key length (the KV cache length when decoding), D model width, H heads,
Dh head width, F feed-forward width, L number of layers, Lc condition length.

A layer runs in one of three modes, each its own method (`DecoderLayer.__call__`, `.prefill`, `.decode`):
- train: teacher-forced causal attention over its own input, nothing stored; the attention core is
  `mgjax.kernels.attention` (`lm.attention`: Pallas splash on TPU, cuDNN on GPU, dense on CPU); remat applies;
- prefill: the first T positions of an empty KV cache (a prepend model's condition prefix, an audio prompt): the
  same kernel over those positions, their keys/values written into the cache (`mgjax.lm.kv_cache`);
- decode: T >= 1 new positions at a traced cache index appended to a filled cache; each query attends densely to
  every cache position up to its own. Cross-attention keys/values come precomputed in both cached modes.

Activations are constrained by logical axes at the layer boundaries (`mgjax.sharding.constrain`: a no-op without a
mesh) and tagged by name for remat policies (`mgjax.lm.remat`).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from mgjax.config import LMConfig
from mgjax.kernels.attention import attention, dense_attention
from mgjax.kernels.select import kernels_for
from mgjax.lm.remat import policy as remat_policy
from mgjax.lm import kv_cache as kvs
from mgjax.lm.remat import tag
from mgjax.sharding import constrain

Array = jax.Array
# logical axes of the activations constrained at layer boundaries (`mgjax.sharding.LOGICAL_RULES`)
EMBED_AXES = ("activation_batch", "activation_length", "activation_embed")  # [B, T, D]
HEAD_AXES = ("activation_batch", "activation_length", "activation_heads", "activation_kv")  # [B, T, H, Dh]
default_init = nn.initializers.normal(stddev=0.02)  # transformers' MusicGen init (initializer_factor)


def param_with_axes(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple, init=default_init) -> Array:
    """A float32 parameter carrying logical axis names (see DESIGN.md for the vocabulary)."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def matmul_weight(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple, contracted: int):
    """A projection weight: float32 `shape`, or with `weight_format='int8'` the pair (int8 weight with the
    contracted axes moved last, `shape[contracted:] + shape[:contracted]`, and a float32 scale over the
    non-contracted axes `shape[contracted:]`). `contracted`: how many leading axes of `shape` the matmul sums over.

    Why int8 stores output channels first: XLA:CPU's int8 matrix-vector product runs 1.3-3.6x faster when each
    output is a dot product over a contiguous row (e.g. 21 against 6 GB/s for musicgen-small's `fc2`)."""
    if module.config.weight_format != "int8":
        return param_with_axes(module, name, shape, axes)
    stored_shape, stored_axes = shape[contracted:] + shape[:contracted], axes[contracted:] + axes[:contracted]
    quantized = module.param(name, nn.with_logical_partitioning(nn.initializers.zeros, stored_axes), stored_shape,
                             jnp.int8)
    scale = param_with_axes(module, f"{name}_scale", shape[contracted:], axes[contracted:], nn.initializers.ones)
    return quantized, scale


def project(spec: str, x: Array, weight, dtype, kernels: str = "auto") -> Array:
    """`jnp.einsum(spec, x, weight)` for a float weight, as the `kernels` set formulates it (`mgjax.kernels.select`);
    for an (int8, scale) weight (stored with the contracted axes last, see `matmul_weight`; `spec` names the float
    layout), int8 x int8 -> int32 with x quantised per row (symmetric, over its contracted axes) and both scales
    applied to the int32 result, on every kernel set.

    For int8 the spec must be a matmul over flattened axes: x's contracted axes trailing, output = x's batch axes +
    the weight's other axes. Weight-only int8 quarters the bytes read per decoding step, which is what bounds
    sampling speed on a CPU.
    """
    if not isinstance(weight, tuple):
        return kernels_for(kernels).einsum(spec, x.astype(dtype), weight.astype(dtype))
    quantized, w_scale = weight
    inputs, out = spec.split("->")
    x_letters, w_letters = inputs.split(",")
    contracted = "".join(letter for letter in x_letters if letter not in out)
    batch = x_letters[:len(x_letters) - len(contracted)]
    kept = "".join(letter for letter in w_letters if letter in out)
    if not (contracted and x_letters.endswith(contracted) and out == batch + kept):
        raise ValueError(f"int8 projection {spec!r}: x's contracted axes must trail and the output be x's batch axes "
                         "followed by the weight's other axes")
    kept_shape = quantized.shape[:len(kept)]
    rows = x.astype(jnp.float32).reshape(-1, math.prod(x.shape[len(batch):]))  # [N, C]
    row_scale = jnp.max(jnp.abs(rows), axis=1, keepdims=True) / 127.0 + 1e-30
    rows_q = jnp.round(rows / row_scale).astype(jnp.int8)
    # [N, C] x [O, C] -> [N, O]: each output a dot product over a contiguous weight row (see matmul_weight)
    acc = lax.dot_general(rows_q, quantized.reshape(math.prod(kept_shape), -1), (((1,), (1,)), ((), ())),
                          preferred_element_type=jnp.int32)
    y = acc.astype(jnp.float32) * row_scale * w_scale.reshape(1, -1)
    return y.reshape(x.shape[:len(batch)] + kept_shape).astype(dtype)


def quantize_weight(weight: Array, contracted_axes: tuple[int, ...]) -> tuple[Array, Array]:
    """float `[...]` -> (int8 with `contracted_axes` moved last, as `matmul_weight` stores it; float32 scale
    without `contracted_axes`): symmetric per output channel."""
    weight = jnp.asarray(weight, jnp.float32)
    scale = jnp.max(jnp.abs(weight), axis=contracted_axes, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    quantized = jnp.clip(jnp.round(weight / scale), -127, 127).astype(jnp.int8)
    last = tuple(range(-len(contracted_axes), 0))
    return jnp.moveaxis(quantized, contracted_axes, last), jnp.squeeze(scale, axis=contracted_axes)


def sinusoidal_positions(positions: Array, dim: int) -> Array:
    """Positions `[..., T]` (int) -> embeddings `[..., T, dim]` float32.

    As transformers/audiocraft: frequencies `exp(-log(10000) * arange(half) / (half - 1))`, `cat([cos, sin])`
    (cos first), a zero column appended when `dim` is odd.
    """
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))
    angles = positions.astype(jnp.float32)[..., None] * freqs
    emb = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros(emb.shape[:-1] + (1,), emb.dtype)], axis=-1)
    return emb


class LayerNorm(nn.Module):
    """LayerNorm with scale and bias (torch `nn.LayerNorm`), statistics in float32."""

    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dim = x.shape[-1]
        scale = param_with_axes(self, "scale", (dim,), ("embed",), nn.initializers.ones)
        bias = param_with_axes(self, "bias", (dim,), ("embed",), nn.initializers.zeros)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(self.dtype)


class Attention(nn.Module):
    """Bias-free multi-head projections; the attention core is `mgjax.kernels.attention`.

    Params: q_proj/k_proj/v_proj `[D, H, Dh]`, out_proj `[H, Dh, D]`.
    """

    config: LMConfig

    def setup(self):
        c = self.config
        in_axes, out_axes = ("embed", "heads", "kv"), ("heads", "kv", "embed")
        self.q_proj = matmul_weight(self, "q_proj", (c.dim, c.num_heads, c.head_dim), in_axes, 1)
        self.k_proj = matmul_weight(self, "k_proj", (c.dim, c.num_heads, c.head_dim), in_axes, 1)
        self.v_proj = matmul_weight(self, "v_proj", (c.dim, c.num_heads, c.head_dim), in_axes, 1)
        self.out_proj = matmul_weight(self, "out_proj", (c.num_heads, c.head_dim, c.dim), out_axes, 2)

    @property
    def dtype(self):
        return jnp.dtype(self.config.compute_dtype)

    def query(self, x: Array) -> Array:
        """`[B, T, D]` -> `[B, T, H, Dh]`."""
        return project("btd,dhk->bthk", x, self.q_proj, self.dtype, self.config.kernels)

    def key_value(self, x: Array) -> tuple[Array, Array]:
        """`[B, S, D]` -> keys, values `[B, S, H, Dh]`."""
        return (project("bsd,dhk->bshk", x, self.k_proj, self.dtype, self.config.kernels),
                project("bsd,dhk->bshk", x, self.v_proj, self.dtype, self.config.kernels))

    def output(self, o: Array) -> Array:
        """`[B, T, H, Dh]` -> `[B, T, D]`."""
        return project("bthk,hkd->btd", o, self.out_proj, self.dtype, self.config.kernels)


class FeedForward(nn.Module):
    """fc1 `[D, F]` -> exact (erf) GELU -> fc2 `[F, D]`, no biases."""

    config: LMConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        dtype = jnp.dtype(c.compute_dtype)
        fc1 = matmul_weight(self, "fc1", (c.dim, c.ffn_dim), ("embed", "mlp"), 1)
        fc2 = matmul_weight(self, "fc2", (c.ffn_dim, c.dim), ("mlp", "embed"), 1)
        if not isinstance(fc1, tuple):
            return kernels_for(c.kernels).gelu_mlp(x.astype(dtype), fc1.astype(dtype), fc2.astype(dtype))
        h = jax.nn.gelu(project("btd,df->btf", x, fc1, dtype), approximate=False)
        return project("btf,fd->btd", h, fc2, dtype)


class DecoderLayer(nn.Module):
    """Pre-norm layer: x + SelfAttn(LN(x)), [x + CrossAttn(LN(x), cond)], x + FFN(LN(x)).

    One method per mode (see the module docstring): `__call__` (train), `prefill`, `decode`. `own_cache`: decode
    on this layer's own cache `[B, H, S, Dh]` (`kvs.split_by_layer`, the CPU's layout) instead of the stacked one.
    `cross_attention`: the layer holds the cross-attention block (the condition fuser's
    `cross_attention`, `mgjax.conditioning.fuser`); it runs whenever cross states are given.
    """

    config: LMConfig
    own_cache: bool = False
    cross_attention: bool = False

    def setup(self):
        c = self.config
        dtype = jnp.dtype(c.compute_dtype)
        self.self_attn_norm = LayerNorm(c.layer_norm_eps, dtype)
        self.self_attn = Attention(c)
        if self.cross_attention:
            self.cross_attn_norm = LayerNorm(c.layer_norm_eps, dtype)
            self.cross_attn = Attention(c)
        self.ffn_norm = LayerNorm(c.layer_norm_eps, dtype)
        self.ffn = FeedForward(c)

    def __call__(self, x: Array, cond: Array | None, cond_mask: Array | None) -> tuple[Array, None]:
        """Train mode (the body of the scan over layers): x `[B, T, D]` attends causally to itself through the
        attention kernel; cond `[B, Lc, D]` projected condition states (cross; None: no cross-attention), cond_mask
        `[B, Lc]` bool or None. Nothing is cached. Returns (x, None)."""
        implementation = self.config.attention

        def self_attention(q, k, v):
            return attention(q, k, v, causal=True, implementation=implementation)

        cross = None
        if cond is not None:
            def cross(q):
                k, v = self.cross_attn.key_value(cond)
                return attention(q, k, v, kv_mask=cond_mask, implementation=implementation)
        return self._blocks(x, self_attention, cross), None

    def prefill(self, carry: tuple, cross_kv: dict | None, cross_mask: Array | None) -> tuple[tuple, None]:
        """Prefill mode: carry = (x `[B, T, D]`, stacked cache `{'k','v': [L, B, S, H*Dh]}`, layer int32), x the
        first T positions of an empty cache. Attention as in training (the kernel, over the T new positions:
        nothing before them is cached); their keys/values are written at `[layer, :, 0:T]`. cross_kv
        `{'k','v': [B, Lc, H, Dh]}` precomputed (cross) or None, cross_mask `[B, Lc]`. Returns ((x, cache,
        layer + 1), None)."""
        x, cache, layer = carry
        implementation = self.config.attention
        written = {}

        def self_attention(q, k, v):
            written.update(k=kvs.write_stacked(cache["k"], k, layer, 0), v=kvs.write_stacked(cache["v"], v, layer, 0))
            return attention(q, k, v, causal=True, implementation=implementation)

        def cross(q):
            return attention(q, cross_kv["k"], cross_kv["v"], kv_mask=cross_mask, implementation=implementation)

        x = self._blocks(x, self_attention, None if cross_kv is None else cross)
        return (x, written, layer + 1), None

    def decode(self, carry: tuple, cross_kv: dict | None, cross_mask: Array | None,
               index: Array) -> tuple[tuple, None]:
        """Decode mode: carry = (x `[B, T, D]`, cache, layer int32), x T >= 1 new positions at cache position
        `index` (traced) appended to a filled cache: their keys/values are written there and each query attends to
        every cache position up to its own (dense: one score row per query). cache is the WHOLE stacked cache
        `{'k','v': [L, B, S, H*Dh]}`, updated in place at `[layer, :, index]` (carrying it, rather than scanning
        over its layers, keeps XLA from copying the whole cache every step), or with `own_cache` this layer's own
        `{'k','v': [B, H, S, Dh]}`. cross_kv, cross_mask as `prefill`. Returns ((x, cache, layer + 1), None)."""
        x, cache, layer = carry
        heads = self.config.num_heads
        written = {}

        def self_attention(q, k, v):
            if self.own_cache:
                written.update(k=kvs.write_own(cache["k"], k, index), v=kvs.write_own(cache["v"], v, index))
                keys, values = written["k"], written["v"]
            else:
                written.update(k=kvs.write_stacked(cache["k"], k, layer, index),
                               v=kvs.write_stacked(cache["v"], v, layer, index))
                keys, values = (kvs.read_stacked(written[name], layer, heads) for name in ("k", "v"))
            return dense_attention(q, keys, values, causal=True, q_offset=index, kv_heads_first=self.own_cache)

        def cross(q):
            return dense_attention(q, cross_kv["k"], cross_kv["v"], kv_mask=cross_mask)

        x = self._blocks(x, self_attention, None if cross_kv is None else cross)
        return (x, written, layer + 1), None

    def _blocks(self, x: Array, self_attention, cross) -> Array:
        """The layer's three residual blocks around the mode's attention: `self_attention(q, k, v)` and
        `cross(q)` (None: no cross-attention) map `[B, T, H, Dh]` queries (and the new keys/values) to
        `[B, T, H, Dh]`. x `[B, T, D]` -> `[B, T, D]`."""
        x = constrain(x, EMBED_AXES)
        h = self.self_attn_norm(x)
        q = tag(constrain(self.self_attn.query(h), HEAD_AXES), "query")
        k, v = self.self_attn.key_value(h)
        k, v = tag(constrain(k, HEAD_AXES), "key"), tag(constrain(v, HEAD_AXES), "value")
        attended = tag(constrain(self_attention(q, k, v), HEAD_AXES), "attention")
        x = x + tag(constrain(self.self_attn.output(attended), EMBED_AXES), "self_attention_out")
        if cross is not None:
            attended = cross(self.cross_attn.query(self.cross_attn_norm(x)))
            x = x + tag(constrain(self.cross_attn.output(attended), EMBED_AXES), "cross_attention_out")
        return x + tag(constrain(self.ffn(self.ffn_norm(x)), EMBED_AXES), "mlp_out")

    def cross_key_value(self, cond: Array) -> tuple[Array, dict]:
        """cond `[B, Lc, D]` -> (cond unchanged: the scan carry, `{'k','v': [B, Lc, H, Dh]}`)."""
        k, v = self.cross_attn.key_value(cond)
        return cond, {"k": k, "v": v}


def scanned_layers(config: LMConfig, name: str = "layers", *, cross_attention: bool = False) -> nn.Module:
    """The `config.num_layers` decoder layers as one `nn.scan` (params stacked on a leading 'layers' axis), with
    cross-attention blocks when `cross_attention`.

    Scanned methods (see `DecoderLayer`): `__call__(x, cond, cond_mask)` (train; remat applies here),
    `prefill((x, cache, layer), cross_kv, cross_mask)` and `decode((x, cache, layer), cross_kv, cross_mask, index)`
    with cross_kv sliced per layer and the whole stacked cache carried (start with layer = 0), and
    `cross_key_value(cond)` -> (cond, `{'k','v': [L, B, Lc, H, Dh]}`).
    """
    layer = DecoderLayer
    if config.effective_remat_policy != "none":
        layer = nn.remat(layer, prevent_cse=False, policy=remat_policy(config.effective_remat_policy))
    common = dict(variable_axes={"params": 0}, split_rngs={"params": True}, length=config.num_layers,
                  unroll=config.scan_unroll, metadata_params={nn.PARTITION_NAME: "layers"})
    methods = {
        "__call__": dict(common, in_axes=(nn.broadcast, nn.broadcast)),
        "prefill": dict(common, in_axes=(0, nn.broadcast)),
        "decode": dict(common, in_axes=(0, nn.broadcast, nn.broadcast)),
        "cross_key_value": dict(common, in_axes=()),
    }
    return nn.scan(layer, methods=methods)(config, cross_attention=cross_attention, name=name)
