"""Audio in one place: reading (with validation), channel matching, resampling, the stereo layout of a mono codec,
loudness and level normalisation, atomic writing. Arrays are `[C, N]` float32 (`[..., C, N]` where batches pass).

Training data (`data.py`), codec training, audio prompts, melodies (`conditioning/chroma.py`), the CLI, the app and
the eval all come through here, so training audio and inference inputs pass through the same filters:
- one channel rule (`match_channels`): any number of channels -> mono averages them, mono -> C channels duplicates
  it, anything else (e.g. 6 channels -> stereo) is an error;
- one resampler (`resample`): torchaudio's windowed-sinc `functional.resample` with the settings of MusicGen-melody's
  feature extractor, whose chroma parity rests on it. `RESAMPLER` names it; the training code cache keys on it.
"""
from __future__ import annotations

import functools
import math
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
    """`[..., C, N]` -> `[..., channels, N]` (dtype kept): any C -> 1 averages the channels, 1 -> channels
    duplicates the mono signal; other changes (e.g. 6 channels -> 2) are refused."""
    wav = np.asarray(wav_CxN)
    if wav.ndim < 2 or wav.shape[-2] < 1 or channels < 1:
        raise ValueError(f"cannot map audio of shape {wav.shape} ([..., channels, samples]) to {channels} channels")
    if wav.shape[-2] == channels:
        return wav
    if channels == 1:
        return wav.mean(axis=-2, keepdims=True)
    if wav.shape[-2] == 1:
        return np.repeat(wav, channels, axis=-2)
    raise ValueError(f"cannot map {wav.shape[-2]} audio channels to {channels}: only a mix-down to mono or a mono "
                     f"signal duplicated are defined; give mono or {channels}-channel audio")


def load_audio(path: str, sample_rate: int, channels: int) -> np.ndarray:
    """A file as `[channels, N]` float32 at `sample_rate` (mixed down / resampled as needed)."""
    wav, rate = read_audio(path)
    return conform(wav, rate, sample_rate, channels)


def conform(wav_CxN: np.ndarray, rate: int, sample_rate: int, channels: int) -> np.ndarray:
    """`[..., C, N]` audio at `rate` -> `[..., channels, M]` float32 at `sample_rate` (`match_channels`, then
    `resample` where the rates differ)."""
    wav = match_channels(wav_CxN, channels)
    if int(rate) == int(sample_rate):
        return np.asarray(wav, np.float32)
    return np.asarray(resample(wav, rate, sample_rate))


# ----------------------------------------------------------------------------------------------- resampling
# torchaudio.functional.resample (sinc_interp_hann) as MusicGen-melody's feature extractor calls it. Changing
# anything here changes training codes: change `RESAMPLER` with it, so cached codes are encoded again.
RESAMPLE_ROLLOFF = 0.945
RESAMPLE_LOWPASS_WIDTH = 24
RESAMPLER = f"torchaudio-sinc-hann-width{RESAMPLE_LOWPASS_WIDTH}-rolloff{RESAMPLE_ROLLOFF}"
_MAX_KERNEL_ELEMENTS = 1 << 26  # resampling kernels above this (256 MiB float32) are refused


@functools.lru_cache(maxsize=16)
def _sinc_resample_kernel(orig: int, new: int, lowpass_filter_width: int, rolloff: float):
    """Kernel `[new, 1, 2 * width + orig]` (rates already divided by their gcd) and `width`."""
    base = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base)
    n_taps = 2 * width + orig
    if new * n_taps > _MAX_KERNEL_ELEMENTS:
        raise ValueError(
            f"resampling {orig}:{new} (after gcd reduction) needs a {new} x {n_taps} kernel; "
            "resample to a rate with a simpler ratio to 32000 first"
        )
    # float32 arithmetic in torchaudio's order (it builds the kernel in the waveform's dtype, float32 here), so
    # the kernel matches the reference's to ~1 ulp rather than being a (slightly different) float64 one
    f32 = np.float32
    idx = np.arange(-width, width + orig, dtype=f32)[None, :] / f32(orig)
    t = np.arange(0, -new, -1, dtype=f32)[:, None] / f32(new) + idx
    t = np.clip(t * f32(base), f32(-lowpass_filter_width), f32(lowpass_filter_width))
    window = np.cos(t * f32(math.pi) / f32(lowpass_filter_width) / f32(2)) ** 2
    t = t * f32(math.pi)
    with np.errstate(divide="ignore", invalid="ignore"):
        kern = np.where(t == 0, f32(1.0), np.sin(t) / t)
    kern = (kern * (window * f32(base / orig))).astype(np.float32)[:, None, :]
    kern.setflags(write=False)
    return kern, width


@functools.lru_cache(maxsize=None)
def _resample_blocks():
    """The jitted polyphase convolution (built on first use: reading and writing audio never import jax)."""
    import jax
    import jax.numpy as jnp

    @functools.partial(jax.jit, static_argnames=("orig", "width"))
    def apply(x_BxN, kernel, *, orig, width):
        x = jnp.pad(x_BxN.astype(jnp.float32), ((0, 0), (width, width + orig)))[:, None, :]  # [B, 1, L]
        y = jax.lax.conv_general_dilated(
            x, kernel, window_strides=(orig,), padding="VALID",
            dimension_numbers=("NCH", "OIH", "NCH"), precision=jax.lax.Precision.HIGHEST,
        )  # [B, new, J]: output sample j * new + phase
        return jnp.swapaxes(y, 1, 2).reshape(x.shape[0], -1)

    return apply


def _bucketed(blocks: int) -> int:
    """`blocks` rounded up to one of 16 steps per octave: files of many lengths share a few compiled
    resamplers, for at most 1/8 more work. Zeros past the end change no output sample."""
    step = 1 << max(0, blocks.bit_length() - 4)
    return -(-blocks // step) * step


def resample(wav, orig_sr: int, new_sr: int, *, lowpass_filter_width: int = RESAMPLE_LOWPASS_WIDTH,
             rolloff: float = RESAMPLE_ROLLOFF):
    """Band-limited (Hann-windowed sinc) resampling along the last axis, torchaudio's algorithm with the
    melody extractor's settings. wav `[..., N]` -> float32 jax array `[..., ceil(N * new_sr / orig_sr)]`."""
    import jax.numpy as jnp

    if int(orig_sr) != orig_sr or int(new_sr) != new_sr or orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive integers, got {orig_sr} -> {new_sr}")
    wav = jnp.asarray(wav)
    if wav.ndim < 1 or wav.shape[-1] == 0:
        raise ValueError(f"wav must have a non-empty last (time) axis, got shape {tuple(wav.shape)}")
    orig_sr, new_sr = int(orig_sr), int(new_sr)
    if orig_sr == new_sr:
        return wav.astype(jnp.float32)
    g = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // g, new_sr // g
    kernel, width = _sinc_resample_kernel(orig, new, int(lowpass_filter_width), float(rolloff))
    lead, n = wav.shape[:-1], wav.shape[-1]
    out_len = -(-new * n // orig)
    x = wav.reshape(-1, n)
    x = jnp.pad(x, ((0, 0), (0, orig * _bucketed(-(-n // orig)) - n)))
    y = _resample_blocks()(x, jnp.asarray(kernel), orig=orig, width=width)
    return y[:, :out_len].reshape(lead + (out_len,))


# ----------------------------------------------------------------------------------------------- stereo layout
# A stereo MusicGen codes each channel with the mono codec, as its own batch row, and interleaves the codebooks
# left/right: `[L0, R0, L1, R1, ...]` (transformers and audiocraft). Rows are channel-major: all left rows, then all
# right ones. These work on numpy and jax arrays alike.

def channels_to_batch(wav_BxCxN):
    """`[B, C, N]` -> `[C * B, 1, N]`: each channel a row of its own (row `c * B + b`)."""
    batch, channels, samples = wav_BxCxN.shape
    return wav_BxCxN.transpose(1, 0, 2).reshape(channels * batch, 1, samples)


def channels_from_batch(wav_CBx1xN, batch: int):
    """`[C * B, 1, N]` (rows as `channels_to_batch` lays them out) -> `[B, C, N]`."""
    rows, one, samples = wav_CBx1xN.shape
    if one != 1 or rows % batch:
        raise ValueError(f"expected [channels x {batch}, 1, samples] audio rows, got shape {wav_CBx1xN.shape}")
    return wav_CBx1xN.reshape(rows // batch, batch, samples).transpose(1, 0, 2)


def codes_to_batch(codes_BxKxT, channels: int = 2):
    """Interleaved codes `[B, C * K', T]` (`[L0, R0, L1, R1, ...]`) -> `[C * B, K', T]`: left rows, then right."""
    batch, codebooks, frames = codes_BxKxT.shape
    if codebooks % channels:
        raise ValueError(f"{codebooks} codebooks do not interleave {channels} channels")
    per_channel = codebooks // channels
    return (codes_BxKxT.reshape(batch, per_channel, channels, frames).transpose(2, 0, 1, 3)
            .reshape(channels * batch, per_channel, frames))


def codes_from_batch(codes_CBxKxT, batch: int):
    """`[C * B, K', T]` (left rows, then right) -> interleaved `[B, C * K', T]`; inverse of `codes_to_batch`."""
    rows, per_channel, frames = codes_CBxKxT.shape
    if rows % batch:
        raise ValueError(f"{rows} code rows are not a whole number of channels of batch {batch}")
    channels = rows // batch
    return (codes_CBxKxT.reshape(channels, batch, per_channel, frames).transpose(1, 2, 0, 3)
            .reshape(batch, per_channel * channels, frames))


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
