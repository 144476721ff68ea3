"""Melody conditioning: chroma features of a melody waveform, as MusicGen-melody's reference computes them.

The reference is transformers' `MusicgenMelodyFeatureExtractor` (itself a port of audiocraft's `ChromaExtractor`
with `argmax=True`). Its path, reproduced here step by step:

1. audio at another rate is resampled to 32 kHz (torchaudio's windowed-sinc resampler, `rolloff=0.945`,
   `lowpass_filter_width=24`: `mgjax.audio.resample`, which every audio path shares); multichannel audio is
   averaged to mono (here before resampling, both are linear);
   a batch is zero-padded to its longest item and truncated to `chunk_length = 30` s.
2. audio shorter than `n_fft` is zero-padded to `n_fft`, split as evenly as possible (left gets `pad // 2`).
3. power spectrogram (torchaudio `Spectrogram(n_fft=16384, win_length=16384, hop_length=4096, power=2,
   center=True, pad=0, normalized=True)`): periodic Hann window, `center=True` reflect padding of `n_fft // 2`
   on both sides, one-sided FFT, spectrum divided by `sqrt(sum(window**2))` ("window" normalisation), squared
   magnitude. Frames: `F = 1 + max(N, n_fft) // hop_length`.
4. chroma = `chroma_filter_bank(num_frequency_bins=n_fft, num_chroma=12, sampling_rate=32000, tuning=0)` @ spectrum
   (librosa's `filters.chroma`: pitch classes start at C, Gaussian octave weighting centred on octave 5, width 2).
5. per frame, divide by the max over the 12 bins, clamped below at `eps = 1e-6`
   (`torch.nn.functional.normalize(p=inf, eps=1e-6)`).
6. one-hot of the argmax per frame; ties, and silent frames (all zero), go to the first index (C), as torch's
   argmax does.

How the melody model consumes it (transformers `MusicgenMelodyForConditionalGeneration`, audiocraft
`ChromaStemConditioner` with `match_len_on_eval=True`): the one-hot chroma `[B, F, 12]` is projected by a Linear with
bias (`audio_enc_to_dec_proj`, 12 -> D) and matched to `chroma_length` frames (235 = the frames of 30 s of audio)
by *tiling* (repeat the whole sequence `ceil(235 / F)` times) and truncating — see `match_frames`. The projected
prefix goes in front of the projected text states and the whole prefix is prepended to the decoder's input
embeddings. "No melody" (and the unconditional branch of classifier-free guidance) is not zeros: it is a one-hot
on bin 0 in every frame (`null_chroma`), which is what the chroma of silence is as well.

Not reproduced: the reference first removes drums and bass with a source-separation model (demucs `htdemucs`,
keeping the "vocals" + "other" stems). No such weights ship here, so the melody waveform is taken as given: pass a
stem that already holds the melody (or accept that drums/bass may dominate the chroma).

Everything is pure functions; the filter bank, window and resampling kernels are computed once in numpy.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from mgjax.audio import resample  # the one resampler, shared with training data and audio prompts

SAMPLE_RATE = 32000  # the extractor's (and the model's) sampling rate
N_FFT = 16384
HOP_LENGTH = 4096
N_CHROMA = 12
MAX_SECONDS = 30.0  # the extractor's `chunk_length`: longer melodies are truncated
CHROMA_LENGTH = 235  # MusicgenMelodyConfig.chroma_length: frames of 30 s at 32 kHz, 1 + 960000 // 4096
EPS = 1e-6  # torch.nn.functional.normalize's eps as the extractor calls it

ArrayLike = Union[np.ndarray, jax.Array]


# ----------------------------------------------------------------------------------------------------------------
# static pieces (numpy, cached)


@functools.lru_cache(maxsize=None)
def chroma_filter_bank(sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_chroma: int = N_CHROMA) -> np.ndarray:
    """librosa/transformers chroma filter bank with `tuning=0`, L2-normalised columns, octave weighting (5, 2),
    starting at C. Returns a read-only float32 array `[n_chroma, n_fft // 2 + 1]`."""
    if n_fft < 2 or n_chroma < 1 or sample_rate <= 0:
        raise ValueError(f"bad filter bank arguments: sample_rate={sample_rate}, n_fft={n_fft}, n_chroma={n_chroma}")
    freqs = np.linspace(0, sample_rate, n_fft, endpoint=False)[1:]
    # fractional octaves relative to A440 / 16 (C0-ish), times bins per octave
    freq_bins = n_chroma * np.log2(freqs / (440.0 / 16))
    # the 0 Hz bin: 1.5 octaves below bin 1
    freq_bins = np.concatenate(([freq_bins[0] - 1.5 * n_chroma], freq_bins))
    bins_width = np.concatenate((np.maximum(freq_bins[1:] - freq_bins[:-1], 1.0), [1.0]))
    d = np.subtract.outer(freq_bins, np.arange(0, n_chroma, dtype=np.float64)).T  # [n_chroma, n_fft]
    half = np.round(float(n_chroma) / 2)
    d = np.remainder(d + half + 10 * n_chroma, n_chroma) - half
    fb = np.exp(-0.5 * (2 * d / np.tile(bins_width, (n_chroma, 1))) ** 2)
    fb = fb / np.sum(fb**2, axis=0, keepdims=True) ** 0.5
    fb = fb * np.tile(np.exp(-0.5 * ((freq_bins / n_chroma - 5.0) / 2.0) ** 2), (n_chroma, 1))
    fb = np.roll(fb, -3 * (n_chroma // 12), axis=0)
    out = np.ascontiguousarray(fb[:, : int(1 + n_fft / 2)]).astype(np.float32)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=None)
def _hann_periodic(n: int) -> np.ndarray:
    """torch.hann_window(n) (periodic=True): 0.5 - 0.5 cos(2 pi k / n), k < n."""
    w = (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)).astype(np.float32)
    w.setflags(write=False)
    return w


def num_frames(num_samples: int, *, n_fft: int = N_FFT, hop_length: int = HOP_LENGTH) -> int:
    """Frames the extractor yields for `num_samples` samples: `1 + max(num_samples, n_fft) // hop_length`."""
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    return 1 + (max(num_samples, n_fft) + 2 * (n_fft // 2) - n_fft) // hop_length


# ----------------------------------------------------------------------------------------------------------------
# chroma


def _check_stft_args(n_fft: int, hop_length: int, n_chroma: int, sample_rate: int) -> None:
    if n_fft < 2 or n_fft % 2:
        raise ValueError(f"n_fft must be an even integer >= 2, got {n_fft}")
    if hop_length < 1:
        raise ValueError(f"hop_length must be >= 1, got {hop_length}")
    if n_chroma < 1:
        raise ValueError(f"n_chroma must be >= 1, got {n_chroma}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")


def _check_wav_bn(wav) -> None:
    if wav.ndim != 2:
        raise ValueError(f"wav must be [B, N] (mono, batched), got shape {tuple(wav.shape)}")
    if wav.shape[0] == 0:
        raise ValueError("wav has an empty batch")
    if wav.shape[1] == 0:
        raise ValueError("wav is empty (N = 0 samples)")


def _frames(x_BxL: jax.Array, n_fft: int, hop: int, n_frames: int) -> jax.Array:
    """Overlapping frames `[B, F, n_fft]` of `x [B, L]`, frame f starting at f * hop."""
    batch = x_BxL.shape[0]
    if n_fft % hop == 0:  # default path (16384 / 4096): blocks of `hop`, r shifted views concatenated
        r = n_fft // hop
        n_blocks = n_frames + r - 1
        blocks = x_BxL[:, : n_blocks * hop].reshape(batch, n_blocks, hop)
        return jnp.concatenate([blocks[:, j : j + n_frames] for j in range(r)], axis=-1)
    idx = np.arange(n_frames)[:, None] * hop + np.arange(n_fft)[None, :]
    return x_BxL[:, idx]


@functools.partial(jax.jit, static_argnames=("sample_rate", "n_fft", "hop_length", "n_chroma", "eps"))
def _chroma_normalized(wav_BxN, *, sample_rate, n_fft, hop_length, n_chroma, eps):
    wav = wav_BxN.astype(jnp.float32)
    n = wav.shape[1]
    if n < n_fft:  # the extractor's short-input padding: (pad // 2, pad // 2 + pad % 2) zeros
        pad = n_fft - n
        wav = jnp.pad(wav, ((0, 0), (pad // 2, pad // 2 + pad % 2)))
    half = n_fft // 2
    wav = jnp.pad(wav, ((0, 0), (half, half)), mode="reflect")  # torch.stft(center=True, pad_mode="reflect")
    n_frames = 1 + (wav.shape[1] - n_fft) // hop_length
    window = _hann_periodic(n_fft)
    frames = _frames(wav, n_fft, hop_length, n_frames) * window  # [B, F, n_fft]
    spec = jnp.fft.rfft(frames, axis=-1)  # [B, F, n_fft // 2 + 1]
    # torchaudio normalized=True ("window"): spectrum / sqrt(sum(w^2)), then |.|^2
    power = (jnp.real(spec) ** 2 + jnp.imag(spec) ** 2) / np.float32(np.sum(window.astype(np.float64) ** 2))
    fb = chroma_filter_bank(sample_rate, n_fft, n_chroma)  # [C, n_fft // 2 + 1]
    raw = jnp.einsum("bfk,ck->bfc", power, fb, precision=jax.lax.Precision.HIGHEST)  # [B, F, C]
    norm = jnp.max(jnp.abs(raw), axis=-1, keepdims=True)
    return raw / jnp.maximum(norm, eps)


def chroma_normalized(
    wav: ArrayLike,
    *,
    sample_rate: int = SAMPLE_RATE,
    n_fft: int = N_FFT,
    hop_length: int = HOP_LENGTH,
    n_chroma: int = N_CHROMA,
    eps: float = EPS,
) -> jax.Array:
    """Max-normalised chroma before the argmax.

    wav: float `[B, N]`, mono, at `sample_rate` (32 kHz for the melody model). Returns float32
    `[B, F, n_chroma]`, `F = num_frames(N)`, each frame divided by its max (clamped at `eps`), so every non-silent
    frame has max 1 and silent frames are all zero.
    """
    _check_stft_args(n_fft, hop_length, n_chroma, sample_rate)
    wav = jnp.asarray(wav)
    _check_wav_bn(wav)
    if not jnp.issubdtype(wav.dtype, jnp.floating):
        raise ValueError(f"wav must be floating point, got dtype {wav.dtype}")
    return _chroma_normalized(
        wav, sample_rate=int(sample_rate), n_fft=int(n_fft), hop_length=int(hop_length),
        n_chroma=int(n_chroma), eps=float(eps),
    )


def chroma_features(
    wav: ArrayLike,
    *,
    sample_rate: int = SAMPLE_RATE,
    n_fft: int = N_FFT,
    hop_length: int = HOP_LENGTH,
    n_chroma: int = N_CHROMA,
    eps: float = EPS,
) -> jax.Array:
    """One-hot chroma, the melody model's `input_features`.

    wav: float `[B, N]` mono at `sample_rate`. Returns float32 `[B, F, n_chroma]` with exactly one 1 per frame,
    at the argmax of `chroma_normalized` (first index on ties; index 0 for silent frames).
    """
    normed = chroma_normalized(
        wav, sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_chroma=n_chroma, eps=eps
    )
    return jax.nn.one_hot(jnp.argmax(normed, axis=-1), n_chroma, dtype=jnp.float32)


def match_frames(chroma: ArrayLike, length: int = CHROMA_LENGTH) -> jax.Array:
    """Match `chroma [B, F, C]` to `length` frames as the reference does: tile the whole sequence
    `ceil(length / F)` times, then keep the first `length` frames (so a longer chroma is truncated).
    Returns `[B, length, C]`. (transformers tiles after the 12 -> D projection; per-frame linear, so the same.)"""
    chroma = jnp.asarray(chroma)
    if chroma.ndim != 3:
        raise ValueError(f"chroma must be [B, F, C], got shape {tuple(chroma.shape)}")
    if chroma.shape[1] == 0:
        raise ValueError("chroma has no frames")
    length = int(length)
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    reps = -(-length // chroma.shape[1])
    if reps > 1:
        chroma = jnp.tile(chroma, (1, reps, 1))
    return chroma[:, :length]


def null_chroma(batch: int, length: int = CHROMA_LENGTH, n_chroma: int = N_CHROMA) -> jax.Array:
    """"No melody" as the reference encodes it: a one-hot on bin 0 in every frame, float32 `[batch, length,
    n_chroma]`. transformers uses it when `input_features` is missing and for the CFG unconditional branch
    (`zeros; [:, :, 0] = 1`, one frame, tiled to chroma_length); audiocraft gets the same from the chroma of its
    nullified (silent) wav with `match_len_on_eval=True`. Project it like any chroma: the prefix is not zero."""
    batch, length, n_chroma = int(batch), int(length), int(n_chroma)
    if batch < 1 or length < 1 or n_chroma < 1:
        raise ValueError(f"batch, length and n_chroma must be >= 1, got {batch}, {length}, {n_chroma}")
    return jnp.zeros((batch, length, n_chroma), jnp.float32).at[:, :, 0].set(1.0)


# ----------------------------------------------------------------------------------------------------------------
# end to end


def _to_mono(x: ArrayLike, *, batched: bool) -> jax.Array:
    """`[B, N]` / `[B, C, N]` (batched) or `[N]` / `[C, N]` (one item) -> mono `[B, N]` / `[N]` float32."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"melody audio must be floating point, got dtype {x.dtype}")
    chan_rank = 3 if batched else 2
    if x.ndim not in (chan_rank - 1, chan_rank):
        want = "[B, N] or [B, C, N]" if batched else "[N] or [C, N]"
        raise ValueError(f"melody audio must be {want}, got shape {tuple(x.shape)}")
    if x.ndim == chan_rank:
        if x.shape[-2] == 0:
            raise ValueError(f"melody audio has no channels: shape {tuple(x.shape)}")
        x = jnp.mean(x.astype(jnp.float32), axis=-2)
    if x.shape[-1] == 0:
        raise ValueError("melody audio is empty (0 samples)")
    return x.astype(jnp.float32)


def prepare_melody(
    wav: Union[ArrayLike, Sequence[ArrayLike]],
    sample_rate: int,
    *,
    max_seconds: Optional[float] = MAX_SECONDS,
    n_fft: int = N_FFT,
    hop_length: int = HOP_LENGTH,
    n_chroma: int = N_CHROMA,
) -> jax.Array:
    """Melody audio -> one-hot chroma `[B, F, n_chroma]` (not yet matched to `chroma_length`: see `match_frames`).

    wav: float `[B, N]` or `[B, C, N]` at `sample_rate`, or a list of B items `[N]` / `[C, N]` of different
    lengths (zero-padded at the end to the longest, as the extractor pads a batch). Channels are averaged, audio is
    resampled to 32 kHz (`resample`), truncated to `max_seconds` (the extractor's 30 s; None keeps everything),
    then `chroma_features`. The melody is used as given (no demucs stem separation, see the module docstring).
    """
    if int(sample_rate) != sample_rate or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate}")
    if isinstance(wav, (list, tuple)):
        if len(wav) == 0:
            raise ValueError("empty list of melodies")
        items = [resample(_to_mono(w, batched=False), sample_rate, SAMPLE_RATE) for w in wav]
        longest = max(int(w.shape[-1]) for w in items)
        mono = jnp.stack([jnp.pad(w, (0, longest - w.shape[-1])) for w in items])
    else:
        mono = resample(_to_mono(wav, batched=True), sample_rate, SAMPLE_RATE)
    if mono.shape[0] == 0:
        raise ValueError("empty batch of melodies")
    if max_seconds is not None:
        if max_seconds <= 0:
            raise ValueError(f"max_seconds must be positive or None, got {max_seconds}")
        mono = mono[:, : max(1, int(round(max_seconds * SAMPLE_RATE)))]
    return chroma_features(mono, sample_rate=SAMPLE_RATE, n_fft=n_fft, hop_length=hop_length, n_chroma=n_chroma)


__all__ = [
    "SAMPLE_RATE", "N_FFT", "HOP_LENGTH", "N_CHROMA", "MAX_SECONDS", "CHROMA_LENGTH",
    "chroma_filter_bank", "num_frames", "chroma_normalized", "chroma_features", "match_frames", "null_chroma",
    "resample", "prepare_melody",
]
