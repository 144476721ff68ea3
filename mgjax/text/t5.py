"""T5 encoder (the MusicGen text conditioner) as Flax Linen modules.

Matches transformers' `T5EncoderModel`: token embedding, bidirectional bucketed relative position bias computed once
(HF keeps its table in block 0 and shares the bias with every layer), pre-norm blocks with T5's RMS layer norm,
unscaled dot-product attention, ReLU or gated-GELU (tanh approximation, `gelu_new`) feed-forward, final norm.

Param tree (float32; `N` = num_layers, `D` = d_model, `H` = num_heads, `K` = d_kv, `F` = d_ff, `R` = buckets):
```
embedding                       [V, D]        ('vocab', 'embed')
relative_attention_bias         [R, H]        (None, 'heads')
layers/attention_norm/scale     [N, D]        ('layers', 'embed')
layers/attention/{query,key,value}  [N, D, H, K]  ('layers', 'embed', 'heads', 'kv')
layers/attention/out            [N, H, K, D]  ('layers', 'heads', 'kv', 'embed')
layers/mlp_norm/scale           [N, D]        ('layers', 'embed')
layers/mlp/wi                   [N, D, F]     ('layers', 'embed', 'mlp')   relu
layers/mlp/{wi_0,wi_1}          [N, D, F]     ('layers', 'embed', 'mlp')   gated-gelu
layers/mlp/wo                   [N, F, D]     ('layers', 'mlp', 'embed')
final_norm/scale                [D]           ('embed',)
```
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mgjax.config import T5Config

Dtype = Any
_MASK_VALUE = -1e30  # finite, so a fully masked row gives a uniform softmax instead of NaN


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 bucket index of `key_pos - query_pos`, computed in numpy at trace time. -> int32 [Lq, Lk]

    Follows transformers' `_relative_position_bucket` step by step in float32 (log, divide, scale, truncate), since a
    float64 evaluation can land on the other side of an integer boundary (e.g. distance 16 with the defaults).
    """
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    with np.errstate(divide="ignore"):  # log(0) on the exact-bucket positions; `np.where` discards them
        scaled = (np.log(distance.astype(np.float32) / np.float32(max_exact))
                  / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
    large = max_exact + np.where(distance < max_exact, 0, scaled).astype(np.int64)
    large = np.minimum(large, half - 1)
    buckets += np.where(distance < max_exact, distance, large)
    return buckets.astype(np.int32)


class T5LayerNorm(nn.Module):
    """RMS norm without mean subtraction or bias; statistics in float32. [..., D] -> [..., D] in `dtype`."""

    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), jnp.float32)
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return (scale * x).astype(self.dtype)


def attend(q_BxLxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxK: jax.Array, bias_1xHxLxL: jax.Array,
           mask_BxL: jax.Array) -> jax.Array:
    """Unscaled softmax attention with an additive bias and a key padding mask; softmax in float32. -> [B, L, H, K]"""
    scores = jnp.einsum("bqhk,bshk->bhqs", q_BxLxHxK, k_BxLxHxK).astype(jnp.float32) + bias_1xHxLxL
    scores = jnp.where(mask_BxL[:, None, None, :], scores, _MASK_VALUE)
    weights = jax.nn.softmax(scores, axis=-1).astype(v_BxLxHxK.dtype)
    return jnp.einsum("bhqs,bshk->bqhk", weights, v_BxLxHxK)


class T5SelfAttention(nn.Module):
    """Multi-head self-attention without 1/sqrt(K) scaling (T5 folds it into the init). [B, L, D] -> [B, L, D]"""

    config: T5Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, bias_1xHxLxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
        cfg = self.config
        init = nn.initializers.normal(stddev=cfg.d_model ** -0.5)
        in_shape = (cfg.d_model, cfg.num_heads, cfg.d_kv)
        in_axes = ("embed", "heads", "kv")

        def project(name):
            kernel = self.param(name, nn.with_logical_partitioning(init, in_axes), in_shape, jnp.float32)
            return jnp.einsum("bld,dhk->blhk", x_BxLxD, kernel.astype(self.dtype))

        q, k, v = (project(name) for name in ("query", "key", "value"))
        out_kernel = self.param("out", nn.with_logical_partitioning(init, ("heads", "kv", "embed")),
                                (cfg.num_heads, cfg.d_kv, cfg.d_model), jnp.float32)
        y = attend(q, k, v, bias_1xHxLxL, mask_BxL)
        return jnp.einsum("blhk,hkd->bld", y, out_kernel.astype(self.dtype))


class T5MLP(nn.Module):
    """`relu`: wo(relu(wi x)); `gated-gelu`: wo(gelu_tanh(wi_0 x) * wi_1 x). [B, L, D] -> [B, L, D]"""

    config: T5Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        cfg = self.config

        def dense(name, x, shape, axes):
            init = nn.initializers.normal(stddev=shape[0] ** -0.5)
            kernel = self.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)
            return x @ kernel.astype(self.dtype)

        up = lambda name: dense(name, x_BxLxD, (cfg.d_model, cfg.d_ff), ("embed", "mlp"))
        if cfg.feed_forward_proj == "relu":
            h = jax.nn.relu(up("wi"))
        elif cfg.feed_forward_proj == "gated-gelu":
            h = jax.nn.gelu(up("wi_0"), approximate=True) * up("wi_1")
        else:
            raise ValueError(f"unsupported feed_forward_proj {cfg.feed_forward_proj!r} (relu or gated-gelu)")
        return dense("wo", h, (cfg.d_ff, cfg.d_model), ("mlp", "embed"))


class T5Layer(nn.Module):
    """One pre-norm encoder block; the residual stream stays float32. Scan body: (x, None) -> (x, None)."""

    config: T5Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, bias_1xHxLxL: jax.Array, mask_BxL: jax.Array):
        cfg = self.config
        h = T5LayerNorm(cfg.layer_norm_epsilon, self.dtype, name="attention_norm")(x_BxLxD)
        x_BxLxD = x_BxLxD + T5SelfAttention(cfg, self.dtype, name="attention")(h, bias_1xHxLxL, mask_BxL)
        h = T5LayerNorm(cfg.layer_norm_epsilon, self.dtype, name="mlp_norm")(x_BxLxD)
        x_BxLxD = x_BxLxD + T5MLP(cfg, self.dtype, name="mlp")(h)
        return x_BxLxD.astype(jnp.float32), None


class T5Encoder(nn.Module):
    """T5 encoder stack. (input_ids [B, L] int32, attention_mask [B, L] 0/1) -> hidden states [B, L, D] float32.

    Padded positions get values too (as in transformers); callers mask them.
    """

    config: T5Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        cfg = self.config
        _, length = input_ids.shape
        embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
            (cfg.vocab_size, cfg.d_model), jnp.float32)
        x = jnp.take(embedding, input_ids, axis=0)

        bias_table = self.param(
            "relative_attention_bias",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=cfg.d_model ** -0.5), (None, "heads")),
            (cfg.relative_attention_num_buckets, cfg.num_heads), jnp.float32)
        buckets = relative_position_buckets(length, length, cfg.relative_attention_num_buckets,
                                            cfg.relative_attention_max_distance)
        bias_1xHxLxL = jnp.transpose(bias_table[buckets], (2, 0, 1))[None]

        layers = nn.scan(
            T5Layer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, self.dtype, name="layers")
        x, _ = layers(x, bias_1xHxLxL, attention_mask.astype(bool))
        return T5LayerNorm(cfg.layer_norm_epsilon, jnp.float32, name="final_norm")(x)


def boxed_t5_params(config: T5Config, key: jax.Array) -> Any:
    """Random T5 params as `init` returns them (logically partitioned boxes): the one T5 init of inference
    (`mgjax.api`) and training (`mgjax.training`)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return T5Encoder(config).init(key, ids, jnp.ones_like(ids))["params"]


def encode_text(config: T5Config, params: Any, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """T5 states `[B, L, d_model]` float32 of token ids `[B, L]` with their 0/1 mask: the one T5 forward of
    inference and training.

    The dtype rule: T5 computes in float32 everywhere, whatever `lm.compute_dtype` is. It is a frozen feature
    extractor (trained only with `train.train_text_encoder`), its outputs then match transformers' float32 T5 at
    inference, and a training step's text states are the ones sampling will see. What it costs training in
    bfloat16: the T5 forward over `train.max_text_tokens` tokens per clip is a small share of the step's
    FLOPs (`mgjax.aot.train_model_flops`: 0.6 % of train-small's, 0.14 % of train-medium's, 0.08 % of
    train-large's), run at float32 matmul speed (several bfloat16 passes on a TPU): at most a few percent of a
    train-small step; its activations are `[B, L, 768]`, its params float32 in either case.
    """
    return T5Encoder(config).apply({"params": params}, input_ids, attention_mask)
