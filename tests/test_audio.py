"""Output levels: BS.1770 loudness against pyloudnorm (an independent implementation of the same filters and
gating), audiocraft's normalisation strategies, and its pcm16 rounding. Audio in: the one channel rule, the one
resampler (its parity with torchaudio is in test_chroma.py) and the stereo layout of a mono codec."""
from __future__ import annotations

import os

import numpy as np
import pytest

from mgjax import audio
from mgjax.audio import (LOUDNESS_TARGET_LUFS, load_audio, loudness_lufs, match_channels, normalize_audio, pcm16,
                         read_audio, resample, write_audio, write_wav)

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


def test_one_channel_rule():
    """Any channels -> mono averages, mono -> C duplicates, anything else is refused; batches `[B, C, N]` too."""
    wav = np.arange(18, dtype=np.float64).reshape(6, 3)
    np.testing.assert_array_equal(match_channels(wav, 1), wav.mean(axis=0, keepdims=True))
    assert match_channels(wav, 1).dtype == np.float64 and match_channels(wav, 6) is wav
    np.testing.assert_array_equal(match_channels(wav[:1], 2), np.stack([wav[0], wav[0]]))
    batch = np.stack([wav[:2], 2 * wav[:2]])  # [2, 2, 3]
    np.testing.assert_array_equal(match_channels(batch, 1), batch.mean(axis=1, keepdims=True))
    with pytest.raises(ValueError, match="cannot map 6 audio channels to 2"):
        match_channels(wav, 2)
    with pytest.raises(ValueError, match="cannot map audio of shape"):
        match_channels(np.zeros((0, 5)), 1)


def test_load_audio_mixes_resamples_and_refuses(tmp_path):
    """A file goes through the channel rule, then the sinc resampler (the melody extractor's, see test_chroma.py)."""
    import soundfile

    t = np.arange(4410) / 44100
    lr = np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 660 * t)]).astype(np.float32)
    soundfile.write(tmp_path / "lr.wav", lr.T, 44100, subtype="FLOAT")
    mono = load_audio(str(tmp_path / "lr.wav"), 32000, 1)
    assert mono.shape == (1, 3200) and mono.dtype == np.float32 and isinstance(mono, np.ndarray)
    np.testing.assert_allclose(mono, np.asarray(resample(lr.mean(axis=0, keepdims=True), 44100, 32000)), atol=1e-7)
    np.testing.assert_array_equal(load_audio(str(tmp_path / "lr.wav"), 44100, 2), lr)
    soundfile.write(tmp_path / "six.wav", np.zeros((100, 6), np.float32), 44100)
    with pytest.raises(ValueError, match="cannot map 6 audio channels to 2"):
        load_audio(str(tmp_path / "six.wav"), 32000, 2)


def test_resample_shares_compiles_across_lengths(monkeypatch):
    """Inputs are zero padded to 16 lengths per octave, which changes no output sample: every length gives the
    unpadded polyphase sum, and nearby lengths share one compiled convolution (the convolution jitted afresh over
    `chex.assert_max_traces`: a second trace fails)."""
    import chex
    import jax

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16000)).astype(np.float32)
    kernel, width = audio._sinc_resample_kernel(441, 320, audio.RESAMPLE_LOWPASS_WIDTH, audio.RESAMPLE_ROLLOFF)
    chex.clear_trace_counter()
    guarded = jax.jit(chex.assert_max_traces(audio._resample_blocks().__wrapped__, n=1),
                      static_argnames=("orig", "width"))
    monkeypatch.setattr(audio, "_resample_blocks", lambda: guarded)
    for n in (441 * 32 + 1, 14500, 15000, 441 * 36):  # 33 .. 36 blocks of 441: one bucket
        ours = np.asarray(resample(x[:, :n], 44100, 32000))
        padded = np.pad(x[:, :n].astype(np.float64), ((0, 0), (width, width + 441 * 38)))
        blocks = np.stack([padded[:, j * 441: j * 441 + kernel.shape[-1]] for j in range(37)], axis=1)
        want = np.einsum("cjt,pt->cjp", blocks, kernel[:, 0].astype(np.float64)).reshape(2, -1)
        out_len = -(-320 * n // 441)
        assert ours.shape == (2, out_len)
        np.testing.assert_allclose(ours, want[:, :out_len], atol=2e-6)


def test_stereo_layout_round_trips_on_numpy_and_jax():
    """Channels as batch rows (left rows, then right) and codebooks interleaved `[L0, R0, L1, R1, ...]`."""
    import jax.numpy as jnp

    wav = np.arange(2 * 2 * 5, dtype=np.float32).reshape(2, 2, 5)  # [B, C, N]
    rows = audio.channels_to_batch(wav)
    np.testing.assert_array_equal(rows, np.concatenate([wav[:, :1], wav[:, 1:]], axis=0))
    np.testing.assert_array_equal(audio.channels_from_batch(rows, 2), wav)
    np.testing.assert_array_equal(audio.channels_from_batch(audio.channels_to_batch(jnp.asarray(wav)), 2), wav)
    codes = np.arange(3 * 8 * 4).reshape(3, 8, 4)  # [B, 2K, T] interleaved
    split = audio.codes_to_batch(codes)
    np.testing.assert_array_equal(split, np.concatenate([codes[:, ::2], codes[:, 1::2]], axis=0))
    np.testing.assert_array_equal(audio.codes_from_batch(split, 3), codes)
    np.testing.assert_array_equal(audio.codes_from_batch(audio.codes_to_batch(jnp.asarray(codes)), 3), codes)
    with pytest.raises(ValueError, match="do not interleave"):
        audio.codes_to_batch(codes[:, :7])
