"""The MusicGen decoder LM: codebook embeddings, condition projections, scanned layers, per-codebook heads.

Entry points (all through `MusicGenLM(config).apply(params, ..., method=...)`):

    logits = lm(codes, cond, cond_mask, chroma=None)              # teacher-forced, [B, K, S, card] float32
    conds = lm.encode_conditions(cond, cond_mask, chroma=None)    # the fuser's Conditions(prefix, cross, cross_mask)
    logits = lm.forward(codes, conds)                             # teacher-forced from encoded conditions
    cache = lm.prefill(cond, cond_mask, chroma=None, max_length=S, codes=None)   # prefill mode: conditions
                                                                  # (and the prompt's columns) into an empty cache
    logits, cache = lm.decode_step(codes, cache)                  # decode mode: codes [B, K, T] (T=1 per step)
                                                                  # at cache['index']

The three modes (train, prefill, decode) are the layers' three methods (`mgjax.lm.transformer`).

Conditioning: the condition fuser (`mgjax.conditioning.fuser`, chosen by `lm.conditioning`) turns the text states
(and a melody's chroma) into `Conditions(prefix, cross, cross_mask)`. The LM knows only those: a prefix `[B, P, D]`
goes before the code embeddings (sinusoids over all P + S positions) and its logits are dropped; cross states
`[B, Lc, D]` are attended to by every layer, key padding masked by cross_mask. The fuser's projections are params
of this module's own scope (`enc_to_dec_proj`, `audio_enc_to_dec_proj`). A CFG sampler builds its null condition
before the fuser (zero text states, zero mask, the null chroma), the same as transformers' generate.

KV cache: `mgjax.lm.kv_cache` documents the structure (stacked `[L, B, S, H*Dh]` self-attention keys/values,
the cross-attention's, the write index), its logical axes (`CACHE_AXES`) and the CPU's per-layer layout
(`kernels.cpu.split_for_decoding`, for `decode_step(codes, cache, layer_params)`).

The projections, feed-forward, heads and that decoding layout come in two formulations, chosen by `lm.kernels`
(`mgjax.kernels.select`): the plain einsums, or the CPU's.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn

from mgjax.conditioning.fuser import Conditions, fuser_for, uses_cross_attention
from mgjax.config import LMConfig
from mgjax.kernels.cpu import decode_layers_one_by_one
from mgjax.kernels.select import kernels_for
from mgjax.lm import kv_cache as kvs
from mgjax.lm.transformer import (DecoderLayer, LayerNorm, param_with_axes, project, quantize_weight, scanned_layers,
                                  sinusoidal_positions)

Array = jax.Array

class CodebookEmbed(nn.Module):
    """Sum of K embeddings, one table of `card + 1` rows per codebook (row `card` = special token)."""

    config: LMConfig

    @nn.compact
    def __call__(self, codes: Array) -> Array:
        """codes `[B, K, T]` int -> `[B, T, D]` in the compute dtype."""
        c = self.config
        table = param_with_axes(self, "embedding", (c.num_codebooks, c.card + 1, c.dim),
                                ("codebooks", "vocab", "embed"))
        per_codebook = jnp.asarray(table)[jnp.arange(c.num_codebooks)[None, :, None], codes]  # [B, K, T, D]
        return per_codebook.sum(axis=1).astype(jnp.dtype(c.compute_dtype))


class CodebookHeads(nn.Module):
    """K bias-free linear heads, kernel `[K, D, card]`."""

    config: LMConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x `[B, T, D]` -> logits `[B, K, T, card]` float32."""
        c = self.config
        if c.weight_format == "int8":  # the codebook axis leads, so the generic matmul_weight layout does not apply
            # stored as quantize_weight leaves it: the contracted axis (embed) last
            kernel = (self.param("kernel", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                        ("codebooks", "vocab", "embed")),
                                 (c.num_codebooks, c.card, c.dim), jnp.int8),
                      param_with_axes(self, "kernel_scale", (c.num_codebooks, c.card), ("codebooks", "vocab"),
                                      nn.initializers.ones))
            return project("btd,kdc->btkc", x, kernel, jnp.float32).transpose(0, 2, 1, 3)
        kernel = param_with_axes(self, "kernel", (c.num_codebooks, c.dim, c.card), ("codebooks", "embed", "vocab"))
        dtype = jnp.dtype(c.compute_dtype)
        return kernels_for(c.kernels).codebook_heads(x.astype(dtype), kernel.astype(dtype))


class MusicGenLM(nn.Module):
    """MusicGen decoder; see the module docstring for the methods and the cache layout."""

    config: LMConfig

    def setup(self):
        c = self.config
        fuser = fuser_for(c)
        self.embed = CodebookEmbed(c)
        self.fuser = fuser(c)
        nn.share_scope(self, self.fuser)  # its projections are this module's params (enc_to_dec_proj, ...)
        self.layers = scanned_layers(c, cross_attention=fuser.cross_attention)
        self.final_norm = LayerNorm(c.layer_norm_eps, jnp.dtype(c.compute_dtype))
        self.heads = CodebookHeads(c)

    def __call__(self, codes: Array, cond: Array | None, cond_mask: Array | None, *, chroma: Array | None = None,
                 position_offset: int | Array = 0) -> Array:
        """codes `[B, K, S]` int32, cond `[B, L, Dc]` text states, cond_mask `[B, L]`, chroma `[B, F, C]` (melody)
        -> logits `[B, K, S, card]` float32 (teacher-forced)."""
        return self.forward(codes, self.encode_conditions(cond, cond_mask, chroma=chroma),
                            position_offset=position_offset)

    def encode_conditions(self, cond: Array | None, cond_mask: Array | None, *,
                          chroma: Array | None = None) -> Conditions:
        """The fuser (`mgjax.conditioning.fuser`): cond `[B, L, Dc]` text states (or None: no text), cond_mask
        `[B, L]` (None: all valid), chroma `[B, F, num_chroma]` (melody models; None: the null melody) ->
        `Conditions(prefix [B, P, D], cross [B, Lc, D], cross_mask [B, Lc])`, each None where the fuser gives none."""
        return self.fuser(cond, cond_mask, chroma)

    def embed_codes(self, codes: Array, positions: Array) -> Array:
        """codes `[B, K, T]`, positions `[T]` -> `[B, T, D]` (embeddings + sinusoids)."""
        chex.assert_rank(codes, 3)
        chex.assert_axis_dimension(codes, 1, self.config.num_codebooks)
        x = self.embed(codes)
        return x + sinusoidal_positions(positions, self.config.dim).astype(x.dtype)

    def logits(self, x: Array) -> Array:
        """Final norm + heads: `[B, T, D]` -> `[B, K, T, card]` float32."""
        return self.heads(self.final_norm(x))

    def forward(self, codes: Array, conds: Conditions, *, position_offset: int | Array = 0) -> Array:
        """Teacher-forced logits: codes `[B, K, S]`, conds from `encode_conditions` -> `[B, K, S, card]`."""
        prefix = conds.prefix_length
        x = self.embed_codes(codes, position_offset + prefix + jnp.arange(codes.shape[-1]))
        if prefix:
            x = jnp.concatenate([self.positioned_prefix(conds.prefix, position_offset), x], axis=1)
        x = self.run_layers(x, conds.cross, conds.cross_mask)
        return self.logits(x[:, prefix:] if prefix else x)

    def positioned_prefix(self, prefix: Array, position_offset: int | Array = 0) -> Array:
        """The fuser's prefix `[B, P, D]` in the compute dtype with the sinusoids of its positions added."""
        prefix = prefix.astype(jnp.dtype(self.config.compute_dtype))
        positions = position_offset + jnp.arange(prefix.shape[1])
        return prefix + sinusoidal_positions(positions, self.config.dim).astype(prefix.dtype)

    def run_layers(self, x: Array, cross: Array | None, cross_mask: Array | None) -> Array:
        """The layer stack in train mode (teacher-forced, no cache): `[B, T, D]` -> `[B, T, D]`."""
        x, _ = self.layers(x, cross, cross_mask)
        return x

    def init_cache(self, conds: Conditions, max_length: int, codes: Array | None = None) -> dict[str, Array]:
        """A cache for `max_length` code columns after the conditions (cross K/V computed once; a prefix run in
        prefill mode) and `codes` `[B, K, T]` (the prompt's first T columns, or None), also prefilled."""
        c = self.config
        dtype = jnp.dtype(c.compute_dtype)
        prefix = conds.prefix_length
        cache = dict(kvs.empty_self_attention(c.num_layers, conds.batch, prefix + max_length, c.num_heads,
                                              c.head_dim, dtype), index=jnp.zeros((), jnp.int32))
        cross, cross_mask = None, None
        if conds.cross is not None:
            _, cross = self.layers.cross_key_value(conds.cross.astype(dtype))
            cross, cross_mask = kvs.constrain_cross(cross), conds.cross_mask.astype(bool)
            cache.update(cross_k=cross["k"], cross_v=cross["v"], cross_mask=cross_mask)
        parts = []
        if prefix:
            parts.append(self.positioned_prefix(conds.prefix))
        if codes is not None and codes.shape[-1]:
            parts.append(self.embed_codes(codes, prefix + jnp.arange(codes.shape[-1])))
        if not parts:
            return cache
        x = jnp.concatenate(parts, axis=1)
        (_, kv, _), _ = self.layers.prefill((x, {"k": cache["k"], "v": cache["v"]}, jnp.zeros((), jnp.int32)),
                                            cross, cross_mask)
        return dict(cache, index=jnp.asarray(x.shape[1], jnp.int32), **kv)

    def prefill(self, cond: Array | None, cond_mask: Array | None, *, chroma: Array | None = None,
                max_length: int, codes: Array | None = None) -> dict[str, Array]:
        """`init_cache(encode_conditions(cond, cond_mask, chroma=chroma), max_length, codes)`."""
        return self.init_cache(self.encode_conditions(cond, cond_mask, chroma=chroma), max_length, codes)

    def decode_step(self, codes: Array, cache: dict[str, Array],
                    layer_params: tuple[dict, ...] | None = None) -> tuple[Array, dict[str, Array]]:
        """Decode mode: codes `[B, K, T]` (T = 1 for one step) at cache['index']
        -> (logits `[B, K, T, card]` float32, cache with the new K/V and index + T).

        With `layer_params` (and a cache in the per-layer layout, both from `kernels.cpu.split_for_decoding`) the
        layers run one after another, each on buffers of its own, instead of as a scan over the stacked params and
        cache."""
        index = cache["index"]
        seq = codes.shape[-1]
        x = self.embed_codes(codes, index + jnp.arange(seq))
        cross = {"k": cache["cross_k"], "v": cache["cross_v"]} if "cross_k" in cache else None
        mask = cache.get("cross_mask")
        kv = {"k": cache["k"], "v": cache["v"]}
        if layer_params is None:
            (x, kv, _), _ = self.layers.decode((x, kv, jnp.zeros((), jnp.int32)), cross, mask, index)
        else:
            x, kv = decode_layers_one_by_one(_layer_applier(self.config, mask, index), layer_params, x, kv, cross)
        return self.logits(x), dict(cache, index=index + seq, **kv)


def boxed_lm_params(config: LMConfig, text_dim: int, key: jax.Array) -> dict:
    """Random LM params as `init` returns them (logically partitioned boxes), for text states `text_dim` wide: the
    one LM init of inference (`mgjax.api`) and training (`mgjax.training`). A dummy batch of one step fixes the
    shapes (a melody model's chroma projection is made on the null melody)."""
    codes = jnp.zeros((1, config.num_codebooks, 1), jnp.int32)
    text = jnp.zeros((1, 1, text_dim), jnp.float32)
    return MusicGenLM(config).init(key, codes, text, jnp.ones((1, 1), bool))["params"]


def _layer_applier(config: LMConfig, cross_mask: Array | None, index: Array):
    """`apply_layer(params, x, kv, cross) -> (x, kv)` for `decode_layers_one_by_one`: one cached `DecoderLayer` on
    its own params and cache (shapes as `DecoderLayer.__call__` with a per-layer cache)."""
    layer = DecoderLayer(config, own_cache=True, cross_attention=uses_cross_attention(config),
                         parent=None)  # on its own params, not a submodule of the caller

    def apply_layer(params, x, kv, cross):
        (x, kv, _), _ = layer.apply({"params": params}, (x, kv, jnp.zeros((), jnp.int32)), cross, cross_mask, index,
                                    method=DecoderLayer.decode)
        return x, kv

    return apply_layer


# Matmul weights and the axes their matmul contracts (after the leading `layers` axis where stacked).
_INT8_CONTRACTED = {"q_proj": (1,), "k_proj": (1,), "v_proj": (1,), "out_proj": (1, 2), "fc1": (1,), "fc2": (1,)}


def _map_matmul_weights(params: dict, fn) -> dict:
    """The LM params with every attention/FFN/head matmul weight `w` replaced by the entries `fn(name, w,
    contracted_axes)` returns (a dict of name -> leaf); everything else as it is."""
    def walk(tree: dict, in_layers: bool) -> dict:
        out = {}
        for name, value in tree.items():
            if isinstance(value, dict):
                out[name] = walk(value, in_layers or name == "layers")
            elif in_layers and name in _INT8_CONTRACTED:
                out.update(fn(name, value, _INT8_CONTRACTED[name]))
            else:
                out[name] = value
        return out

    mapped = walk({k: v for k, v in params.items() if k != "heads"}, False)
    mapped["heads"] = fn("kernel", params["heads"]["kernel"], (1,))
    return mapped


def quantize_lm_params(params: dict) -> dict:
    """Float LM params -> the `weight_format='int8'` tree: every attention/FFN/head matmul weight becomes int8 with
    a float32 `<name>_scale` per output channel; embeddings, norms and condition projections stay float32."""
    return _map_matmul_weights(
        params, lambda name, w, axes: dict(zip((name, f"{name}_scale"), quantize_weight(w, axes))))


def cast_matmul_weights(params: dict, dtype) -> dict:
    """Float LM params with the matmul weights (attention, FFN, heads) stored in `dtype`: the values every matmul
    casts them to anyway when it computes in `dtype`, so the same logits, with half the bytes held and read per
    decoding step in a half dtype. Norms, embeddings and condition projections stay float32. Works on arrays and
    on `jax.ShapeDtypeStruct`s (sharding kept)."""
    def cast(name, w, _):
        if isinstance(w, jax.ShapeDtypeStruct):
            return {name: jax.ShapeDtypeStruct(w.shape, jnp.dtype(dtype), sharding=w.sharding)}
        return {name: w.astype(dtype)}

    return _map_matmul_weights(params, cast)


def weights_for_compute(params: dict, config: LMConfig) -> dict:
    """The LM params as a sampler holds them for `config.compute_dtype`: matmul weights cast to a half dtype
    (`cast_matmul_weights`), float32 and int8 weights as they are."""
    if jnp.dtype(config.compute_dtype).itemsize == 2 and config.weight_format != "int8":
        return cast_matmul_weights(params, config.compute_dtype)
    return params
