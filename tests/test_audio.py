"""Output levels: BS.1770 loudness against pyloudnorm (an independent implementation of the same filters and
gating), audiocraft's normalisation strategies, and its pcm16 rounding."""
from __future__ import annotations

import os

import numpy as np
import pytest

from mgjax.audio import (LOUDNESS_TARGET_LUFS, loudness_lufs, normalize_audio, pcm16, read_audio,
                         write_audio, write_wav)

RATE = 32000
BLOCK, STEP = 12800, 3200  # 400 ms blocks every 100 ms at 32 kHz


def noise(channels: int, blocks: int, seed: int = 0, scale: float = 0.1, rate: int = RATE) -> np.ndarray:
    """`[C, N]` Gaussian noise spanning a whole number of gating blocks at `rate`, its first third 15 dB quieter
    (the relative gate, 10 LU under the level, drops those blocks; one at 20 LU would keep them), each channel at
    its own level."""
    rng = np.random.default_rng(seed)
    block, step = BLOCK * rate // RATE, STEP * rate // RATE
    wav = scale * rng.standard_normal((channels, block + step * (blocks - 1)))
    wav[:, : wav.shape[1] // 3] *= 10 ** (-15 / 20)
    return wav * np.linspace(1.0, 0.5, channels)[:, None]


@pytest.mark.parametrize("channels, rate", [(1, 32000), (2, 32000), (5, 48000)])
def test_loudness_matches_pyloudnorm(channels, rate):
    pyloudnorm = pytest.importorskip("pyloudnorm", reason="the loudness oracle needs pyloudnorm "
                                                          "(pip install -e .[test])")
    wav = noise(channels, 41, seed=channels, rate=rate)
    ours = loudness_lufs(wav, rate)
    reference = pyloudnorm.Meter(rate).integrated_loudness(wav.T)
    assert abs(ours - reference) <= 1e-6, (ours, reference)


def test_loudness_of_a_sine_gates_and_short_clips():
    t = np.arange(5 * RATE) / RATE
    sine = 0.5 * np.sin(2 * np.pi * 997 * t)[None]
    # BS.1770: a full-scale 997 Hz sine reads -3.01 LKFS; torchaudio's filter design sits within 0.1 LU of it.
    assert abs(loudness_lufs(sine, RATE) - (-3.01 - 6.02)) < 0.1
    assert abs(loudness_lufs(sine * 0.1, RATE) - (loudness_lufs(sine, RATE) - 20)) < 1e-6
    assert loudness_lufs(np.zeros((2, RATE)), RATE) == float("-inf")
    short = sine[:, : RATE // 5]  # 200 ms: one block of the whole clip
    assert abs(loudness_lufs(short, RATE) - loudness_lufs(sine, RATE)) < 0.3
    with pytest.raises(ValueError, match="channels <= 5"):
        loudness_lufs(np.zeros((6, RATE)), RATE)


def test_normalize_strategies_as_audiocraft_writes():
    wav = noise(2, 41).astype(np.float32)
    loud = normalize_audio(wav, RATE, "loudness", compressor=False)
    assert abs(loudness_lufs(loud, RATE) - LOUDNESS_TARGET_LUFS) < 1e-3
    assert abs(loudness_lufs(normalize_audio(wav, RATE, "loudness", loudness_target=-20.0, compressor=False), RATE)
               + 20.0) < 1e-3
    compressed = normalize_audio(wav * 20, RATE, "loudness", compressor=True)
    gain = 10 ** ((LOUDNESS_TARGET_LUFS - loudness_lufs(wav * 20, RATE)) / 20)
    np.testing.assert_allclose(compressed, np.tanh(wav * 20 * gain), atol=1e-6)
    assert np.abs(compressed).max() < 1
    np.testing.assert_allclose(np.abs(normalize_audio(wav, RATE, "peak")).max(), 10 ** (-1 / 20), rtol=1e-6)
    tone = np.stack([np.sin(np.arange(RATE) * 0.05), 0.5 * np.sin(np.arange(RATE) * 0.03)]).astype(np.float32)
    rms = normalize_audio(tone, RATE, "rms")  # the mono mix's RMS, no sample clipped at this crest factor
    np.testing.assert_allclose(np.sqrt(np.mean(rms.mean(axis=0) ** 2)), 10 ** (-18 / 20), rtol=1e-5)
    assert np.abs(normalize_audio(wav, RATE, "rms")).max() <= 1.0
    clipped = normalize_audio(wav * 30, RATE, "clip")
    np.testing.assert_allclose(np.abs(clipped).max(), 10 ** (-1 / 20), rtol=1e-6)
    np.testing.assert_array_equal(normalize_audio(wav * 30, RATE, "none"), wav * 30)
    quiet = wav * 1e-3  # RMS under audiocraft's energy floor: loudness leaves it alone
    np.testing.assert_array_equal(normalize_audio(quiet, RATE, "loudness"), quiet)
    np.testing.assert_array_equal(normalize_audio(wav, RATE), normalize_audio(wav, RATE, "peak"))  # audiocraft's
    for strategy in ("loudness", "peak", "rms", "clip", "none"):
        np.testing.assert_array_equal(normalize_audio(np.zeros((1, 100), np.float32), RATE, strategy), 0)
    with pytest.raises(ValueError, match="unknown normalisation 'lufs'; choose one of loudness, peak"):
        normalize_audio(wav, RATE, "lufs")


def test_pcm16_rounds_as_audiocraft_and_writes_those_samples(tmp_path):
    np.testing.assert_array_equal(pcm16(np.array([0.5, -1.0, 0.25, 0.0])), [16384, -32768, 8192, 0])
    np.testing.assert_array_equal(pcm16(np.array([1.0, -1.0, 0.5, 3.0])), [32767, -32767, 16384, 32767])
    wav = noise(2, 5).astype(np.float32) * 5
    path = write_wav(str(tmp_path / "out.wav"), wav, RATE)
    written, rate = read_audio(path)
    assert rate == RATE and list(tmp_path.iterdir()) == [tmp_path / "out.wav"]
    np.testing.assert_array_equal(np.round(written * 2 ** 15).astype(np.int16), pcm16(wav))


@pytest.mark.parametrize("suffix", [".wav", ".flac", ".ogg", ".mp3"])
def test_write_audio_in_the_container_its_suffix_names(tmp_path, suffix):
    wav = (0.5 * np.sin(2 * np.pi * 440 * np.arange(RATE) / RATE) * np.array([[1.0], [0.5]])).astype(np.float32)
    path = write_audio(str(tmp_path / f"out{suffix}"), wav, RATE)
    import soundfile

    info = soundfile.info(path)
    assert info.format == {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".mp3": "MP3"}[suffix]
    assert info.channels == 2 and info.samplerate == RATE
    written, _ = read_audio(path)
    if suffix in (".wav", ".flac"):  # lossless: the pcm16 samples themselves
        np.testing.assert_array_equal(np.round(written * 2 ** 15).astype(np.int16), pcm16(wav))
    else:  # lossy: the tone's level survives
        assert abs(np.sqrt(np.mean(written[0] ** 2)) - 0.5 / np.sqrt(2)) < 0.05
    assert os.stat(path).st_mode & 0o044 == 0o044 & ~current_umask()  # readable as any file the user writes
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"out{suffix}"]  # no temp file left


def test_write_audio_refuses_what_it_cannot_write(tmp_path):
    wav = np.zeros((1, 100), np.float32)
    with pytest.raises(ValueError, match=r"choose a file ending in \.wav, \.flac, \.ogg, \.mp3"):
        write_audio(str(tmp_path / "out.aiff"), wav, RATE)
    with pytest.raises(ValueError, match="float samples are stored in .wav only"):
        write_audio(str(tmp_path / "out.flac"), wav, RATE, fmt="float")
    assert list(tmp_path.iterdir()) == []


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
