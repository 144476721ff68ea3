"""Checks of user-given generation settings and audio, shared by `sample.py` and the Python API (`MusicGen.generate`).

Every check runs before anything heavy (no model, no JAX) and raises `InvalidInput` (a `ValueError`) in one line
that names the setting, the value given and what to give instead. The CLI and the API use the same functions with
their own spellings of the settings (`--cfg` / `cfg_coef`), so both refuse the same values with the same words.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Optional

import numpy as np

MAX_SEED = 2 ** 32 - 1
MAX_DURATION_S = 3600.0  # one hour of 32 kHz float32 audio is ~0.5 GB per clip; longer: several --continue runs
LONG_DURATION_S = 300.0  # past this a generation takes long enough to deserve a word before it starts
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0  # below 1e-3 logits / temperature overflows float32; use greedy
MAX_CFG = 100.0  # guidance beyond this only amplifies the logits' rounding noise (and overflows float32)
MAX_TOP_K = 2 ** 31 - 1
SAMPLE_RATE_RANGE = (1000, 768_000)
API_NAMES = {"duration": "duration", "top_k": "top_k", "top_p": "top_p", "temperature": "temperature",
             "cfg_coef": "cfg_coef", "seed": "seed", "greedy": "greedy=True", "continue": "prompt_audio"}


class InvalidInput(ValueError):
    """A setting or an input the user gave that cannot work; the message names it and the fix."""


def _described(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def as_int(name: str, value: Any, low: int, high: int, hint: str = "") -> int:
    """`value` as a Python int within [low, high], else `InvalidInput` naming `name` (bools and floats refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidInput(f"{name} must be a whole number in [{low}, {high}], got {_described(value)}"
                           + (f"; {hint}" if hint else ""))
    value = int(value)
    if not low <= value <= high:
        raise InvalidInput(f"{name} must lie in [{low}, {high}], got {value}" + (f"; {hint}" if hint else ""))
    return value


def as_float(name: str, value: Any, low: float, high: float, hint: str = "", *, low_open: bool = False,
             unit: str = "") -> float:
    """`value` as a finite float within [low, high] ((low, high] when `low_open`), else `InvalidInput`."""
    bracket = "(" if low_open else "["
    wanted = f"a finite number in {bracket}{low:g}, {high:g}]{unit}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidInput(f"{name} must be {wanted}, got {_described(value)}" + (f"; {hint}" if hint else ""))
    value = float(value)
    below = value <= low if low_open else value < low
    if not math.isfinite(value) or below or value > high:
        raise InvalidInput(f"{name} must be {wanted}, got {value}" + (f"; {hint}" if hint else ""))
    return value


def generation_settings(*, duration: Any, top_k: Any, top_p: Any, temperature: Any, cfg_coef: Any, seed: Any,
                        greedy: Any = False, names: Mapping[str, str] = API_NAMES) -> dict:
    """The sampling settings checked and normalised (`{'duration': float, 'top_k': int, 'top_p': float,
    'temperature': float, 'cfg_coef': float, 'seed': int, 'greedy': bool}`); `names` spells each setting as the
    caller's user writes it (`API_NAMES`, or the CLI's flags)."""
    if not isinstance(greedy, (bool, np.bool_)):
        raise InvalidInput(f"{names['greedy'].split('=')[0]} must be True or False, got {_described(greedy)}")
    settings = {
        "duration": as_float(names["duration"], duration, 0.0, MAX_DURATION_S, low_open=True, unit=" seconds",
                             hint=f"generate longer pieces in parts, each continuing the last ({names['continue']})"),
        "top_k": as_int(names["top_k"], top_k, 0, MAX_TOP_K, "0 turns top-k filtering off"),
        "top_p": as_float(names["top_p"], top_p, 0.0, 1.0, "0 turns top-p filtering off"),
        "cfg_coef": as_float(names["cfg_coef"], cfg_coef, 0.0, MAX_CFG, "1 turns guidance off, 3 is usual"),
        "seed": as_int(names["seed"], seed, 0, MAX_SEED),
        "greedy": bool(greedy),
    }
    settings["temperature"] = (float(temperature) if greedy and _finite_number(temperature) else
                               as_float(names["temperature"], temperature, MIN_TEMPERATURE, MAX_TEMPERATURE,
                                        f"1 is usual; for argmax decoding use {names['greedy']}"))
    return settings


def _finite_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def long_duration_note(duration: float, window_seconds: Optional[float] = None) -> Optional[str]:
    """A warning for a generation long enough to take a while (None when it is not): how many windows it walks."""
    if duration <= LONG_DURATION_S:
        return None
    windows = f" in about {math.ceil(duration / window_seconds)} windows" if window_seconds else ""
    return (f"{duration:g} s of audio is a long generation{windows}; it can take a long time (the progress bar "
            f"estimates it). Generate a shorter piece first to time it")


def sample_rate(name: str, value: Any, default: int) -> int:
    """`value` (None: `default`) as a sample rate in Hz within `SAMPLE_RATE_RANGE`."""
    if value is None:
        return int(default)
    low, high = SAMPLE_RATE_RANGE
    return as_int(name, value, low, high, f"give the audio's rate in Hz, or leave it None for {default}")


def finite_audio(name: str, audio: Any) -> np.ndarray:
    """`audio` as a float32 array with every sample finite, else `InvalidInput` saying how many samples are not."""
    try:
        array = np.asarray(audio, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidInput(f"{name} must be an array of audio samples (float32 [batch, channels, samples]), got "
                           f"{type(audio).__name__}") from None
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise InvalidInput(f"{name} holds {bad} NaN or infinite samples of {array.size}; give finite audio "
                           f"(re-export the file, or replace them with np.nan_to_num)")
    return array
