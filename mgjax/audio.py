"""Audio files in and out: reading, channel matching, resampling, loudness and level normalisation, atomic wav
writing. Arrays are `[C, N]` float32."""
from __future__ import annotations

import os
import tempfile

import numpy as np

SUBTYPES = {"pcm16": "PCM_16", "float": "FLOAT"}
NORMALIZE_STRATEGIES = ("loudness", "peak", "rms", "clip", "none")
# audiocraft's `audio_write` defaults: peak and clip keep 1 dB of headroom, rms aims 18 dB below full scale,
# loudness aims at -14 LUFS and leaves near-silence (RMS under 2e-3) as it is.
PEAK_HEADROOM_DB, RMS_HEADROOM_DB, LOUDNESS_TARGET_LUFS, LOUDNESS_ENERGY_FLOOR = 1.0, 18.0, -14.0, 2e-3
# ITU-R BS.1770-4 gating: 400 ms blocks overlapping by 75 %, absolute gate -70 LKFS, relative gate -10 LU;
# channel weights for L, R, C, Ls, Rs.
GATE_SECONDS, GATE_OVERLAP, ABSOLUTE_GATE_LKFS, RELATIVE_GATE_LU, K_WEIGHT_BIAS = 0.4, 0.75, -70.0, -10.0, -0.691
CHANNEL_WEIGHTS = (1.0, 1.0, 1.0, 1.41, 1.41)


def read_audio(path: str) -> tuple[np.ndarray, int]:
    """`(wav [C, N] float32, sample_rate)`; a clear error for a missing or unreadable file."""
    import soundfile

    if not os.path.isfile(path):
        raise FileNotFoundError(f"audio file {path} does not exist")
    try:
        data, sample_rate = soundfile.read(path, dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises its own error types for unreadable formats
        raise ValueError(f"cannot read {path} as audio ({err}); use a wav/flac/ogg file") from None
    if data.shape[0] == 0:
        raise ValueError(f"{path} holds no samples")
    from mgjax.validation import finite_audio
    return np.ascontiguousarray(finite_audio(path, data.T)), int(sample_rate)


def match_channels(wav_CxN: np.ndarray, channels: int) -> np.ndarray:
    """Mixes down to mono (mean) or duplicates a mono signal; refuses other channel changes."""
    if wav_CxN.shape[0] == channels:
        return wav_CxN
    if channels == 1:
        return wav_CxN.mean(axis=0, keepdims=True)
    if wav_CxN.shape[0] == 1:
        return np.repeat(wav_CxN, channels, axis=0)
    raise ValueError(f"cannot map {wav_CxN.shape[0]} audio channels to {channels}")


def load_audio(path: str, sample_rate: int, channels: int) -> np.ndarray:
    """A file as `[channels, N]` float32 at `sample_rate` (mixed down / resampled as needed)."""
    wav, rate = read_audio(path)
    return conform(wav, rate, sample_rate, channels)


def conform(wav_CxN: np.ndarray, rate: int, sample_rate: int, channels: int) -> np.ndarray:
    """`[C, N]` audio at `rate` -> `[channels, M]` float32 at `sample_rate` (mixed down / resampled as needed)."""
    from mgjax.conditioning.chroma import resample

    return np.asarray(resample(match_channels(wav_CxN, channels), rate, sample_rate))


def pcm16(wav: np.ndarray) -> np.ndarray:
    """float audio -> int16 samples, clipped to [-1, 1], as audiocraft writes them: round(x * 2^15), or
    round(x * (2^15 - 1)) where a full-scale positive sample would overflow."""
    wav = np.clip(np.asarray(wav, np.float32), -1.0, 1.0)
    samples = np.round(wav * 2.0 ** 15)
    if samples.size and samples.max() >= 2 ** 15:
        samples = np.round(wav * (2.0 ** 15 - 1))
    return samples.astype(np.int16)


# Containers by file suffix, as audiocraft's `audio_write` offers them: (libsndfile format, subtype for
# `fmt='pcm16'`); only wav also stores float samples.
CONTAINERS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS"),
              ".mp3": ("MP3", "MPEG_LAYER_III")}


def write_wav(path: str, wav_CxN: np.ndarray, sample_rate: int, fmt: str = "pcm16") -> str:
    """Writes `[C, N]` audio as WAV, atomically (temp file + rename); `fmt` 'pcm16' (clipped to [-1, 1], see
    `pcm16`) or 'float'."""
    return _write_atomically(path, wav_CxN, sample_rate, "WAV", _wav_subtype(fmt))


def write_audio(path: str, wav_CxN: np.ndarray, sample_rate: int, fmt: str = "pcm16") -> str:
    """Writes `[C, N]` audio atomically in the container its suffix names (.wav, .flac, .ogg (Vorbis), .mp3);
    `fmt` 'float' only for .wav."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in CONTAINERS:
        raise ValueError(f"cannot write {path}: choose a file ending in {', '.join(CONTAINERS)}")
    container, subtype = CONTAINERS[suffix]
    if fmt == "float" and container != "WAV":
        raise ValueError(f"float samples are stored in .wav only, not {suffix}; use fmt='pcm16' there")
    wav_subtype = _wav_subtype(fmt)
    return _write_atomically(path, wav_CxN, sample_rate, container, wav_subtype if container == "WAV" else subtype)


def _wav_subtype(fmt: str) -> str:
    if fmt not in SUBTYPES:
        raise ValueError(f"unknown sample format {fmt!r}; choose one of {', '.join(SUBTYPES)}")
    return SUBTYPES[fmt]


def _write_atomically(path: str, wav_CxN: np.ndarray, sample_rate: int, container: str, subtype: str) -> str:
    import soundfile

    from mgjax.runtime import current_umask

    data = np.asarray(wav_CxN, np.float32).T
    if subtype == "PCM_16":
        data = pcm16(data)
    elif container != "WAV":  # lossy encoders take float samples; keep them within full scale
        data = np.clip(data, -1.0, 1.0)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=os.path.splitext(path)[1] or ".wav", prefix=".tmp-", dir=directory)
    os.close(fd)
    try:
        soundfile.write(tmp, data, sample_rate, subtype=subtype, format=container)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes the file private; the output gets the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _biquad_clamped(x_CxN: np.ndarray, b, a) -> np.ndarray:
    """A biquad (zero initial state) whose output is clamped to [-1, 1], as torchaudio's `biquad` does."""
    from scipy.signal import lfilter

    return np.clip(lfilter(np.asarray(b) / a[0], np.asarray(a) / a[0], x_CxN, axis=-1), -1.0, 1.0)


def k_weighted(wav_CxN: np.ndarray, sample_rate: int) -> np.ndarray:
    """BS.1770 K-weighting `[C, N]` -> `[C, N]` float64, designed for any rate as torchaudio does: an RBJ high shelf
    (+4 dB, 1500 Hz, Q 1/sqrt 2), then an RBJ high-pass (38 Hz, Q 0.5)."""
    w0 = 2 * np.pi * 1500.0 / sample_rate
    alpha, gain = np.sin(w0) / 2 * np.sqrt(2.0), 10 ** (4.0 / 40)
    root, cos = 2 * np.sqrt(gain) * alpha, np.cos(w0)
    shelf_b = (gain * ((gain + 1) + (gain - 1) * cos + root), -2 * gain * ((gain - 1) + (gain + 1) * cos),
               gain * ((gain + 1) + (gain - 1) * cos - root))
    shelf_a = ((gain + 1) - (gain - 1) * cos + root, 2 * ((gain - 1) - (gain + 1) * cos),
               (gain + 1) - (gain - 1) * cos - root)
    w0 = 2 * np.pi * 38.0 / sample_rate
    alpha, cos = np.sin(w0) / 2 / 0.5, np.cos(w0)
    high_b, high_a = ((1 + cos) / 2, -(1 + cos), (1 + cos) / 2), (1 + alpha, -2 * cos, 1 - alpha)
    x = np.asarray(wav_CxN, np.float64)
    return _biquad_clamped(_biquad_clamped(x, shelf_b, shelf_a), high_b, high_a)


def loudness_lufs(wav_CxN: np.ndarray, sample_rate: int) -> float:
    """Integrated loudness (LUFS / LKFS) of `[C, N]` audio, C <= 5, by ITU-R BS.1770-4 as torchaudio's `loudness`
    measures it (its filters, 400 ms blocks every 100 ms, absolute then relative gating). A clip shorter than one
    block is measured as one block; -inf when every block is below the absolute gate."""
    wav = np.asarray(wav_CxN)
    if wav.ndim != 2 or not 1 <= wav.shape[0] <= len(CHANNEL_WEIGHTS) or wav.shape[1] == 0:
        raise ValueError(f"loudness needs [channels <= {len(CHANNEL_WEIGHTS)}, samples > 0] audio, got shape "
                         f"{wav.shape}")
    filtered = k_weighted(wav, sample_rate)
    block = min(int(round(GATE_SECONDS * sample_rate)), wav.shape[1])
    step = max(1, int(round(block * (1 - GATE_OVERLAP))))
    starts = np.arange(0, wav.shape[1] - block + 1, step)
    energy_sums = np.concatenate([np.zeros((wav.shape[0], 1)), np.cumsum(filtered ** 2, axis=-1)], axis=-1)
    energy = (energy_sums[:, starts + block] - energy_sums[:, starts]) / block  # [C, blocks]
    weights = np.asarray(CHANNEL_WEIGHTS[: wav.shape[0]])[:, None]
    with np.errstate(divide="ignore"):
        block_lkfs = K_WEIGHT_BIAS + 10 * np.log10((weights * energy).sum(axis=0))
        gated = block_lkfs > ABSOLUTE_GATE_LKFS
        if not gated.any():
            return float("-inf")
        relative_gate = K_WEIGHT_BIAS + 10 * np.log10((weights[:, 0] * energy[:, gated].mean(axis=-1)).sum())
        gated &= block_lkfs > relative_gate + RELATIVE_GATE_LU
        return float(K_WEIGHT_BIAS + 10 * np.log10((weights[:, 0] * energy[:, gated].mean(axis=-1)).sum()))


def normalize_audio(wav_CxN: np.ndarray, sample_rate: int, strategy: str = "peak", *,
                    loudness_target: float = LOUDNESS_TARGET_LUFS, compressor: bool = False) -> np.ndarray:
    """`[C, N]` audio levelled as audiocraft's `audio_write` does (same defaults), float32 within [-1, 1] (except
    'none'):
    'loudness' scales to `loudness_target` LUFS (then a tanh soft clip when `compressor`; near-silence is left
    as is), 'peak' scales the peak to -1 dBFS, 'rms' the mono RMS to -18 dBFS, 'clip' clamps to -1 dBFS,
    'none' returns the audio unchanged (pcm16 writing still clips). Silence is never scaled."""
    if strategy not in NORMALIZE_STRATEGIES:
        raise ValueError(f"unknown normalisation {strategy!r}; choose one of {', '.join(NORMALIZE_STRATEGIES)}")
    wav = np.asarray(wav_CxN, np.float32)
    peak_scale = 10 ** (-PEAK_HEADROOM_DB / 20)
    if strategy == "none":
        return wav
    if strategy == "clip":
        return np.clip(wav, -peak_scale, peak_scale)
    if strategy == "peak":
        peak = float(np.abs(wav).max(initial=0.0))
        return wav * np.float32(peak_scale / peak) if peak > 0 else wav
    if strategy == "rms":
        rms = float(np.sqrt(np.mean(wav.mean(axis=0, dtype=np.float64) ** 2)))
        scaled = wav * np.float32(10 ** (-RMS_HEADROOM_DB / 20) / rms) if rms > 0 else wav
        return np.clip(scaled, -1.0, 1.0)
    if float(np.sqrt(np.mean(wav.astype(np.float64) ** 2))) < LOUDNESS_ENERGY_FLOOR:
        return wav
    gain = 10 ** ((loudness_target - loudness_lufs(wav, sample_rate)) / 20)
    scaled = wav * np.float32(gain)
    return np.clip(np.tanh(scaled) if compressor else scaled, -1.0, 1.0).astype(np.float32)
