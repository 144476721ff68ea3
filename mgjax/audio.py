"""Audio files in and out: reading, channel matching, resampling, atomic wav writing. Arrays are `[C, N]` float32."""
from __future__ import annotations

import os
import tempfile

import numpy as np

SUBTYPES = {"pcm16": "PCM_16", "float": "FLOAT"}


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
    return np.ascontiguousarray(data.T), int(sample_rate)


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
    from mgjax.conditioning.chroma import resample

    wav, rate = read_audio(path)
    return np.asarray(resample(match_channels(wav, channels), rate, sample_rate))


def write_wav(path: str, wav_CxN: np.ndarray, sample_rate: int, fmt: str = "pcm16") -> str:
    """Writes `[C, N]` audio atomically (temp file + rename); `fmt` 'pcm16' (clipped to [-1, 1]) or 'float'."""
    import soundfile

    if fmt not in SUBTYPES:
        raise ValueError(f"unknown wav format {fmt!r}; choose one of {', '.join(SUBTYPES)}")
    data = np.asarray(wav_CxN, np.float32).T
    if fmt == "pcm16":
        data = np.clip(data, -1.0, 1.0)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".wav", prefix=".tmp-", dir=directory)
    os.close(fd)
    try:
        soundfile.write(tmp, data, sample_rate, subtype=SUBTYPES[fmt], format="WAV")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path

