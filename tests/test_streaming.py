"""Streaming: the incremental codec decode equals the offline one, and `generate_stream` yields, chunk by chunk and
before the LM is done, exactly `generate`'s audio (mono, stereo, melody, continuation, across window boundaries)."""
import dataclasses
import functools

import numpy as np
import pytest

import mgjax
from mgjax.codec.encodec import Codec
from mgjax.codec.streaming import StreamingDecoder
from mgjax.config import load_config

TOLERANCE = 1e-5  # float32 round-off: the same convolutions on spans of other lengths (measured: <= 6e-7)
PIECES = [[1] * 3 + [5] * 4, [3, 0, 11, 2]]  # frames per push (the rest comes with final=True)


@functools.lru_cache(maxsize=None)
def codec(lstm_layers: int, **overrides) -> Codec:
    config = load_config("tiny").codec
    return Codec.from_config(dataclasses.replace(config, lstm_layers=lstm_layers, **overrides), seed=1)


def streamed(decoder: StreamingDecoder, codes: np.ndarray, pieces: list[int]) -> np.ndarray:
    """`codes [B, K, T]` pushed `pieces` frames at a time, the rest with `final=True`: the audio `[B, C, N]`."""
    out, position = [], 0
    for size in pieces:
        out.append(decoder.push(codes[:, :, position: position + size]))
        position += size
    out.append(decoder.push(codes[:, :, position:], final=True))
    assert all(chunk.shape[-1] % decoder.config.hop_length == 0 for chunk in out)
    return np.concatenate(out, axis=-1)


def random_codes(config, frames: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.codebook_size, (2, config.n_q, frames)).astype(np.int32)


@pytest.mark.parametrize("lstm_layers", [0, 2])
def test_incremental_decode_equals_offline(lstm_layers):
    """Non-causal reflect-padded convolutions (+ a carried 2-layer LSTM): any split of the codes into pushes gives
    the offline decode's samples, the first and last ones (padded at the true edges) included."""
    model = codec(lstm_layers)
    codes = random_codes(model.config, 23)
    offline = np.asarray(model.decode(codes))
    for pieces in PIECES:
        np.testing.assert_allclose(streamed(StreamingDecoder(model, 2), codes, pieces), offline, atol=TOLERANCE,
                                   rtol=0)


@pytest.mark.parametrize("overrides", [dict(lstm_layers=1, pad_mode="constant", true_skip=False, n_residual_layers=2),
                                       dict(lstm_layers=1, causal=True, trim_right_ratio=0.5)])
def test_carried_state_equals_offline_for_every_layer_kind(overrides):
    """Chunks smaller than the pushes (several calls of the one program per push), zero padding, 1x1-conv
    shortcuts, causal convolutions with an asymmetric transposed trim, dilated residual stacks; and streams
    shorter than the first call needs (decoded offline at the end) or empty."""
    model = codec(**overrides)
    codes = random_codes(model.config, 23, seed=2)
    offline = np.asarray(model.decode(codes))
    for pieces, chunk in [([9, 1, 6], 4), ([2, 2, 2], 5)]:
        decoder = StreamingDecoder(model, 2, chunk_frames=chunk)
        np.testing.assert_allclose(streamed(decoder, codes, pieces), offline, atol=TOLERANCE, rtol=0)
    for frames in sorted({0, StreamingDecoder(model, 2).min_start - 1}):
        short = codes[:, :, :frames]
        wav = streamed(StreamingDecoder(model, 2), short, [1] * frames)
        assert wav.shape == (2, 1, frames * model.config.hop_length)
        if frames:
            np.testing.assert_allclose(wav, np.asarray(model.decode(short)), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("lstm_layers", [0, 1])
def test_lookahead_is_the_smallest_exact_one(lstm_layers):
    """The stream returns a frame's audio as soon as `lookahead_frames` more frames are known, and no exact stream
    can do it sooner: in the offline decode, changing the codes from frame j on leaves frames before
    j - lookahead as they were and changes frame j - lookahead by far more than round-off."""
    model = codec(lstm_layers)
    hop = model.config.hop_length
    codes = random_codes(model.config, 20, seed=1)
    offline = np.asarray(model.decode(codes))
    decoder = StreamingDecoder(model, 2)
    lookahead = decoder.lookahead_frames
    assert lookahead > 0
    for j in (10, 14):
        changed = codes.copy()
        changed[:, :, j:] = random_codes(model.config, 20 - j, seed=j)
        moved = np.abs(np.asarray(model.decode(changed)) - offline)
        assert moved[..., : (j - lookahead) * hop].max() <= TOLERANCE
        assert moved[..., (j - lookahead) * hop: (j - lookahead + 1) * hop].max() > 1e-3
    returned = 0
    for known in range(1, 20):
        returned += decoder.push(codes[:, :, known - 1: known]).shape[-1]
        assert returned == max(0, known - lookahead) * hop


def test_one_program_serves_every_push():
    """Pushes of every size up to `chunk_frames` (and larger ones, split), the first call and the last included,
    share one compiled program, which a second stream reuses: nothing compiles after the first audio."""
    from mgjax.codec.streaming import _decode_step

    model = codec(1)
    codes = random_codes(model.config, 60, seed=3)
    before = _decode_step._cache_size()
    for _ in range(2):
        np.testing.assert_allclose(streamed(StreamingDecoder(model, 2, chunk_frames=7), codes,
                                            [5, 7, 1, 3, 0, 6, 2, 12, 4]), np.asarray(model.decode(codes)),
                                   atol=TOLERANCE, rtol=0)
    assert _decode_step._cache_size() - before == 1


@functools.lru_cache(maxsize=4)
def model(*overrides: str) -> mgjax.MusicGen:
    """Tiny random-weight model with a 1 s window advancing 0.5 s (1.6 s pieces cross two window boundaries)."""
    config = load_config("tiny", ["lm.max_duration=1", "lm.extend_stride=0.5", "lm.num_layers=1", *overrides])
    return mgjax.MusicGen.from_config(config, seed=2)


IDS = np.array([[4, 8, 15, 16], [23, 42, 0, 0]], np.int32)
MASK = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.int32)


def assert_stream_is_generate(mg: mgjax.MusicGen, chunk_steps: int, **options):
    """`generate_stream`'s chunks, concatenated, equal `generate`'s audio; the first chunk arrives while sampling
    steps remain (progress seen before it < total), and more than one chunk comes."""
    events = []
    chunks = []
    for chunk in mg.generate_stream(input_ids=IDS, attention_mask=MASK, chunk_steps=chunk_steps,
                                    progress=lambda step, total: events.append((step, total)), **options):
        assert chunk.ndim == 3 and chunk.shape[:2] == (2, mg.channels) and chunk.shape[-1] > 0
        chunks.append(chunk)
        events.append("chunk")
    offline = mg.generate(input_ids=IDS, attention_mask=MASK, **options).wav
    np.testing.assert_allclose(np.concatenate(chunks, axis=-1), offline, atol=TOLERANCE, rtol=0)
    first = events.index("chunk")
    step, total = events[first - 1]
    assert step < total and len(chunks) > 2, events


def tones(seconds: float, *hertz: float) -> np.ndarray:
    """One sine per batch row, `[len(hertz), 1, N]` at 32 kHz."""
    t = np.arange(int(seconds * 32000)) / 32000
    return np.stack([np.sin(2 * np.pi * f * t) for f in hertz])[:, None].astype(np.float32) * 0.5


def test_mono_melody_continuation_stream_equals_generate_across_windows():
    """Mono melody model, 1.6 s in 1 s windows (two boundaries), continuing a 0.3 s audio prompt (whose audio is
    streamed first) with the melody re-read per window."""
    mg = model("lm.conditioning=prepend", "lm.chroma_length=8")
    assert_stream_is_generate(mg, 7, duration=1.6, top_k=10, seed=3, prompt_audio=tones(0.3, 440, 550),
                              melody=tones(1.2, 220, 330))


def test_stereo_stream_equals_generate_across_windows():
    assert_stream_is_generate(model("lm.audio_channels=2", "lm.num_codebooks=8"), 9, duration=1.1, top_p=0.9,
                              seed=4)


def test_stream_checks_its_arguments_before_returning():
    """Bad settings raise at the call (as `generate` does), not at the first chunk."""
    with pytest.raises(mgjax.validation.InvalidInput, match="temperature"):
        model("lm.audio_channels=2", "lm.num_codebooks=8").generate_stream(input_ids=IDS, attention_mask=MASK,
                                                                           temperature=float("nan"))


def test_abandoned_stream_stops_its_sampling_thread():
    """A stream closed after its first chunk stops and joins the thread its LM samples on (none left behind)."""
    import threading

    stream = model("lm.audio_channels=2", "lm.num_codebooks=8").generate_stream(
        input_ids=IDS, attention_mask=MASK, chunk_steps=9, duration=1.1, top_p=0.9, seed=4)
    assert next(stream).shape[-1] > 0
    stream.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("mgjax-stream") and t.is_alive()]
