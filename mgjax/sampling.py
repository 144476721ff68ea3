"""Generation: one compiled function (prefill + a `lax.scan` over the pattern steps with an explicit KV cache); with
progress reporting, the same prefill and steps split over a few compiled calls.

Per step: embed the current column, decode one position (with the CPU kernels, the layers run one by one on split
weights, `kernels.cpu.split_for_decoding`), apply classifier-free guidance to the raw logits
(`uncond + (cond - uncond) * coef`, conditional and null conditions batched together), sample each codebook (greedy,
or temperature with top-p / top-k as audiocraft does), and write only the positions the pattern makes valid and no
prompt fixed. The pattern's index maps are numpy constants at trace time, so any pattern in `patterns.py` works.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mgjax.config import LMConfig
from mgjax.kernels.cpu import split_for_decoding
from mgjax.kernels.select import kernels_for
from mgjax.lm.model import MusicGenLM
from mgjax.lm.patterns import Pattern, pattern_from_config

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are picked. `top_p > 0` takes precedence over `top_k` (audiocraft's rule); `top_k <= 0` disables
    it. `cfg_coef == 1` turns guidance off (no null-condition batch)."""

    top_k: int = 250
    top_p: float = 0.0
    temperature: float = 1.0
    cfg_coef: float = 3.0
    greedy: bool = False

    def validate(self) -> "SamplingConfig":
        if not self.greedy and not 0 < self.temperature < float("inf"):
            raise ValueError(f"temperature must be finite and > 0 (got {self.temperature}); use greedy=True for argmax "
                             f"decoding")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in [0, 1], got {self.top_p}")
        if not 0 <= self.cfg_coef < float("inf"):
            raise ValueError(f"cfg_coef must be finite and >= 0, got {self.cfg_coef}")
        return self


def classifier_free_guidance(logits_2BxKxC: Array, coef: Array | float) -> Array:
    """`[2B, ...]` (conditional half first, then the null condition) -> `[B, ...]` guided logits."""
    cond, uncond = jnp.split(logits_2BxKxC, 2, axis=0)
    return uncond + (cond - uncond) * coef


def top_k_filter(logits: Array, k: int) -> Array:
    """Keeps the logits >= the k-th largest (ties kept), the rest -> -inf. `[..., card]`."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth_largest = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth_largest, logits, -jnp.inf)


def top_p_filter(logits: Array, p: Array | float) -> Array:
    """Keeps the smallest set of most probable tokens whose mass reaches p (ties at the edge kept). `[..., card]`."""
    probs = jax.nn.softmax(logits, axis=-1)
    sorted_probs = -jnp.sort(-probs, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    kept = jnp.maximum(jnp.sum(mass_before <= p, axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(sorted_probs, kept - 1, axis=-1)
    return jnp.where(probs >= threshold, logits, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class _LoopShape:
    """What of the sampling settings changes the compiled program (static); the rest is traced."""

    greedy: bool
    top_k: int
    use_top_p: bool
    use_cfg: bool

    @classmethod
    def of(cls, sampling: SamplingConfig) -> "_LoopShape":
        return cls(sampling.greedy, 0 if sampling.greedy else sampling.top_k,
                   (not sampling.greedy) and sampling.top_p > 0, sampling.cfg_coef != 1.0)


def sample_tokens(logits: Array, key: Array, shape: _LoopShape, temperature: Array | float,
                  top_p: Array | float) -> Array:
    """`[B, K, card]` float32 logits -> `[B, K]` int32 tokens."""
    if shape.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / temperature
    if shape.use_top_p:
        scaled = top_p_filter(scaled, top_p)
    else:
        scaled = top_k_filter(scaled, shape.top_k)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


# --- the compiled generation -------------------------------------------------------------------------------------
def write_masks(pattern: Pattern, frames: int, prompt_frames: int) -> tuple[np.ndarray, np.ndarray, int]:
    """`(writable [K, S], prompt_fixed [K, S], first step needing a new token)` for a generation of `frames`."""
    step_map = pattern.step_map(frames)
    writable = step_map >= prompt_frames
    prompt_fixed = (step_map >= 0) & (step_map < prompt_frames)
    steps_with_new = np.nonzero(writable.any(axis=0))[0]
    start = int(steps_with_new[0]) if len(steps_with_new) else step_map.shape[1]
    return writable, prompt_fixed, start


def _with_null_condition(x: Optional[Array]) -> Optional[Array]:
    """Appends the null text condition: zero states, zero mask (as transformers and audiocraft build it)."""
    return None if x is None else jnp.concatenate([x, jnp.zeros_like(x)], axis=0)


def _with_null_chroma(chroma: Optional[Array]) -> Optional[Array]:
    """Appends the null melody: a one-hot on bin 0 in every frame (transformers' encoding of "no melody")."""
    return None if chroma is None else jnp.concatenate([chroma, jnp.zeros_like(chroma).at[..., 0].set(1)], axis=0)


def split_layers_by_default(lm_params, kernels: str = "auto") -> bool:
    """Whether decoding runs the layers one by one on split weights, as the `kernels` set (`lm.kernels`) decides:
    the CPU's does unless host memory is short (`kernels.cpu.split_layers_by_default`), the plain one never."""
    return kernels_for(kernels).split_layers_by_default(lm_params)


def generate_codes(lm_params, cond: Array, cond_mask: Array, key: Array, prompt_codes: Array, *,
                   lm_config: LMConfig, frames: int, sampling: SamplingConfig, chroma: Optional[Array] = None,
                   progress: Optional[Callable[[int, int], None]] = None, progress_every: int = 0,
                   split_layers: Optional[bool] = None) -> Array:
    """Generates `[B, K, frames]` int32 codes with one compiled program.

    cond `[B, L, Dc]` text states, cond_mask `[B, L]`, prompt_codes `[B, K, Tp]` (Tp may be 0) kept as given,
    chroma `[B, F, 12]` for melody models, key a `jax.random` key. Temperature, top-p and the CFG coefficient are
    traced, so changing them does not recompile; greedy, top-k and guidance on/off do. `split_layers`: decode with
    the layers run one by one on split weights (None: `split_layers_by_default` for `lm_config.kernels`); the same
    tokens either way.
    With a `progress(steps done, steps total)` callback and `progress_every > 0`, the same steps run as a compiled
    prefill, then `progress_every` steps per call of one compiled program (the KV cache donated from call to call),
    `progress` called on the host between calls: the same tokens, and no host callback inside, so every program
    stays serialisable for the persistent compilation cache.
    """
    if progress_every <= 0 or progress is None:
        traced, statics, prompt_codes = _loop_arguments(lm_params, prompt_codes, lm_config=lm_config, frames=frames,
                                                        sampling=sampling, split_layers=split_layers)
        return _generate_codes(lm_params, cond, cond_mask, key, prompt_codes, chroma, *traced, **statics)
    for done, total, codes in generate_in_chunks(lm_params, cond, cond_mask, key, prompt_codes, lm_config=lm_config,
                                                 frames=frames, sampling=sampling, chroma=chroma,
                                                 steps_per_call=progress_every, split_layers=split_layers):
        progress(done, total)
    return codes


def _loop_arguments(lm_params, prompt_codes, *, lm_config: LMConfig, frames: int, sampling: SamplingConfig,
                    split_layers: Optional[bool]) -> tuple[tuple, dict, Array]:
    """`(traced settings, static arguments, prompt codes [B, K, Tp] int32)` of the compiled loops, checked."""
    sampling.validate()
    if not 0 <= prompt_codes.shape[-1] <= frames:
        raise ValueError(f"the audio prompt has {prompt_codes.shape[-1]} frames, more than the {frames} to generate")
    if split_layers is None:
        split_layers = split_layers_by_default(lm_params, lm_config.kernels)
    traced = (jnp.float32(sampling.cfg_coef), jnp.float32(sampling.temperature), jnp.float32(sampling.top_p))
    statics = dict(lm_config=lm_config, frames=frames, shape=_LoopShape.of(sampling), split_layers=bool(split_layers))
    return traced, statics, jnp.asarray(prompt_codes, jnp.int32)


def generate_in_chunks(lm_params, cond: Array, cond_mask: Array, key: Array, prompt_codes: Array, *,
                       lm_config: LMConfig, frames: int, sampling: SamplingConfig, chroma: Optional[Array] = None,
                       steps_per_call: int, split_layers: Optional[bool] = None) -> Iterator[tuple[int, int, Array]]:
    """`generate_codes` as a compiled prefill, then `steps_per_call` steps per call of one compiled program (the
    KV cache donated from call to call). Yields `(steps done, steps total, codes [B, K, frames])` for each call,
    once the next call is dispatched (JAX runs it while the caller reads these codes): the same tokens as one
    program; a code is final once its pattern step is done (`complete_frames`)."""
    traced, statics, prompt_codes = _loop_arguments(lm_params, prompt_codes, lm_config=lm_config, frames=frames,
                                                    sampling=sampling, split_layers=split_layers)
    seq, cache, layer_params = _start_generation(lm_params, cond, cond_mask, prompt_codes, chroma, **statics)
    first, num_steps = _step_range(lm_config, frames, prompt_codes.shape[-1])
    pending = None
    for done in range(0, num_steps - first, steps_per_call):
        seq, cache = _advance(lm_params, layer_params, seq, cache, key, jnp.int32(first + done), *traced,
                              lm_config=lm_config, frames=frames, shape=statics["shape"], steps=steps_per_call,
                              prompt_frames=prompt_codes.shape[-1])
        codes = _finish(seq, lm_config=lm_config, frames=frames)  # dispatched before the next call donates seq
        if pending is not None:  # yielded once the next call is on its way: the caller's work overlaps it
            yield pending
        pending = (min(done + steps_per_call, num_steps - first), num_steps - first, codes)
    if pending is not None:
        yield pending


def complete_frames(lm_config: LMConfig, frames: int, prompt_frames: int, steps_done: int) -> int:
    """How many leading frames of a generation have all their K codes once `steps_done` sampling steps ran (with
    the delay pattern, frame t's last codebook is sampled K - 1 steps after its first); prompt frames are given."""
    first, _ = _step_range(lm_config, frames, prompt_frames)
    last_step_T = pattern_from_config(lm_config).code_steps(frames).max(axis=0)
    complete_T = (np.arange(frames) < prompt_frames) | (last_step_T < first + steps_done)
    return int(np.argmin(complete_T)) if not complete_T.all() else frames


def steps_to_sample(lm_config: LMConfig, frames: int, prompt_frames: int) -> int:
    """How many pattern steps a generation of `frames` frames, the first `prompt_frames` given, samples (the
    `total` its progress reports count to)."""
    first, num_steps = _step_range(lm_config, frames, prompt_frames)
    return num_steps - first


def _step_range(lm_config: LMConfig, frames: int, prompt_frames: int) -> tuple[int, int]:
    """`(first step sampling a token, number of pattern steps)` of a generation."""
    writable, _, start = write_masks(pattern_from_config(lm_config), frames, prompt_frames)
    return start, writable.shape[1]


def _prepare(lm: MusicGenLM, lm_params, cond, cond_mask, prompt_codes, chroma, *, frames: int, use_cfg: bool,
             split_layers: bool):
    """Traced: the interleaved sequence `[B, K, S]` holding the prompt, the KV cache after the conditions and the
    prompt's columns, and the per-layer params when decoding on split layers (else None)."""
    lm_config = lm.config
    pattern = pattern_from_config(lm_config)
    batch, num_codebooks, prompt_frames = prompt_codes.shape
    special = lm_config.card
    writable, prompt_fixed, start = write_masks(pattern, frames, prompt_frames)
    variables = {"params": lm_params}
    if use_cfg:
        cond, cond_mask = _with_null_condition(cond), _with_null_condition(cond_mask)
        chroma = _with_null_chroma(chroma)
    padded_prompt = jnp.concatenate(
        [prompt_codes.astype(jnp.int32),
         jnp.zeros((batch, num_codebooks, frames - prompt_frames), jnp.int32)], axis=-1)
    seq = jnp.where(jnp.asarray(prompt_fixed)[None], pattern.build(padded_prompt, special), special)
    seq = seq.astype(jnp.int32)
    # the prompt's columns (before the first sampled one) go into the cache with the conditions, in prefill mode
    cache = lm.apply(variables, cond, cond_mask, chroma=chroma, max_length=writable.shape[1],
                     codes=_duplicate(seq[:, :, : start - 1], use_cfg), method=MusicGenLM.prefill)
    layer_params = None
    if split_layers:
        layer_params, cache = split_for_decoding(lm_params["layers"], cache)
    return seq, cache, layer_params


def _duplicate(x: Array, use_cfg: bool) -> Array:
    """The batch twice (conditional rows, then the null condition's) when guidance is on."""
    return jnp.concatenate([x, x], axis=0) if use_cfg else x


def _decoding_step(lm: MusicGenLM, lm_params, layer_params, writable_KxS: Array, key: Array, shape: _LoopShape,
                   cfg_coef, temperature, top_p):
    """Traced: `step((seq, cache), s)` for `lax.scan`: decode column s - 1, pick the tokens of column s and write
    them where the pattern allows."""
    variables = {"params": lm_params}

    def step(carry, s):
        seq, cache = carry
        column = jax.lax.dynamic_slice_in_dim(seq, s - 1, 1, axis=2)
        logits, cache = lm.apply(variables, _duplicate(column, shape.use_cfg), cache, layer_params,
                                 method=MusicGenLM.decode_step)
        logits = logits[:, :, 0]
        if shape.use_cfg:
            logits = classifier_free_guidance(logits, cfg_coef)
        tokens = sample_tokens(logits, jax.random.fold_in(key, s), shape, temperature, top_p)
        current = jax.lax.dynamic_slice_in_dim(seq, s, 1, axis=2)[:, :, 0]
        new = jnp.where(jax.lax.dynamic_slice_in_dim(writable_KxS, s, 1, axis=1)[:, 0][None], tokens, current)
        seq = jax.lax.dynamic_update_slice_in_dim(seq, new[:, :, None], s, axis=2)
        return (seq, cache), None

    return step


def _revert(seq: Array, lm_config: LMConfig, frames: int) -> Array:
    codes, _ = pattern_from_config(lm_config).revert(seq, lm_config.card, timesteps=frames)
    return codes.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("lm_config", "frames", "shape", "split_layers"))
def _generate_codes(lm_params, cond, cond_mask, key, prompt_codes, chroma, cfg_coef, temperature, top_p, *,
                    lm_config: LMConfig, frames: int, shape: _LoopShape, split_layers: bool = False) -> Array:
    lm = MusicGenLM(lm_config)
    seq, cache, layer_params = _prepare(lm, lm_params, cond, cond_mask, prompt_codes, chroma, frames=frames,
                                        use_cfg=shape.use_cfg, split_layers=split_layers)
    writable, _, start = write_masks(pattern_from_config(lm_config), frames, prompt_codes.shape[-1])
    step = _decoding_step(lm, lm_params, layer_params, jnp.asarray(writable), key, shape, cfg_coef, temperature,
                          top_p)
    (seq, _), _ = jax.lax.scan(step, (seq, cache), jnp.arange(start, writable.shape[1]))
    return _revert(seq, lm_config, frames)


# --- the same generation in calls of a few steps (progress reported between calls) ----------------------------
@functools.partial(jax.jit, static_argnames=("lm_config", "frames", "shape", "split_layers"))
def _start_generation(lm_params, cond, cond_mask, prompt_codes, chroma, *, lm_config: LMConfig, frames: int,
                      shape: _LoopShape, split_layers: bool):
    """`(seq, cache, layer_params)` as `_generate_codes` has them before its first sampling step."""
    return _prepare(MusicGenLM(lm_config), lm_params, cond, cond_mask, prompt_codes, chroma, frames=frames,
                    use_cfg=shape.use_cfg, split_layers=split_layers)


@functools.partial(jax.jit, static_argnames=("lm_config", "frames", "shape", "steps", "prompt_frames"),
                   donate_argnames=("seq", "cache"))
def _advance(lm_params, layer_params, seq, cache, key, first_step, cfg_coef, temperature, top_p, *,
             lm_config: LMConfig, frames: int, shape: _LoopShape, steps: int, prompt_frames: int):
    """Steps `first_step .. first_step + steps - 1` of the generation (those past its last step do nothing);
    `layer_params` None decodes on the stacked weights, per-layer params on the split ones."""
    lm = MusicGenLM(lm_config)
    writable, _, _ = write_masks(pattern_from_config(lm_config), frames, prompt_frames)
    step = _decoding_step(lm, lm_params, layer_params, jnp.asarray(writable), key, shape, cfg_coef, temperature,
                          top_p)

    def step_if_in_range(carry, s):
        return jax.lax.cond(s < writable.shape[1], lambda c: step(c, s)[0], lambda c: c, carry), None

    (seq, cache), _ = jax.lax.scan(step_if_in_range, (seq, cache), first_step + jnp.arange(steps))
    return seq, cache


@functools.partial(jax.jit, static_argnames=("lm_config", "frames"))
def _finish(seq, *, lm_config: LMConfig, frames: int) -> Array:
    return _revert(seq, lm_config, frames)
