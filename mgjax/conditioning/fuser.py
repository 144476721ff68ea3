"""The condition fuser: how the conditions reach the LM.

A fuser turns the conditions as they arrive, T5 text states `[B, L, Dt]` with their mask `[B, L]` and, for melody
models, a one-hot chroma `[B, F, num_chroma]`, into the decoder's two ways in (`Conditions`):

    prefix      [B, P, D] or None    positions put before the code embeddings: the LM adds their sinusoids, runs
                                     them through self-attention like codes and drops their logits
    cross       [B, Lc, D] or None   states every layer cross-attends to
    cross_mask  [B, Lc] bool / None  which cross positions are real (key padding, as transformers masks it)

The LM knows only these three. One class per way of conditioning, picked from `lm.conditioning` in `FUSERS` (the
one place that reads that string):

    'cross'    TextCrossAttention  text -> enc_to_dec_proj -> cross                       (MusicGen text models)
    'prepend'  MelodyTextPrefix    [chroma -> audio_enc_to_dec_proj, tiled to chroma_length;
                                    text -> enc_to_dec_proj] -> prefix, no cross-attention (MusicGen-melody)

In both the projected text is zeroed where its mask is 0 (after the projection, bias included). The melody prefix is
not masked in self-attention (transformers does not; padded text is zeros there). A CFG sampler's null condition is
zero text states with a zero mask and, for melody, the null chroma (`chroma.null_chroma`).

A fuser's params sit directly in the LM's param tree (`nn.share_scope`), under the names transformers gives them
(`enc_to_dec_proj`, `audio_enc_to_dec_proj`): converters, checkpoints and the weight maps see one flat LM tree.

A new condition is one new subclass: its `__call__`, `projections` (param name -> input width, which the weight
maps read), the class flags `cross_attention` (the decoder layers then hold cross-attention) and `takes_melody`,
and an entry in `FUSERS` (its name also in `mgjax.config.CONDITIONINGS`, which config loading checks without
JAX). Code outside asks `fuser_for(config)`, `takes_melody(config)` or `uses_cross_attention(config)`, never
the string.
"""
from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn

from mgjax.config import CONDITIONINGS, LMConfig
from mgjax.lm.transformer import default_init

Array = jax.Array


class Conditions(NamedTuple):
    """What the LM consumes (see the module docstring): prefix `[B, P, D]`, cross `[B, Lc, D]`, cross_mask
    `[B, Lc]` bool; each None when the fuser gives none."""

    prefix: Array | None
    cross: Array | None
    cross_mask: Array | None

    @property
    def prefix_length(self) -> int:
        return 0 if self.prefix is None else self.prefix.shape[1]

    @property
    def batch(self) -> int:
        return (self.prefix if self.prefix is not None else self.cross).shape[0]


def projection(config: LMConfig, name: str) -> nn.Dense:
    """Dense with bias from a condition width to `dim` (`enc_to_dec_proj`, `audio_enc_to_dec_proj`)."""
    return nn.Dense(config.dim, use_bias=True, dtype=jnp.dtype(config.compute_dtype), param_dtype=jnp.float32,
                    kernel_init=nn.with_logical_partitioning(default_init, (None, "embed")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), name=name)


def tile_to_length(x: Array, length: int) -> Array:
    """`[B, F, C]` -> `[B, length, C]`: repeated whole when shorter, truncated when longer (transformers' melody)."""
    repeats = math.ceil(length / x.shape[1])
    return jnp.tile(x, (1, repeats, 1))[:, :length]


class ConditionFuser(nn.Module):
    """(text `[B, L, Dt]` or None, text_mask `[B, L]` or None (all valid), chroma `[B, F, num_chroma]` or None)
    -> `Conditions`. Subclasses declare their projections and flags and write `__call__`."""

    config: LMConfig
    cross_attention: ClassVar[bool] = False  # the decoder layers hold cross-attention
    takes_melody: ClassVar[bool] = False  # chroma is an input (melody models)

    @classmethod
    def projections(cls, config: LMConfig) -> dict[str, int | None]:
        """Param name -> input width of each projection (None: the text width, fixed by the checkpoint)."""
        return {"enc_to_dec_proj": None}

    def setup(self):
        for name in self.projections(self.config):
            setattr(self, name, projection(self.config, name))

    def project_text(self, text: Array, text_mask: Array | None) -> tuple[Array, Array]:
        """text `[B, L, Dt]`, mask `[B, L]` (None: all valid) -> (projected text zeroed at padding `[B, L, D]` in
        the compute dtype, mask `[B, L]` bool)."""
        if text_mask is None:
            text_mask = jnp.ones(text.shape[:2], bool)
        chex.assert_equal_shape_prefix([text, text_mask], 2)
        text_mask = text_mask.astype(bool)
        projected = self.enc_to_dec_proj(text) * text_mask[..., None].astype(jnp.dtype(self.config.compute_dtype))
        return projected, text_mask

    def __call__(self, text: Array | None, text_mask: Array | None, chroma: Array | None = None) -> Conditions:
        raise NotImplementedError


class TextCrossAttention(ConditionFuser):
    """Text states projected to the model width, attended to by every layer (MusicGen's text models)."""

    cross_attention: ClassVar[bool] = True

    def __call__(self, text, text_mask, chroma=None) -> Conditions:
        if text is None:
            raise ValueError("MusicGenLM needs a text condition (cond)")
        if chroma is not None:
            raise ValueError("this model conditions on text only (lm.conditioning='cross'): no chroma")
        projected, mask = self.project_text(text, text_mask)
        return Conditions(prefix=None, cross=projected, cross_mask=mask)


class MelodyTextPrefix(ConditionFuser):
    """[projected chroma tiled to `chroma_length`; projected text] prepended to the codes (MusicGen-melody)."""

    takes_melody: ClassVar[bool] = True

    @classmethod
    def projections(cls, config: LMConfig) -> dict[str, int | None]:
        return {"enc_to_dec_proj": None, "audio_enc_to_dec_proj": config.num_chroma}

    def __call__(self, text, text_mask, chroma=None) -> Conditions:
        c = self.config
        if chroma is None:  # transformers' default: one frame, a one-hot on bin 0 (the null melody)
            if text is None:
                raise ValueError("MusicGenLM needs a text condition (cond) or, for prepend models, chroma")
            chroma = jnp.zeros((text.shape[0], 1, c.num_chroma), jnp.float32).at[:, :, 0].set(1.0)
        chex.assert_shape(chroma, (None, None, c.num_chroma))
        parts = [tile_to_length(self.audio_enc_to_dec_proj(chroma), c.chroma_length)]
        if text is not None:
            parts.append(self.project_text(text, text_mask)[0])
        return Conditions(prefix=jnp.concatenate(parts, axis=1), cross=None, cross_mask=None)


FUSERS: dict[str, type[ConditionFuser]] = {"cross": TextCrossAttention, "prepend": MelodyTextPrefix}
if tuple(FUSERS) != CONDITIONINGS:  # config.py validates lm.conditioning without importing JAX, by these names
    raise ImportError(f"mgjax.config.CONDITIONINGS {CONDITIONINGS} must name the fusers {tuple(FUSERS)}")


def fuser_for(config: LMConfig) -> type[ConditionFuser]:
    """The fuser class of `config.conditioning`."""
    return FUSERS[config.conditioning]


def takes_melody(config: LMConfig) -> bool:
    """Whether the model takes a melody (chroma): MusicGen-melody."""
    return fuser_for(config).takes_melody


def uses_cross_attention(config: LMConfig) -> bool:
    """Whether the decoder layers hold cross-attention to the conditions."""
    return fuser_for(config).cross_attention
