"""Codebook interleaving patterns (audiocraft's `codebooks_patterns`) as static numpy index maps.

A pattern lays the K parallel code streams `codes [B, K, T]` out as a sequence `seq [B, K, S]` that the LM reads
one step at a time. The layout for T timesteps is a list of S steps; step s holds a set of coordinates (t, k)
("codebook k of timestep t"), at most one per codebook. Conventions, all as in audiocraft:

- Step 0 is empty: the LM's first input is the special token on every codebook. The one exception is
  `empty_initial=-1` (delay and parallel patterns; MAGNeT's configs use it), which omits that step: the layout
  starts with codes, as audiocraft's `omit_special_token`.
- The LM output at step s predicts the tokens of step s + 1 (`revert_logits` does that shift) when step 0 is empty,
  and the tokens of step s itself otherwise (audiocraft shifts only a layout that starts with an empty step; a
  non-autoregressive model such as MAGNeT predicts the masked tokens of its own input, so `LMConfig` refuses such a
  layout for MusicGen's causal LM).
- Positions of the sequence with no code, or with a code of timestep >= T (patterns such as delay lay those out
  past the end), hold the special token.
- The full layout (`valid_only=False`, audiocraft's default) is what generation runs over: every code has a step.
  Training feeds only the *valid* prefix (audiocraft's `keep_only_valid_steps=True`): the layout minus its last
  `max_delay` steps, where `max_delay = (largest t in the layout + 1) - T`. Codes whose step falls outside the fed
  sequence are masked out of the loss (for the delay pattern: codebook k at t >= T - delay_k).

Example, delay pattern, K=3, T=4, codes `a0..a3 / b0..b3 / c0..c3`, `_` the special token:

    step     0  1  2  3  4  5  6          full: S = T + max(delays) + 1 = 7
    k=0      _  a0 a1 a2 a3 _  _          valid (training): S = 5, so a0..a3, b0..b2, c0..c1 are trained
    k=1      _  _  b0 b1 b2 b3 _
    k=2      _  _  _  c0 c1 c2 c3

Index maps are computed in numpy once per (pattern, T) and cached; `build` / `revert` / `revert_logits` are gathers
that work on numpy and jax arrays alike (inside `jax.jit` the maps are constants, T and S are static shapes).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import numpy as np

Layout = list[list[tuple[int, int]]]  # per step, the (t, k) coordinates it holds


class IndexMaps(NamedTuple):
    """The static maps of one pattern for T timesteps (arrays are read-only)."""

    step_map: np.ndarray  # [K, S] int32: timestep held by codebook k at step s, -1 where none (or t >= T)
    code_steps: np.ndarray  # [K, T] int32: step holding code (k, t); S if the layout never places it
    num_steps: int  # S of the full layout (generation)
    valid_steps: int  # S of the valid prefix (training)
    starts_with_special: bool  # step 0 is empty (every pattern but empty_initial=-1): outputs predict the next step


class Pattern:
    """Base class: a subclass is a frozen dataclass with `num_codebooks` that defines `layout(T)`."""

    num_codebooks: int

    def layout(self, timesteps: int) -> Layout:
        """The full layout for `timesteps` steps: a list of steps, each a list of (t, k); step 0 is empty unless
        the pattern omits the special step (`empty_initial=-1`)."""
        raise NotImplementedError

    def index_maps(self, timesteps: int) -> IndexMaps:
        """Cached `IndexMaps` for T = `timesteps`."""
        return _index_maps(self, int(timesteps))

    def steps(self, timesteps: int, valid_only: bool = False) -> int:
        """Sequence length S (leading special step included) for T timesteps: full layout, or its valid prefix."""
        maps = self.index_maps(timesteps)
        return maps.valid_steps if valid_only else maps.num_steps

    def step_map(self, timesteps: int) -> np.ndarray:
        """`[K, S]` int32 (full layout): the timestep that codebook k holds at step s, or -1 (special token).

        During generation, position (k, s) is to be written with a sampled token iff `step_map[k, s] >= 0`.
        """
        return self.index_maps(timesteps).step_map

    def starts_with_special_token(self, timesteps: int) -> bool:
        """Whether the T-timestep layout starts with an empty step (audiocraft's `starts_with_special_token`): then
        the output at step s predicts step s + 1, else step s (`revert_logits`)."""
        return self.index_maps(timesteps).starts_with_special

    def code_steps(self, timesteps: int) -> np.ndarray:
        """`[K, T]` int32: the step of the full layout that holds code (k, t) (the inverse of `step_map`)."""
        return self.index_maps(timesteps).code_steps

    def first_step_with_timestep(self, t: int, timesteps: int, codebook: Optional[int] = None) -> int:
        """First step of the T-timestep layout that holds timestep `t` (of `codebook`, or of any codebook).

        For continuing an audio prompt of `t` frames, generation starts writing at this step: every earlier step
        only holds prompt codes (or special tokens). `t = 0` (no prompt) gives the first step after the empty one.
        """
        if not 0 <= t < timesteps:
            raise ValueError(f"timestep {t} is outside the pattern's range [0, {timesteps})")
        column = self.code_steps(timesteps)[:, t]
        return int(column.min() if codebook is None else column[codebook])

    def build(self, codes: Any, special_token: int, valid_only: bool = False) -> Any:
        """`codes [B, K, T]` -> `seq [B, K, S]`, positions without a code set to `special_token`.

        `valid_only=True` keeps the valid prefix only (what training feeds the LM); the default is the full
        layout (generation). Codes may hold any value (e.g. -1 for "not generated yet"); they are copied as is.
        """
        _, _, timesteps = self._check(codes, "codes")
        maps = self.index_maps(timesteps)
        length = maps.valid_steps if valid_only else maps.num_steps
        step_map = maps.step_map[:, :length]
        return _gather(codes, step_map, step_map >= 0, special_token)

    def revert(self, seq: Any, special_token: int, timesteps: Optional[int] = None) -> tuple[Any, np.ndarray]:
        """`seq [B, K, S]` -> `(codes [B, K, T], mask [K, T] bool)`.

        mask[k, t] is True iff the step holding code (k, t) lies in `seq` (S may be shorter than the full layout);
        masked codes are `special_token`. T defaults to the T whose full layout has S steps.
        """
        _, _, length = self._check(seq, "seq")
        timesteps = self._resolve_timesteps(length, timesteps, valid_only=False)
        code_steps = self.code_steps(timesteps)
        mask = code_steps < length
        return _gather(seq, code_steps, mask, special_token), _readonly(mask)

    def revert_logits(self, logits: Any, timesteps: Optional[int] = None,
                      fill_value: float = 0.0) -> tuple[Any, np.ndarray]:
        """`logits [B, K, S, card]` (LM output on a built sequence) -> `(logits [B, K, T, card], mask [K, T])`.

        The output at step s predicts step s + 1, so code (k, t) at step s_kt takes the logits of step s_kt - 1
        (of step s_kt itself for a layout without the leading empty step, `starts_with_special_token`, as
        audiocraft). mask[k, t] is True iff s_kt < S, i.e. the code was part of the fed sequence; the last step's
        logits predict nothing that was fed and are dropped. With the valid prefix fed (training) this is exactly
        the set of positions audiocraft trains on. Masked positions hold `fill_value` (audiocraft uses NaN; 0 keeps
        gradients finite). T defaults to the T whose *valid* layout has S steps (the training case).
        """
        _, _, length = self._check(logits, "logits", ndim=4)
        timesteps = self._resolve_timesteps(length, timesteps, valid_only=True)
        maps = self.index_maps(timesteps)
        mask = maps.code_steps < length
        shift = 1 if maps.starts_with_special else 0
        return _gather(logits, maps.code_steps - shift, mask, fill_value), _readonly(mask)

    def _check(self, x: Any, name: str, ndim: int = 3) -> tuple[int, int, int]:
        if x.ndim != ndim or x.shape[1] != self.num_codebooks:
            want = "[B, K, S, card]" if ndim == 4 else "[B, K, T|S]"
            raise ValueError(f"{name} must be {want} with K={self.num_codebooks}, got shape {tuple(x.shape)}")
        return int(x.shape[0]), int(x.shape[1]), int(x.shape[2])

    def _resolve_timesteps(self, length: int, timesteps: Optional[int], valid_only: bool) -> int:
        if timesteps is None:
            return _infer_timesteps(self, length, valid_only)
        if length > self.steps(timesteps):
            raise ValueError(f"sequence of {length} steps is longer than the {self.steps(timesteps)}-step layout "
                             f"for T={timesteps}")
        return int(timesteps)


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _gather(x: Any, index: np.ndarray, valid: np.ndarray, fill: Any) -> Any:
    """`x [B, K, N, ...]`, `index [K, M]` -> `[B, K, M, ...]` with `out[:, k, m] = x[:, k, index[k, m]]` where
    `valid [K, M]`, else `fill`. A gather then a select: no padded copy of `x` (logits can be large). numpy in,
    numpy out; a jax array (or tracer) goes through its own namespace, `jax.numpy`."""
    xp = np if isinstance(x, np.ndarray) else x.__array_namespace__()
    rows = np.arange(index.shape[0])[:, None]
    gathered = x[:, rows, np.where(valid, index, 0)]
    valid = valid.reshape((1,) + valid.shape + (1,) * (x.ndim - 3))
    return xp.where(valid, gathered, xp.asarray(fill, dtype=x.dtype))


def _lengths(layout: Layout, timesteps: int) -> tuple[int, int]:
    """(S of the full layout, S of its valid prefix), with audiocraft's `max_delay` rule."""
    last = max((t + 1 for coords in layout for t, _ in coords), default=0)
    max_delay = last - timesteps
    return len(layout), len(layout) - max(max_delay, 0)


@functools.lru_cache(maxsize=256)
def _index_maps(pattern: Pattern, timesteps: int) -> IndexMaps:
    if timesteps < 1:
        raise ValueError(f"a pattern needs at least one timestep, got T={timesteps}")
    layout = pattern.layout(timesteps)
    if not layout:
        raise ValueError(f"{pattern} lays out no step")
    num_steps, valid_steps = _lengths(layout, timesteps)
    step_map = np.full((pattern.num_codebooks, num_steps), -1, np.int32)
    code_steps = np.full((pattern.num_codebooks, timesteps), num_steps, np.int32)
    for s, coords in enumerate(layout):
        for t, k in coords:
            if t < timesteps:
                step_map[k, s] = t
                code_steps[k, t] = s
    return IndexMaps(_readonly(step_map), _readonly(code_steps), num_steps, valid_steps, not layout[0])


@functools.lru_cache(maxsize=256)
def _infer_timesteps(pattern: Pattern, length: int, valid_only: bool) -> int:
    """The T whose (full or valid) layout has `length` steps; S grows strictly with T, so bisect on [1, length]."""
    def steps(t: int) -> int:
        full, valid = _lengths(pattern.layout(t), t)
        return valid if valid_only else full

    lo, hi = 1, max(length, 1)
    while lo < hi:
        mid = (lo + hi) // 2
        if steps(mid) < length:
            lo = mid + 1
        else:
            hi = mid
    if steps(lo) != length:
        kind = "valid" if valid_only else "full"
        raise ValueError(f"no T gives a {kind} layout of {length} steps for {pattern}; pass timesteps=")
    return lo


def _int_tuple(values: Any, name: str) -> tuple[int, ...]:
    out = tuple(int(v) for v in values)
    if any(v < 0 for v in out):
        raise ValueError(f"{name} must be non-negative, got {out}")
    if list(out) != sorted(out):
        raise ValueError(f"{name} must be non-decreasing, got {out}")
    return out


def _check_codebooks(num_codebooks: int) -> None:
    if num_codebooks < 1:
        raise ValueError(f"num_codebooks must be >= 1, got {num_codebooks}")


def _check_empty_initial(empty_initial: int) -> None:
    if empty_initial < -1:
        raise ValueError(f"empty_initial must be >= -1 (-1 omits the leading empty step), got {empty_initial}")


@dataclasses.dataclass(frozen=True)
class DelayPattern(Pattern):
    """MusicGen's pattern: codebook k delayed by `delays[k]` steps (default 0, 1, ..., K-1).

    `flatten_first`: the first N timesteps are laid out one codebook per step before the delayed part.
    `empty_initial`: N extra empty steps after the leading one; -1 omits the leading empty step itself (MAGNeT's
    setting: the layout starts with codes and `revert_logits` does not shift, as audiocraft's `omit_special_token`).
    """

    num_codebooks: int
    delays: Optional[tuple[int, ...]] = None
    flatten_first: int = 0
    empty_initial: int = 0

    def __post_init__(self):
        _check_codebooks(self.num_codebooks)
        delays = tuple(range(self.num_codebooks)) if self.delays is None else self.delays
        object.__setattr__(self, "delays", _int_tuple(delays, "delays"))
        if len(self.delays) != self.num_codebooks:
            raise ValueError(f"delays needs one entry per codebook ({self.num_codebooks}), got {self.delays}")
        _check_empty_initial(self.empty_initial)
        if self.flatten_first < 0:
            raise ValueError(f"flatten_first must be >= 0, got {self.flatten_first}")

    def layout(self, timesteps: int) -> Layout:
        out: Layout = [[] for _ in range(1 + self.empty_initial)]  # none for empty_initial=-1
        first = self.flatten_first
        for t in range(min(timesteps, first)):
            out.extend([(t, k)] for k in range(self.num_codebooks))
        for t in range(first, timesteps + max(self.delays)):
            out.append([(t - d, k) for k, d in enumerate(self.delays) if t - d >= first])
        return out


@dataclasses.dataclass(frozen=True)
class ParallelPattern(Pattern):
    """All codebooks of a timestep in one step (the delay pattern with zero delays); `empty_initial` as there."""

    num_codebooks: int
    empty_initial: int = 0

    def __post_init__(self):
        _check_codebooks(self.num_codebooks)
        _check_empty_initial(self.empty_initial)

    def layout(self, timesteps: int) -> Layout:
        delayed = DelayPattern(self.num_codebooks, (0,) * self.num_codebooks, empty_initial=self.empty_initial)
        return delayed.layout(timesteps)


@dataclasses.dataclass(frozen=True)
class UnrolledPattern(Pattern):
    """Codebooks flattened into inner steps of each timestep, optionally delayed (audiocraft's unroll pattern).

    `flattening[k]` is the inner step of codebook k (default 0..K-1: one codebook per step; equal values keep
    codebooks in parallel); a timestep spans `max(flattening) + 1` inner steps, unused inner values give empty
    steps. `delays[k]` (default zeros) delays codebook k by whole timesteps; codebooks sharing an inner step must
    share a delay.
    """

    num_codebooks: int
    flattening: Optional[tuple[int, ...]] = None
    delays: Optional[tuple[int, ...]] = None

    def __post_init__(self):
        _check_codebooks(self.num_codebooks)
        k = self.num_codebooks
        flattening = tuple(range(k)) if self.flattening is None else self.flattening
        delays = (0,) * k if self.delays is None else self.delays
        object.__setattr__(self, "flattening", _int_tuple(flattening, "flattening"))
        object.__setattr__(self, "delays", _int_tuple(delays, "delays"))
        if len(self.flattening) != k or len(self.delays) != k:
            raise ValueError(f"flattening and delays need one entry per codebook ({k}), "
                             f"got {self.flattening} and {self.delays}")
        self._groups()

    def _groups(self) -> dict[int, tuple[list[int], int]]:
        """inner step -> (its codebooks, their shared delay)."""
        groups: dict[int, tuple[list[int], int]] = {}
        for k, (inner, delay) in enumerate(zip(self.flattening, self.delays)):
            codebooks, shared = groups.setdefault(inner, ([], delay))
            if delay != shared:
                raise ValueError(f"codebooks flattened to inner step {inner} must share one delay, "
                                 f"got delays {self.delays} for flattening {self.flattening}")
            codebooks.append(k)
        return groups

    def layout(self, timesteps: int) -> Layout:
        groups = self._groups()
        inner_steps = max(self.flattening) + 1
        span = timesteps + max(self.delays)
        # Each emitted step gets a sort key (its timestep shifted by the delay); steps are then ordered by
        # (key, coordinates), with an empty step first among equal keys, which is how audiocraft orders them.
        keyed: list[tuple[int, list[tuple[int, int]]]] = [(-1, [])]
        for t in range(span):
            for inner in range(inner_steps):
                if inner not in groups:
                    keyed.append((t, []))
                    continue
                codebooks, delay = groups[inner]
                if t + delay < span:
                    keyed.append((t + delay, [(t, k) for k in codebooks]))
        return [coords for _, coords in sorted(keyed)]


@dataclasses.dataclass(frozen=True)
class CoarseFirstPattern(Pattern):
    """All of codebook 0 first, then codebooks 1..K-1 in parallel, delayed by `delays` (default zeros, K-1 long).

    As audiocraft warns, generate the full training length: the fine codebooks start at a fixed step.
    With K = 1 (undefined in audiocraft) the pattern is codebook 0 alone.
    """

    num_codebooks: int
    delays: Optional[tuple[int, ...]] = None

    def __post_init__(self):
        _check_codebooks(self.num_codebooks)
        delays = (0,) * (self.num_codebooks - 1) if self.delays is None else self.delays
        object.__setattr__(self, "delays", _int_tuple(delays, "delays"))
        if len(self.delays) != self.num_codebooks - 1:
            raise ValueError(f"coarse_first delays need K-1 = {self.num_codebooks - 1} entries, got {self.delays}")

    def layout(self, timesteps: int) -> Layout:
        out: Layout = [[]] + [[(t, 0)] for t in range(timesteps)]
        if self.delays:
            for t in range(timesteps + max(self.delays)):
                out.append([(t - d, k + 1) for k, d in enumerate(self.delays) if t - d >= 0])
        return out


@dataclasses.dataclass(frozen=True)
class MusicLMPattern(Pattern):
    """MusicLM-style: codebooks in groups of `group_size`; each group's whole sequence (all T timesteps, the
    group's codebooks flattened within a timestep) before the next group. K must be a multiple of `group_size`."""

    num_codebooks: int
    group_size: int = 2

    def __post_init__(self):
        _check_codebooks(self.num_codebooks)
        if self.group_size < 1 or self.num_codebooks % self.group_size:
            raise ValueError(f"musiclm group_size must divide num_codebooks={self.num_codebooks}, "
                             f"got {self.group_size}")

    def layout(self, timesteps: int) -> Layout:
        out: Layout = [[]]
        for first in range(0, self.num_codebooks, self.group_size):
            for t in range(timesteps):
                out.extend([(t, k)] for k in range(first, first + self.group_size))
        return out


PATTERNS: dict[str, type] = {
    "delay": DelayPattern,
    "parallel": ParallelPattern,
    "unroll": UnrolledPattern,
    "coarse_first": CoarseFirstPattern,
    "musiclm": MusicLMPattern,
}


def get_pattern(name: str, num_codebooks: int, **kwargs: Any) -> Pattern:
    """The pattern called `name` (one of `PATTERNS`) for `num_codebooks` codebooks; kwargs are its fields
    (`delays`, `flattening`, `group_size`, `flatten_first`, `empty_initial`), sequences given as lists or tuples."""
    if name not in PATTERNS:
        raise ValueError(f"unknown codebook pattern {name!r}; valid names: {', '.join(PATTERNS)}")
    cls = PATTERNS[name]
    fields = {f.name for f in dataclasses.fields(cls)} - {"num_codebooks"}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"pattern {name!r} takes no {', '.join(unknown)} (it takes: {', '.join(sorted(fields))})")
    kwargs = {key: tuple(v) if isinstance(v, (list, tuple)) else v for key, v in kwargs.items()}
    return cls(num_codebooks, **kwargs)


def pattern_from_config(lm_config: Any) -> Pattern:
    """The pattern an `LMConfig` names: `pattern`, with `pattern_delays` / `pattern_flattening` (empty means the
    pattern's default; for a stereo delay pattern, each channel's codebook k delayed by k), `pattern_group_size`
    (musiclm), `pattern_flatten_first` (delay) and `pattern_empty_initial` (delay, parallel). Delays, flattening,
    flatten_first or empty_initial given to a pattern that does not take them is an error rather than silently
    ignored."""
    kwargs: dict[str, Any] = {}
    if lm_config.pattern_delays:
        kwargs["delays"] = lm_config.pattern_delays
    elif lm_config.pattern == "delay" and getattr(lm_config, "audio_channels", 1) == 2:
        # stereo: codebooks interleave left/right ([L0, R0, L1, R1, ...]); level k of both channels has delay k
        kwargs["delays"] = tuple(k // 2 for k in range(lm_config.num_codebooks))
    if lm_config.pattern_flattening:
        kwargs["flattening"] = lm_config.pattern_flattening
    if lm_config.pattern == "musiclm":
        kwargs["group_size"] = lm_config.pattern_group_size
    if lm_config.pattern_flatten_first:
        kwargs["flatten_first"] = lm_config.pattern_flatten_first
    if lm_config.pattern_empty_initial:
        kwargs["empty_initial"] = lm_config.pattern_empty_initial
    return get_pattern(lm_config.pattern, lm_config.num_codebooks, **kwargs)
