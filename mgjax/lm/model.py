"""The MusicGen decoder LM: codebook embeddings, condition projections, scanned layers, per-codebook heads.

Entry points (all through `MusicGenLM(config).apply(params, ..., method=...)`):

    logits = lm(codes, cond, cond_mask, chroma=None)              # teacher-forced, [B, K, S, card] float32
    conds = lm.encode_conditions(cond, cond_mask, chroma=None)    # {'states': [B, Lc, D], 'mask': [B, Lc] bool}
    logits = lm.forward(codes, conds)                             # teacher-forced from encoded conditions
    cache = lm.prefill(cond, cond_mask, chroma=None, max_length=S)  # = init_cache(encode_conditions(...), S)
    logits, cache = lm.decode_step(codes, cache)                  # codes [B, K, T] (T=1 per step) at cache['index']

Conditioning: 'cross' attends to `conds['states']` in every layer (key padding masked by `conds['mask']`, as
transformers does); 'prepend' (melody) puts `conds['states']` = concat(projected chroma, projected text) before
the code embeddings and drops the prefix logits. In both, the projected text is zeroed where the mask is 0
(after the projection, bias included). A CFG sampler builds its null condition by zeroing `conds` (zero states,
zero mask), the same as transformers' generate.

KV cache (an explicit pytree, float in the compute dtype):
    {'index': int32 [] (next write position), 'k', 'v': [L, B, H, P + max_length, Dh],
     'cross_k', 'cross_v': [L, B, Lc, H, Dh] and 'cross_mask': [B, Lc] (cross only)}
where P is the prefix length (0 for cross). Positions are cache positions: the code column t sits at P + t.
`CACHE_AXES` names the logical axes of each entry (`mgjax.sharding.LOGICAL_RULES` maps them: batch over
data/fsdp, heads over tensor), and `init_cache` constrains the cache to them.
`kernels.cpu.split_for_decoding` gives the same cache with each of 'k', 'v', 'cross_k', 'cross_v' as a tuple of L
per-layer arrays, for `decode_step(codes, cache, layer_params)` (what the CPU sampler runs).

The projections, feed-forward, heads and that decoding layout come in two formulations, chosen by `lm.kernels`
(`mgjax.kernels.select`): the plain einsums, or the CPU's.
"""
from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn

from mgjax.config import LMConfig
from mgjax.kernels.cpu import decode_layers_one_by_one
from mgjax.kernels.select import kernels_for
from mgjax.sharding import constrain
from mgjax.lm.transformer import (DecoderLayer, LayerNorm, default_init, param_with_axes, project, quantize_weight,
                                  scanned_layers, sinusoidal_positions)

Array = jax.Array

# Logical axes of the KV cache's entries (see the module docstring for the layout).
CACHE_AXES = {
    "index": (),
    "k": ("cache_layers", "cache_batch", "cache_heads", "cache_length", "cache_kv"),
    "v": ("cache_layers", "cache_batch", "cache_heads", "cache_length", "cache_kv"),
    "cross_k": ("cache_layers", "cache_batch", "cache_length", "cache_heads", "cache_kv"),
    "cross_v": ("cache_layers", "cache_batch", "cache_length", "cache_heads", "cache_kv"),
    "cross_mask": ("cache_batch", "cache_length"),
}


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


def projection(config: LMConfig, name: str) -> nn.Dense:
    """Dense with bias from a condition width to `dim` (`enc_to_dec_proj`, `audio_enc_to_dec_proj`)."""
    return nn.Dense(config.dim, use_bias=True, dtype=jnp.dtype(config.compute_dtype), param_dtype=jnp.float32,
                    kernel_init=nn.with_logical_partitioning(default_init, (None, "embed")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), name=name)


def tile_to_length(x: Array, length: int) -> Array:
    """`[B, F, C]` -> `[B, length, C]`: repeated whole when shorter, truncated when longer (transformers' melody)."""
    repeats = math.ceil(length / x.shape[1])
    return jnp.tile(x, (1, repeats, 1))[:, :length]


class MusicGenLM(nn.Module):
    """MusicGen decoder; see the module docstring for the methods and the cache layout."""

    config: LMConfig

    def setup(self):
        c = self.config
        self.embed = CodebookEmbed(c)
        self.enc_to_dec_proj = projection(c, "enc_to_dec_proj")
        if c.conditioning == "prepend":
            self.audio_enc_to_dec_proj = projection(c, "audio_enc_to_dec_proj")
        self.layers = scanned_layers(c)
        self.final_norm = LayerNorm(c.layer_norm_eps, jnp.dtype(c.compute_dtype))
        self.heads = CodebookHeads(c)

    @property
    def prepend(self) -> bool:
        return self.config.conditioning == "prepend"

    def __call__(self, codes: Array, cond: Array | None, cond_mask: Array | None, *, chroma: Array | None = None,
                 position_offset: int | Array = 0) -> Array:
        """codes `[B, K, S]` int32, cond `[B, L, Dc]` text states, cond_mask `[B, L]`, chroma `[B, F, C]` (melody)
        -> logits `[B, K, S, card]` float32 (teacher-forced)."""
        return self.forward(codes, self.encode_conditions(cond, cond_mask, chroma=chroma),
                            position_offset=position_offset)

    def encode_conditions(self, cond: Array | None, cond_mask: Array | None, *,
                          chroma: Array | None = None) -> dict[str, Array]:
        """Projects the conditions to the model width.

        cond `[B, L, Dc]` (or None: no text), cond_mask `[B, L]` (None: all valid), chroma `[B, F, num_chroma]`
        (prepend only; None: transformers' default, a one-hot on bin 0). Returns
        `{'states': [B, Lc, D], 'mask': [B, Lc] bool}`; for prepend Lc = chroma_length + L and the mask is all
        True (transformers does not mask the prefix in self-attention; padded text is zeros there).
        """
        c = self.config
        parts, masks = [], []
        if self.prepend:
            if chroma is None:
                if cond is None:
                    raise ValueError("MusicGenLM needs a text condition (cond) or, for prepend models, chroma")
                chroma = jnp.zeros((cond.shape[0], 1, c.num_chroma), jnp.float32).at[:, :, 0].set(1.0)
            chex.assert_shape(chroma, (None, None, c.num_chroma))
            parts.append(tile_to_length(self.audio_enc_to_dec_proj(chroma), c.chroma_length))
            masks.append(jnp.ones(parts[-1].shape[:2], bool))
        if cond is not None:
            if cond_mask is None:
                cond_mask = jnp.ones(cond.shape[:2], bool)
            chex.assert_equal_shape_prefix([cond, cond_mask], 2)
            cond_mask = cond_mask.astype(bool)
            parts.append(self.enc_to_dec_proj(cond) * cond_mask[..., None].astype(jnp.dtype(c.compute_dtype)))
            masks.append(jnp.ones_like(cond_mask) if self.prepend else cond_mask)
        if not parts:
            raise ValueError("MusicGenLM needs a text condition (cond) or, for prepend models, chroma")
        return {"states": jnp.concatenate(parts, axis=1), "mask": jnp.concatenate(masks, axis=1)}

    def embed_codes(self, codes: Array, positions: Array) -> Array:
        """codes `[B, K, T]`, positions `[T]` -> `[B, T, D]` (embeddings + sinusoids)."""
        chex.assert_rank(codes, 3)
        chex.assert_axis_dimension(codes, 1, self.config.num_codebooks)
        x = self.embed(codes)
        return x + sinusoidal_positions(positions, self.config.dim).astype(x.dtype)

    def logits(self, x: Array) -> Array:
        """Final norm + heads: `[B, T, D]` -> `[B, K, T, card]` float32."""
        return self.heads(self.final_norm(x))

    def forward(self, codes: Array, conds: dict[str, Array], *, position_offset: int | Array = 0) -> Array:
        """Teacher-forced logits: codes `[B, K, S]`, conds from `encode_conditions` -> `[B, K, S, card]`."""
        seq = codes.shape[-1]
        if self.prepend:
            states = conds["states"].astype(jnp.dtype(self.config.compute_dtype))
            prefix = states.shape[1]
            x = jnp.concatenate([states + sinusoidal_positions(position_offset + jnp.arange(prefix),
                                                               self.config.dim).astype(states.dtype),
                                 self.embed_codes(codes, position_offset + prefix + jnp.arange(seq))], axis=1)
            x = self.run_layers(x, None, None, None)
            return self.logits(x[:, prefix:])
        x = self.embed_codes(codes, position_offset + jnp.arange(seq))
        x = self.run_layers(x, conds["states"], conds["mask"], None)
        return self.logits(x)

    def run_layers(self, x: Array, cond: Array | None, cond_mask: Array | None, index: Array | None) -> Array:
        """The layer stack without a cache (teacher-forced): `[B, T, D]` -> `[B, T, D]`."""
        (x, _, _), _ = self.layers((x, None, jnp.zeros((), jnp.int32)), cond, cond_mask, None, index)
        return x

    def init_cache(self, conds: dict[str, Array], max_length: int) -> dict[str, Array]:
        """An empty cache for `max_length` code columns; cross K/V computed once; a prepend prefix already run."""
        c = self.config
        dtype = jnp.dtype(c.compute_dtype)
        states = conds["states"].astype(dtype)
        batch, prefix = states.shape[0], (states.shape[1] if self.prepend else 0)
        shape = (c.num_layers, batch, c.num_heads, prefix + max_length, c.head_dim)
        empty = constrain(jnp.zeros(shape, dtype), CACHE_AXES["k"])
        cache = {"index": jnp.zeros((), jnp.int32), "k": empty, "v": empty}
        if not self.prepend:
            _, cross = self.layers.cross_key_value(states)
            cross = {name: constrain(value, CACHE_AXES["cross_k"]) for name, value in cross.items()}
            return dict(cache, cross_k=cross["k"], cross_v=cross["v"], cross_mask=conds["mask"].astype(bool))
        x = states + sinusoidal_positions(jnp.arange(prefix), c.dim).astype(dtype)
        (_, kv, _), _ = self.layers((x, {"k": cache["k"], "v": cache["v"]}, jnp.zeros((), jnp.int32)),
                                    None, None, None, cache["index"])
        return dict(cache, index=jnp.asarray(prefix, jnp.int32), **kv)

    def prefill(self, cond: Array | None, cond_mask: Array | None, *, chroma: Array | None = None,
                max_length: int) -> dict[str, Array]:
        """`init_cache(encode_conditions(cond, cond_mask, chroma=chroma), max_length)`."""
        return self.init_cache(self.encode_conditions(cond, cond_mask, chroma=chroma), max_length)

    def decode_step(self, codes: Array, cache: dict[str, Array],
                    layer_params: tuple[dict, ...] | None = None) -> tuple[Array, dict[str, Array]]:
        """codes `[B, K, T]` (T = 1 for one step; more to feed a prompt) at cache['index']
        -> (logits `[B, K, T, card]` float32, cache with the new K/V and index + T).

        With `layer_params` (and a cache in the same split layout, both from `kernels.cpu.split_for_decoding`) the
        layers run one after another, each on buffers of its own, instead of as a scan over the stacked params and
        cache."""
        index = cache["index"]
        seq = codes.shape[-1]
        x = self.embed_codes(codes, index + jnp.arange(seq))
        cross = None if self.prepend else {"k": cache["cross_k"], "v": cache["cross_v"]}
        mask = None if self.prepend else cache["cross_mask"]
        kv = {"k": cache["k"], "v": cache["v"]}
        if layer_params is None:
            (x, kv, _), _ = self.layers((x, kv, jnp.zeros((), jnp.int32)), None, mask, cross, index)
        else:
            x, kv = decode_layers_one_by_one(_layer_applier(self.config, mask, index), layer_params, x, kv, cross)
        return self.logits(x), dict(cache, index=index + seq, **kv)


def _layer_applier(config: LMConfig, cross_mask: Array | None, index: Array):
    """`apply_layer(params, x, kv, cross) -> (x, kv)` for `decode_layers_one_by_one`: one cached `DecoderLayer` on
    its own params and cache (shapes as `DecoderLayer.__call__` with a per-layer cache)."""
    layer = DecoderLayer(config, parent=None)  # applied on its own params, not a submodule of the caller

    def apply_layer(params, x, kv, cross):
        (x, kv, _), _ = layer.apply({"params": params}, (x, kv, jnp.zeros((), jnp.int32)), None, cross_mask, cross,
                                    index)
        return x, kv

    return apply_layer


# Matmul weights and the axes their matmul contracts (after the leading `layers` axis where stacked).
_INT8_CONTRACTED = {"q_proj": (1,), "k_proj": (1,), "v_proj": (1,), "out_proj": (1, 2), "fc1": (1,), "fc2": (1,)}


def quantize_lm_params(params: dict) -> dict:
    """Float LM params -> the `weight_format='int8'` tree: every attention/FFN/head matmul weight becomes int8 with
    a float32 `<name>_scale` per output channel; embeddings, norms and condition projections stay float32."""
    def walk(tree: dict, in_layers: bool) -> dict:
        out = {}
        for name, value in tree.items():
            if isinstance(value, dict):
                out[name] = walk(value, in_layers or name == "layers")
            elif in_layers and name in _INT8_CONTRACTED:
                out[name], out[f"{name}_scale"] = quantize_weight(value, _INT8_CONTRACTED[name])
            else:
                out[name] = value
        return out

    quantized = walk({k: v for k, v in params.items() if k != "heads"}, False)
    quantized["heads"] = dict(zip(("kernel", "kernel_scale"), quantize_weight(params["heads"]["kernel"], (1,))))
    return quantized
