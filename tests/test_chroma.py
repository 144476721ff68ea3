"""Melody chroma (`mgjax.conditioning.chroma`) against transformers' `MusicgenMelodyFeatureExtractor`.

The oracle is the extractor itself: its module is imported directly (the `transformers.models.musicgen_melody`
package hands out a placeholder without torchaudio) and instantiated and called as usual, so its own padding,
truncation, stereo averaging, filter bank, einsum, `normalize(p=inf, eps=1e-6)` and argmax/scatter run. torchaudio
does not install beside our torch build, so the two torchaudio pieces it calls are supplied by a stand-in written
from torchaudio's source (`torchaudio/transforms/_transforms.py::Spectrogram` -> `functional.spectrogram`, and
`functional.resample`): `torch.stft` with the same periodic Hann window, `center=True` reflect padding, one-sided
output, "window" normalisation (divide by `sqrt(sum(w**2))`) and `|.|**power`; the windowed-sinc resampler with
its kernel and strided conv1d. The pre-argmax chroma is not returned by the extractor (it overwrites it in place),
so it is recomputed from the extractor's own `spectrogram` and `chroma_filters` with the same three lines.

One-hot outputs must be equal exactly; the normalised chroma within 1e-5 (tighter than the 1e-4 asked for, so that
a symmetric instead of periodic Hann window is caught; torch-vs-XLA FFT noise is ~1e-6).
"""
from __future__ import annotations

import importlib
import math
import types

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mgjax.conditioning import chroma as C  # noqa: E402

SR = 32000
NORM_TOL = 1e-5


# ------------------------------------------------------------------------------------------------ torchaudio stand-in


class _Spectrogram(torch.nn.Module):
    """torchaudio.transforms.Spectrogram (forward = torchaudio.functional.spectrogram), reproduced with torch."""

    def __init__(self, n_fft=400, win_length=None, hop_length=None, pad=0, window_fn=torch.hann_window, power=2.0,
                 normalized=False, wkwargs=None, center=True, pad_mode="reflect", onesided=True):
        super().__init__()
        self.n_fft = n_fft
        self.win_length = win_length if win_length is not None else n_fft
        self.hop_length = hop_length if hop_length is not None else self.win_length // 2
        window = window_fn(self.win_length) if wkwargs is None else window_fn(self.win_length, **wkwargs)
        self.register_buffer("window", window)
        self.pad, self.power, self.normalized = pad, power, normalized
        self.center, self.pad_mode, self.onesided = center, pad_mode, onesided

    def forward(self, waveform):
        if self.pad > 0:
            waveform = torch.nn.functional.pad(waveform, (self.pad, self.pad), "constant")
        frame_length_norm = self.normalized == "frame_length"
        window_norm = self.normalized is True or self.normalized == "window"
        shape = waveform.size()
        waveform = waveform.reshape(-1, shape[-1])
        spec = torch.stft(waveform, n_fft=self.n_fft, hop_length=self.hop_length, win_length=self.win_length,
                          window=self.window, center=self.center, pad_mode=self.pad_mode,
                          normalized=frame_length_norm, onesided=self.onesided, return_complex=True)
        spec = spec.reshape(shape[:-1] + spec.shape[-2:])
        if window_norm:
            spec /= self.window.pow(2.0).sum().sqrt()
        if self.power is None:
            return spec
        return spec.abs() if self.power == 1.0 else spec.abs().pow(self.power)


def _torchaudio_resample(waveform, orig_freq, new_freq, lowpass_filter_width=6, rolloff=0.99,
                         resampling_method="sinc_interp_hann", beta=None):
    """torchaudio.functional.resample (sinc_interp_hann), reproduced with torch."""
    assert resampling_method == "sinc_interp_hann"
    if orig_freq == new_freq:
        return waveform
    gcd = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // gcd, int(new_freq) // gcd
    dtype = waveform.dtype
    base = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base)
    idx = torch.arange(-width, width + orig, dtype=dtype)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=dtype)[:, None, None] / new + idx
    t *= base
    t = t.clamp_(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t *= math.pi
    kernels = torch.where(t == 0, torch.tensor(1.0).to(t), t.sin() / t)
    kernels *= window * (base / orig)
    shape = waveform.size()
    waveform = waveform.view(-1, shape[-1])
    num_wavs, length = waveform.shape
    waveform = torch.nn.functional.pad(waveform, (width, width + orig))
    out = torch.nn.functional.conv1d(waveform[:, None], kernels, stride=orig)
    out = out.transpose(1, 2).reshape(num_wavs, -1)
    out = out[..., : int(math.ceil(new * length / orig))]
    return out.view(shape[:-1] + out.shape[-1:])


@pytest.fixture(scope="module")
def fe():
    mod = importlib.import_module("transformers.models.musicgen_melody.feature_extraction_musicgen_melody")
    if not isinstance(mod.MusicgenMelodyFeatureExtractor, type):
        pytest.skip("transformers' MusicgenMelodyFeatureExtractor not importable")
    if not hasattr(mod, "torchaudio"):  # the usual case here: supply the stand-in
        mod.torchaudio = types.SimpleNamespace(
            transforms=types.SimpleNamespace(Spectrogram=_Spectrogram),
            functional=types.SimpleNamespace(resample=_torchaudio_resample),
        )
    ext = mod.MusicgenMelodyFeatureExtractor()
    assert (ext.n_fft, ext.hop_length, ext.sampling_rate) == (C.N_FFT, C.HOP_LENGTH, C.SAMPLE_RATE)
    return ext


def _ref_onehot(fe, audio, sampling_rate=SR):
    return np.asarray(fe(audio, sampling_rate=sampling_rate, return_tensors="np")["input_features"])


def _ref_normalized(fe, x_BxN: np.ndarray) -> np.ndarray:
    """The extractor's `_torch_extract_fbank_features` up to (not including) the argmax, with its own objects."""
    wav = torch.from_numpy(np.ascontiguousarray(x_BxN, dtype=np.float32))
    n = wav.shape[-1]
    if n < fe.n_fft:
        pad = fe.n_fft - n
        wav = torch.nn.functional.pad(wav, (pad // 2, pad // 2 + pad % 2), "constant", 0)
    spec = fe.spectrogram(wav).squeeze(1)
    raw = torch.einsum("cf, ...ft->...ct", fe.chroma_filters, spec)
    return torch.nn.functional.normalize(raw, p=float("inf"), dim=-2, eps=1e-6).transpose(1, 2).numpy()


def _assert_decisive(ref_norm: np.ndarray) -> None:
    """The test data must not hold near-ties, or an exact one-hot comparison would test float noise."""
    s = np.sort(ref_norm, axis=-1)
    top, second = s[..., -1], s[..., -2]
    rel_gap = np.where(top > 0, (top - second) / np.maximum(top, 1e-30), np.inf)
    assert rel_gap.min() > 1e-4, f"test signal has a near-tie (relative gap {rel_gap.min():.2e})"


# ------------------------------------------------------------------------------------------------ signals


def _midi_hz(m):
    return 440.0 * 2.0 ** ((m - 69) / 12)


def _tone(f, n, amp, harmonics=(1.0, 0.45, 0.2)):
    t = np.arange(n) / SR
    return sum(amp * a * np.sin(2 * np.pi * f * (k + 1) * t) for k, a in enumerate(harmonics))


def _signals(n: int, seed: int = 0) -> np.ndarray:
    """float32 [6, n]: chord progression, melody, log sweep, noise, silence, a very quiet chord (below eps)."""
    rng = np.random.default_rng(seed)
    seg = SR // 2
    chord = np.zeros(n)
    melody = np.zeros(n)
    progression = [(57, 61, 64), (62, 66, 69), (64, 68, 71), (60, 64, 67)]
    tune = [72, 74, 76, 77, 79, 76, 72, 71]
    for i in range(0, n, seg):
        m = min(seg, n - i)
        notes = progression[(i // seg) % len(progression)]
        chord[i:i + m] = sum(_tone(_midi_hz(p), m, a) for p, a in zip(notes, (0.5, 0.3, 0.2)))
        melody[i:i + m] = _tone(_midi_hz(tune[(i // seg) % len(tune)]), m, 0.6) * np.hanning(m)
    t = np.arange(n) / SR
    dur, f0, f1 = 4.0, 100.0, 4000.0  # a fixed rate (5.3 octaves in 4 s) whatever n: short clips hold no near-ties
    sweep = 0.5 * np.sin(2 * np.pi * f0 * dur / np.log(f1 / f0) * (np.exp(t / dur * np.log(f1 / f0)) - 1))
    noise = 0.1 * rng.standard_normal(n)
    silence = np.zeros(n)
    quiet = 1e-5 * chord
    return np.stack([chord, melody, sweep, noise, silence, quiet]).astype(np.float32)


# lengths: shorter than n_fft (odd and even padding), around n_fft, not multiples of the hop, a few seconds
LENGTHS = [1000, 16383, 16385, 4096 * 7 + 123, 2 * SR + 17]


def _assert_matches_reference(fe, x, **kwargs):
    ref = _ref_onehot(fe, x)
    ref_norm = _ref_normalized(fe, x)
    _assert_decisive(ref_norm)
    ours_norm = np.asarray(C.chroma_normalized(x, **kwargs))
    ours = np.asarray(C.chroma_features(x, **kwargs))
    assert ours.shape == ref.shape == ref_norm.shape, (ours.shape, ref.shape)
    err = np.abs(ours_norm - ref_norm).max()
    assert err <= NORM_TOL, f"normalised chroma differs by {err:.3e}"
    assert ours.dtype == np.float32
    mismatch = np.argwhere((ours != ref).any(-1))
    assert mismatch.size == 0, f"one-hot differs at (item, frame) {mismatch[:8].tolist()}"


# ------------------------------------------------------------------------------------------------ tests


def test_filter_bank_equals_transformers():
    from transformers.audio_utils import chroma_filter_bank

    ref = chroma_filter_bank(num_frequency_bins=C.N_FFT, num_chroma=12, sampling_rate=SR, tuning=0)
    ours = C.chroma_filter_bank()
    assert ours.shape == (12, C.N_FFT // 2 + 1) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref.astype(np.float32))


@pytest.mark.parametrize("n", LENGTHS)
def test_chroma_matches_extractor(fe, n):
    x = _signals(n, seed=n)
    _assert_matches_reference(fe, x)
    assert C.chroma_features(x).shape[1] == C.num_frames(n) == 1 + max(n, C.N_FFT) // C.HOP_LENGTH


def test_silence_is_first_bin_and_null_chroma(fe):
    x = np.zeros((2, 20000), np.float32)
    oh = np.asarray(C.chroma_features(x))
    np.testing.assert_array_equal(oh, _ref_onehot(fe, x))
    np.testing.assert_array_equal(np.asarray(C.chroma_normalized(x)), 0.0)
    # transformers' null melody: zeros [B, 1, 12] with [:, :, 0] = 1, tiled to chroma_length
    null = torch.zeros((2, 1, 12))
    null[:, :, 0] = 1
    null = null.repeat(1, C.CHROMA_LENGTH, 1)[:, : C.CHROMA_LENGTH].numpy()
    np.testing.assert_array_equal(np.asarray(C.null_chroma(2)), null)
    np.testing.assert_array_equal(np.asarray(C.match_frames(oh, C.CHROMA_LENGTH)), null)


@pytest.mark.parametrize("frames,length", [(5, 235), (7, 7), (300, 235), (1, 4), (100, 235)])
def test_match_frames_like_transformers(frames, length):
    rng = np.random.default_rng(frames)
    x = rng.standard_normal((2, frames, 12)).astype(np.float32)
    t = torch.from_numpy(x)  # modeling_musicgen_melody: repeat ceil(len / F) times if shorter, then truncate
    if t.shape[1] < length:
        t = t.repeat(1, int(math.ceil(length / t.shape[1])), 1)
    ref = t[:, :length].numpy()
    np.testing.assert_array_equal(np.asarray(C.match_frames(x, length)), ref)


def test_prepare_melody_stereo_44k_matches_extractor(fe):
    """Stereo at 44.1 kHz through the extractor's own resample (rolloff 0.945, width 24) and channel mean."""
    n = int(1.7 * 44100) + 3
    t = np.arange(n) / 44100
    left = sum(a * np.sin(2 * np.pi * _midi_hz(p) * t) for p, a in ((60, 0.5), (64, 0.3), (67, 0.2)))
    right = 0.4 * np.sin(2 * np.pi * _midi_hz(69) * t) + 0.05 * np.random.default_rng(1).standard_normal(n)
    x = np.stack([np.stack([left, right]), np.stack([right, 0.3 * left])]).astype(np.float32)  # [2, 2, n]
    ref = _ref_onehot(fe, torch.from_numpy(x), sampling_rate=44100)
    mono32 = _torchaudio_resample(torch.from_numpy(x), 44100, SR, lowpass_filter_width=24, rolloff=0.945).mean(1)
    _assert_decisive(_ref_normalized(fe, mono32.numpy()))
    ours = np.asarray(C.prepare_melody(x, 44100))
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)


def test_prepare_melody_list_pads_and_truncates_like_extractor(fe):
    sig = _signals(3 * SR + 5, seed=3)
    items = [sig[0, : 2 * SR + 100], sig[1], np.stack([sig[2, :SR], sig[3, :SR]])]  # [N], [N], [C, N]
    ref = _ref_onehot(fe, [items[0], items[1], items[2].mean(0)])
    np.testing.assert_array_equal(np.asarray(C.prepare_melody(items, SR)), ref)
    # truncation at chunk_length (here shortened through max_seconds / the extractor's max_length)
    ref_cut = np.asarray(fe(sig[:2], sampling_rate=SR, max_length=SR + 321, return_tensors="np")["input_features"])
    ours_cut = np.asarray(C.prepare_melody(sig[:2], SR, max_seconds=(SR + 321) / SR))
    np.testing.assert_array_equal(ours_cut, ref_cut)


@pytest.mark.parametrize("orig", [44100, 48000, 16000, 22050])
def test_resample_matches_torchaudio(orig):
    n = orig + 77
    x = np.random.default_rng(orig).standard_normal((2, n)).astype(np.float32) * 0.3
    ref = _torchaudio_resample(torch.from_numpy(x), orig, SR, lowpass_filter_width=24, rolloff=0.945).numpy()
    ours = np.asarray(C.resample(x, orig, SR))
    assert ours.shape == ref.shape == (2, math.ceil(n * SR / orig))
    assert np.abs(ours - ref).max() < 2e-6


def test_resample_reproduces_a_sine():
    n = 44100
    x = np.sin(2 * np.pi * 440.0 * np.arange(n) / 44100).astype(np.float32)
    y = np.asarray(C.resample(x[None, None], 44100, SR))[0, 0]
    want = np.sin(2 * np.pi * 440.0 * np.arange(y.shape[-1]) / SR)
    assert np.abs(y - want)[200:-200].max() < 1e-3
    np.testing.assert_array_equal(np.asarray(C.resample(x, SR, SR)), x)


# ---- the comparison is sharp: wrong window, hop or eps must fail it


def test_wrong_window_is_caught(fe, monkeypatch):
    x = _signals(16385, seed=1)
    monkeypatch.setattr(C, "_hann_periodic", lambda n: np.hanning(n).astype(np.float32))  # symmetric Hann
    with jax.disable_jit(), pytest.raises(AssertionError):
        _assert_matches_reference(fe, x)


@pytest.mark.parametrize("kwargs", [dict(hop_length=4000), dict(n_fft=8192), dict(eps=1e-5)])
def test_wrong_parameters_are_caught(fe, kwargs):
    x = _signals(4096 * 7 + 123, seed=2)
    with pytest.raises(AssertionError):
        _assert_matches_reference(fe, x, **kwargs)


# ---- errors


def test_errors():
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        C.chroma_features(np.zeros(100, np.float32))
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        C.chroma_features(np.zeros((1, 2, 100), np.float32))
    with pytest.raises(ValueError, match="empty"):
        C.chroma_features(np.zeros((1, 0), np.float32))
    with pytest.raises(ValueError, match="empty batch"):
        C.chroma_features(np.zeros((0, 10), np.float32))
    with pytest.raises(ValueError, match="n_fft"):
        C.chroma_features(np.zeros((1, 10), np.float32), n_fft=1001)
    with pytest.raises(ValueError, match="length"):
        C.match_frames(np.zeros((1, 3, 12)), 0)
    with pytest.raises(ValueError, match=r"\[B, F, C\]"):
        C.match_frames(np.zeros((3, 12)), 5)
    with pytest.raises(ValueError, match="no frames"):
        C.match_frames(np.zeros((1, 0, 12)), 5)
    with pytest.raises(ValueError):
        C.null_chroma(0)
    with pytest.raises(ValueError, match="sample_rate"):
        C.prepare_melody(np.zeros((1, 100), np.float32), 0)
    with pytest.raises(ValueError, match="sample_rate"):
        C.prepare_melody(np.zeros((1, 100), np.float32), 44100.5)
    with pytest.raises(ValueError, match=r"\[B, N\] or \[B, C, N\]"):
        C.prepare_melody(np.zeros((1, 1, 2, 100), np.float32), SR)
    with pytest.raises(ValueError, match="empty"):
        C.prepare_melody(np.zeros((1, 2, 0), np.float32), SR)
    with pytest.raises(ValueError, match="no channels"):
        C.prepare_melody(np.zeros((1, 0, 10), np.float32), SR)
    with pytest.raises(ValueError, match="floating"):
        C.prepare_melody(np.zeros((1, 100), np.int16), SR)
    with pytest.raises(ValueError, match="empty list"):
        C.prepare_melody([], SR)
    with pytest.raises(ValueError, match=r"\[N\] or \[C, N\]"):
        C.prepare_melody([np.zeros((1, 2, 10), np.float32)], SR)
    with pytest.raises(ValueError, match="simpler ratio"):
        C.resample(np.zeros((1, 10), np.float32), 44101, SR)
