"""Attribute estimators: recover a clip's key, tempo bucket, instrument and drums from its audio (numpy only).

They are deliberately simple, documented signal processing, tuned on `mgjax.synth` clips (whose attributes
they name) and meant for scoring how well the demo model follows its prompts:

- key:        a chroma (pitch-class energy) folded from a pitch salience of the STFT (per semitone: its
              fundamental times its summed harmonics, so a note's overtones do not leak into the fifth and
              third), correlated with the 24 rotated Krumhansl-Kessler key profiles; the best names the key.
- tempo:      spectral flux (positive log-magnitude change) in log-spaced bands as onset strength; the peak of
              its autocorrelation between 60 and 180 bpm (mildly weighted to the faster of near-ties) is the beat
              period; the bpm maps to the nearest tempo bucket.
- instrument: the strongest note of each frame and the levels of its harmonics: only the fundamental = sine pad,
              odd harmonics only = square, all harmonics ~1/n = saw; harmonics falling faster than 1/n (a
              string plucked like a triangle: ~1/n^2) and a fundamental that falls within notes = plucked string.
- drums:      the energy share of the kick band (below 60 Hz), under every instrument's notes.

All functions take a mono float waveform `[N]` (a `[C, N]` one is averaged to mono) and its sample rate.
"""
from __future__ import annotations

import numpy as np

from mgjax.audio import match_channels
from mgjax.synth import ATTRIBUTE_VALUES, KEYS, TEMPO_RANGES, TONICS, tempo_bucket

# Krumhansl-Kessler probe-tone ratings, tonic first (Krumhansl 1990).
KK_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
KK_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])

# Chance level of each estimated attribute: a uniform guess among its values.
CHANCE = {
    "key": 1.0 / len(KEYS),
    "tonic": 1.0 / len(TONICS),
    "mode": 0.5,
    "tempo": 1.0 / len(TEMPO_RANGES),
    "instrument": 1.0 / len(ATTRIBUTE_VALUES["instrument"]),
    "drums": 0.5,
}
MIN_BPM, MAX_BPM = 60.0, 180.0
NOTE_RANGE = (36, 100)  # MIDI candidates of the salience (65 Hz .. 2.6 kHz; the synth kick sits below)


# ----------------------------------------------------------------------------------------------- spectra

def mono(wav: np.ndarray) -> np.ndarray:
    """`[N]` float64 from `[N]` or `[C, N]` (channels averaged by `mgjax.audio.match_channels`, as everywhere)."""
    wav = np.asarray(wav, np.float64)
    return match_channels(wav, 1)[0] if wav.ndim == 2 else wav


def stft_magnitude(wav_N: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """`[T, n_fft // 2 + 1]` magnitude of Hann-windowed frames (the signal zero-padded by n_fft // 2 each side)."""
    x = np.pad(mono(wav_N), n_fft // 2)
    if len(x) < n_fft:
        x = np.pad(x, (0, n_fft - len(x)))
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop]
    return np.abs(np.fft.rfft(frames * np.hanning(n_fft + 1)[:-1], axis=-1))


def note_salience(mag_TxF: np.ndarray, sample_rate: int, n_fft: int, harmonics: int = 8, decay: float = 0.8
                  ) -> tuple[np.ndarray, np.ndarray]:
    """`(salience [T, M], midi [M])`: per frame and semitone, `sqrt(|X(f)| * sum_h decay^(h-1) |X(h f)|)`.

    `|X(f)|` is the larger of the two bins around f. The harmonic sum alone would credit the notes an octave or a
    twelfth below with the same partials (a subdominant bias in the chroma); the factor `|X(f)|` asks for a
    fundamental, and the sum separates neighbouring semitones that share the fundamental's bins at low pitch.
    """
    midi = np.arange(*NOTE_RANGE)
    freqs = 440.0 * 2.0 ** ((midi[:, None] - 69.0) / 12.0) * np.arange(1, harmonics + 1)  # [M, H]
    bins = freqs * n_fft / sample_rate
    valid = bins < mag_TxF.shape[1] - 1
    lo = np.where(valid, np.floor(bins), 0).astype(int)
    values = np.maximum(mag_TxF[:, lo], mag_TxF[:, lo + 1]) * valid  # [T, M, H]
    return np.sqrt(values[..., 0] * (values @ (decay ** np.arange(harmonics)))), midi


# ----------------------------------------------------------------------------------------------- key

def key_profiles() -> np.ndarray:
    """`[24, 12]` KK profiles rotated to every tonic, in the order of `synth.KEYS` (12 major, then 12 minor)."""
    return np.stack([np.roll(p, t) for p in (KK_MAJOR, KK_MINOR) for t in range(12)])


def chroma(wav: np.ndarray, sample_rate: int, n_fft: int = 8192, hop: int = 1024, sharpness: float = 4.0
           ) -> np.ndarray:
    """`[12]` pitch-class profile (C first, sums to 1): note salience per frame, sharpened and normalised per
    frame (so the melody note outweighs the partials shared by its neighbours), folded to pitch classes, summed
    over frames weighted by frame loudness."""
    mag = stft_magnitude(wav, n_fft, hop)
    salience, midi = note_salience(mag, sample_rate, n_fft)
    peak = salience.max(axis=1, keepdims=True)
    sharp = (salience / np.maximum(peak, 1e-12)) ** sharpness
    sharp = sharp / np.maximum(sharp.sum(axis=1, keepdims=True), 1e-12) * peak  # each frame weighs its loudness
    folded = np.zeros(12)
    np.add.at(folded, midi % 12, sharp.sum(axis=0))
    return folded / max(folded.sum(), 1e-12)


def key_scores(chroma_12: np.ndarray) -> np.ndarray:
    """`[24]` Pearson correlation of a chroma with each key profile (order of `synth.KEYS`)."""
    profiles = key_profiles()
    p = profiles - profiles.mean(axis=1, keepdims=True)
    c = chroma_12 - chroma_12.mean()
    return p @ c / np.maximum(np.linalg.norm(p, axis=1) * np.linalg.norm(c), 1e-12)


def estimate_key(wav: np.ndarray, sample_rate: int) -> str:
    """The key ('A minor') whose KK profile correlates best with the clip's chroma."""
    return KEYS[int(np.argmax(key_scores(chroma(wav, sample_rate))))]


# ----------------------------------------------------------------------------------------------- tempo

def band_onsets(wav: np.ndarray, sample_rate: int, hop: int = 256, n_fft: int = 1024, bands: int = 24
                ) -> tuple[np.ndarray, float]:
    """`(onsets [T, B], frames per second)`: spectral flux (half-wave rectified increase of log(1 + |X| / max))
    summed within `bands` log-spaced bands, minus its 0.25 s running mean, each band scaled to peak 1."""
    mag = stft_magnitude(wav, n_fft, hop)
    rise = np.maximum(np.diff(np.log1p(mag / max(mag.max(), 1e-12)), axis=0), 0.0)
    edges = np.unique(np.round(np.geomspace(2, mag.shape[1], bands + 1)).astype(int))
    flux = np.stack([rise[:, lo:hi].sum(axis=1) for lo, hi in zip(edges[:-1], edges[1:])], axis=1)
    fps = sample_rate / hop
    width = max(int(0.25 * fps), 1)
    local = np.stack([np.convolve(f, np.ones(width) / width, mode="same") for f in flux.T], axis=1)
    flux = np.maximum(flux - local, 0.0)
    return flux / np.maximum(flux.max(axis=0, keepdims=True), 1e-12), fps


def tempo_autocorrelation(wav: np.ndarray, sample_rate: int, power: float = 3.0) -> tuple[np.ndarray, float]:
    """`(acf [T], frames per second)`: the mean over bands of each band's onset autocorrelation (plain, biased
    sums, normalised to 1 at lag 0), bands weighted by their onset energy.

    Onsets are raised to `power` first, so accented notes (on the beat) dominate the unaccented ones between
    beats; each band is correlated alone, so a kick on every beat keeps its own beat period rather than blending
    with the snare of beats 2 and 4 into a two-beat pattern.
    """
    onsets, fps = band_onsets(wav, sample_rate)
    onsets = onsets ** power
    onsets = onsets - onsets.mean(axis=0)
    spectrum = np.fft.rfft(onsets, 2 * len(onsets), axis=0)
    acf = np.fft.irfft(np.abs(spectrum) ** 2, axis=0)[:len(onsets)]  # [T, B]
    weight = np.sqrt(acf[0])
    acf = acf / np.maximum(acf[:1], 1e-12)
    return (acf * weight).sum(axis=1) / max(weight.sum(), 1e-12), fps


def estimate_bpm(wav: np.ndarray, sample_rate: int, prior: float = 1.0) -> float:
    """The beat rate (bpm): the lag of the highest onset autocorrelation within 60-180 bpm, the autocorrelation
    weighted by `(bpm / 120) ** prior`.

    A beat period and its double correlate about equally (a pattern that repeats every beat also repeats every
    two); the weight, like the tempo priors of beat trackers, settles such near-ties on the faster one, while
    the accents keep the half-beat (the notes between beats) well below the beat.
    """
    acf, fps = tempo_autocorrelation(wav, sample_rate)
    lo, hi = int(np.floor(60.0 * fps / MAX_BPM)), min(int(np.ceil(60.0 * fps / MIN_BPM)), len(acf) - 2)
    if hi <= lo:
        return float("nan")
    lags = np.arange(lo, hi + 1)
    lag = int(lags[np.argmax(acf[lo:hi + 1] * (60.0 * fps / lags / 120.0) ** prior)])
    a, b, c = acf[lag - 1], acf[lag], acf[lag + 1]
    shift = 0.5 * (a - c) / (a - 2 * b + c) if (a - 2 * b + c) < 0 else 0.0  # parabolic peak interpolation
    return float(60.0 * fps / (lag + shift))


# ----------------------------------------------------------------------------------------------- instrument

def harmonic_features(wav: np.ndarray, sample_rate: int, n_fft: int = 4096, hop: int = 512) -> dict:
    """Timbre summary over the loudest frames (dict of floats):

    - `h2`, `h3`, `h4`: median level of harmonics 2-4 relative to the fundamental of each frame's strongest note
      (sine ~0, square ~(0, 1/3, 0), saw ~(1/2, 1/3, 1/4));
    - `even_odd`: median (h2 + h4) / (h3 + h5);
    - `decay_db_s`: median fall of the fundamental (dB per second) between frames on the same note (pluck
      30-100, the others ~0);
    - `midi`: median strongest note.
    """
    mag = stft_magnitude(wav, n_fft, hop)
    salience, midi = note_salience(mag, sample_rate, n_fft)
    best = np.argmax(salience, axis=1)  # [T]
    loud = salience[np.arange(len(best)), best]
    f0 = 440.0 * 2.0 ** ((midi[best] - 69.0) / 12.0)
    levels = []
    for h in range(1, 6):
        b = np.round(h * f0 * n_fft / sample_rate).astype(int)
        b = np.clip(b, 1, mag.shape[1] - 2)
        levels.append(np.max(np.stack([mag[np.arange(len(b)), b + d] for d in (-1, 0, 1)]), axis=0))
    levels = np.stack(levels, axis=1)  # [T, 5]
    keep = loud >= np.quantile(loud, 0.5)
    rel = levels[keep] / np.maximum(levels[keep, :1], 1e-12)
    db = 20 * np.log10(np.maximum(levels[:, 0], 1e-12))
    same = (best[1:] == best[:-1]) & keep[1:] & keep[:-1]
    fall = (db[:-1] - db[1:])[same] * sample_rate / hop
    return {"h2": float(np.median(rel[:, 1])), "h3": float(np.median(rel[:, 2])), "h4": float(np.median(rel[:, 3])),
            "even_odd": float(np.median((rel[:, 1] + rel[:, 3]) / np.maximum(rel[:, 2] + rel[:, 4], 1e-12))),
            "decay_db_s": float(np.median(fall)) if fall.size else 0.0,
            "midi": float(np.median(midi[best[keep]]))}


def estimate_instrument(wav: np.ndarray, sample_rate: int) -> str:
    """'sine' / 'square' / 'saw' / 'pluck' from `harmonic_features` by thresholds set between the classes' ranges
    on synth clips (h2, h3 = harmonic / fundamental; even_odd = (h2 + h4) / (h3 + h5); decay in dB/s):

        sine    h2, h3 < 0.001                              (threshold 0.02)
        square  even_odd < 0.003                            (threshold 0.3)
        saw     h3 0.31-0.35, even_odd 1.36-1.45, decay < 7
        pluck   h3 0.05-0.14, even_odd 2.2-3.3, decay > 29  (two of: h3 < 0.2, even_odd > 1.8, decay > 18)
    """
    f = harmonic_features(wav, sample_rate)
    if max(f["h2"], f["h3"]) < 0.02:
        return "sine"
    if f["even_odd"] < 0.3:
        return "square"
    votes = (f["h3"] < 0.2) + (f["even_odd"] > 1.8) + (f["decay_db_s"] > 18.0)
    return "pluck" if votes >= 2 else "saw"


# ----------------------------------------------------------------------------------------------- drums

def drum_features(wav: np.ndarray, sample_rate: int, n_fft: int = 4096, hop: int = 1024) -> dict:
    """`kick`: the energy share below 60 Hz, where the kit's kick sits and no instrument note reaches."""
    power = stft_magnitude(wav, n_fft, hop) ** 2
    low = int(60.0 * n_fft / sample_rate)
    return {"kick": float(power[:, 1:low + 1].sum() / max(power.sum(), 1e-12))}


def estimate_drums(wav: np.ndarray, sample_rate: int, threshold: float = 0.02) -> bool:
    """True when the kick band holds more than `threshold` of the energy (synth clips: <= 0.002 without drums,
    >= 0.18 with them)."""
    return drum_features(wav, sample_rate)["kick"] > threshold


# ----------------------------------------------------------------------------------------------- all at once

def estimate_attributes(wav: np.ndarray, sample_rate: int) -> dict:
    """`{key, tonic, mode, bpm, tempo, instrument, drums}` estimated from a clip `[N]` or `[C, N]`."""
    key = estimate_key(wav, sample_rate)
    bpm = estimate_bpm(wav, sample_rate)
    return {"key": key, "tonic": key.split(" ")[0], "mode": key.split(" ")[1], "bpm": bpm,
            "tempo": tempo_bucket(bpm) if np.isfinite(bpm) else "medium",
            "instrument": estimate_instrument(wav, sample_rate), "drums": estimate_drums(wav, sample_rate)}


def accuracy(estimates: list[dict], truths: list[dict]) -> dict:
    """Per attribute of `CHANCE`, the fraction of clips whose estimate equals the truth (attributes that the
    truths lack are skipped)."""
    if len(estimates) != len(truths) or not truths:
        raise ValueError(f"need as many estimates as truths, got {len(estimates)} and {len(truths)}")
    return {name: float(np.mean([e[name] == t[name] for e, t in zip(estimates, truths)]))
            for name in CHANCE if all(name in t for t in truths)}
