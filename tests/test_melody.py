"""Melody conditioning (greedy parity with transformers' MusicGen-melody) and generation beyond the window."""
from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch oracle needs torch (pip install -e .[test])")

import mgjax  # noqa: E402
from mgjax import sampling  # noqa: E402
from mgjax.kernels import cpu as cpu_kernels  # noqa: E402
from mgjax.conditioning.chroma import prepare_melody  # noqa: E402
from mgjax.config import load_config  # noqa: E402
from helpers_tokenizer import build_test_tokenizer  # noqa: E402
from helpers_traces import max_traces  # noqa: E402
from oracle import musicgen_melody, reference_generate  # noqa: E402

torch.set_num_threads(1)
DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48, num_codebooks=4,
               vocab_size=32)
PROMPTS = ["calm piano melody in a minor key", "happy rock"]


def chords(seconds: float, roots: list[float], rate: int = 32000) -> np.ndarray:
    """`[len(roots), 1, N]`: a major triad on each root, with a little noise."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(0)
    wav = [sum(np.sin(2 * np.pi * root * ratio * t) for ratio in (1.0, 1.26, 1.5)) / 3 for root in roots]
    return (np.stack(wav)[:, None] + 0.01 * rng.standard_normal((len(roots), 1, len(t)))).astype(np.float32)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    model = musicgen_melody(DECODER, seed=5, chroma_length=40)
    src = tmp_path_factory.mktemp("hf_melody")
    model.save_pretrained(src)
    build_test_tokenizer(str(src))
    dst = tmp_path_factory.mktemp("mg_melody") / "ckpt"
    mgjax.convert_checkpoint(str(src), str(dst))
    from transformers import AutoTokenizer
    return model, AutoTokenizer.from_pretrained(str(src)), mgjax.MusicGen.load(str(dst))


@pytest.mark.parametrize("with_melody", [True, False])
def test_greedy_melody_generation_matches_transformers(pair, with_melody):
    model, tokenizer, mg = pair
    assert mg.config.lm.conditioning == "prepend"
    encoded = tokenizer(PROMPTS, padding="longest", return_tensors="np")
    melody = chords(1.5, [220.0, 330.0])
    kwargs = dict(do_sample=False, guidance_scale=3.0)
    if with_melody:  # transformers' feature extractor needs torchaudio; the chroma itself is checked in test_chroma
        kwargs["input_features"] = torch.from_numpy(np.array(prepare_melody(melody, 32000)))
    frames = 9
    ref_audio, ref_codes = reference_generate(model, encoded["input_ids"], encoded["attention_mask"], frames,
                                              **kwargs)
    out = mg.generate(PROMPTS, duration=frames / mg.frame_rate, greedy=True, cfg_coef=3.0,
                      melody=melody if with_melody else None)
    np.testing.assert_array_equal(out.codes, ref_codes)
    assert np.abs(out.wav - ref_audio).max() <= 1e-3


def test_unconditional_melody_model_matches_transformers(pair):
    """A melody model's `generate_unconditional` (null text, null melody) against transformers given text whose
    mask is all zero and no melody (it has no `get_unconditional_inputs`), greedy, token exact."""
    model, _, mg = pair
    frames = 9
    ids, mask = np.zeros((2, 1), np.int64), np.zeros((2, 1), np.int64)
    ref_audio, ref_codes = reference_generate(model, ids, mask, frames, do_sample=False, guidance_scale=1.0)
    out = mg.generate_unconditional(2, duration=frames / mg.frame_rate, greedy=True)
    np.testing.assert_array_equal(out.codes, ref_codes)
    assert np.abs(out.wav - ref_audio).max() <= 1e-3


def test_melody_changes_the_output(pair):
    _, _, mg = pair
    a = mg.generate(PROMPTS, duration=0.2, greedy=True, melody=chords(1.0, [220.0, 220.0]))
    b = mg.generate(PROMPTS, duration=0.2, greedy=True, melody=chords(1.0, [311.0, 311.0]))
    assert not np.array_equal(a.codes, b.codes)


def test_melody_on_a_text_only_model_is_refused():
    mg = long_form_model("cross")
    with pytest.raises(ValueError, match="MusicGen-melody"):
        mg.generate(input_ids=np.ones((1, 3), np.int32), duration=0.1, melody=np.zeros((1, 1, 3200), np.float32))


@pytest.mark.parametrize("conditioning", ["cross", "prepend"])
def test_long_generation_goes_window_by_window(conditioning):
    """A 2 s window advancing 1 s: every window is prompted with the previous one's tail, the melody is read on
    from each window's start, and only two programs compile (the first window and the prompted ones)."""
    mg = long_form_model(conditioning)
    ids, mask = np.array([[4, 8, 15, 16], [23, 42, 0, 0]], np.int32), np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    cond = mg.encode_text(ids, mask)
    window, stride = mg.window_frames()
    melody = chords(3.0, [220.0, 262.0]) if conditioning == "prepend" else None
    frames = int(9.5 * mg.frame_rate)  # not a whole number of strides: the last window is cut
    with max_traces(sampling, "_prepare", 2):
        codes, windows = mg.generate_windows(cond, mask, np.zeros((2, 4, 0), np.int32), frames,
                                             sampling.SamplingConfig(top_k=10), jax_key(3), melody=melody)
    assert codes.shape == (2, 4, frames) and len(windows) == -(-(frames - window) // stride) + 1
    for previous, current in zip(windows, windows[1:]):
        np.testing.assert_array_equal(current[:, :, : window - stride], previous[:, :, stride:])
    np.testing.assert_array_equal(codes[:, :, :window], windows[0])
    tail = frames - (len(windows) - 1) * stride
    np.testing.assert_array_equal(codes[:, :, -(tail - (window - stride)):],
                                  windows[-1][:, :, window - stride: tail])
    if melody is not None:  # the melody is re-indexed: windows 1 s apart see different chroma
        first, second = (np.asarray(mg._window_chroma(melody, 32000, 2, t)) for t in (0.0, 1.0))
        assert not np.array_equal(first, second)


def test_memory_changing_between_windows_does_not_recompile(monkeypatch):
    """Whether decoding splits the layers (`split_layers_by_default` reads available memory) is decided once per
    long generation: available memory swinging between windows must not compile a program per window."""
    mg = long_form_model("cross")
    swings = iter([0, 10**15] * 8)
    monkeypatch.setattr(cpu_kernels, "free_host_bytes", lambda: next(swings))
    ids, mask = np.array([[4, 8, 15, 16]], np.int32), np.ones((1, 4), np.int32)
    cond = mg.encode_text(ids, mask)
    frames = int(5.0 * mg.frame_rate)
    with max_traces(sampling, "_prepare", 2):
        _, windows = mg.generate_windows(cond, mask, np.zeros((1, 4, 0), np.int32), frames,
                                         sampling.SamplingConfig(top_k=10), jax_key(5))
    assert len(windows) == 4


def test_extend_stride_sets_how_far_each_window_advances():
    mg = long_form_model("cross").with_extend_stride(0.5)  # 2 s window: each new window keeps 1.5 s of the last
    assert mg.window_frames() == (100, 25)
    ids, mask = np.array([[4, 8, 15]], np.int32), np.ones((1, 3), np.int32)
    codes, windows = mg.generate_windows(mg.encode_text(ids, mask), mask, np.zeros((1, 4, 0), np.int32), 150,
                                         sampling.SamplingConfig(top_k=10), jax_key(2))
    assert codes.shape == (1, 4, 150) and len(windows) == 3
    np.testing.assert_array_equal(windows[1][:, :, :75], windows[0][:, :, 25:])
    with pytest.raises(ValueError, match=r"lm.extend_stride=2.0 must lie in \(0, lm.max_duration=2.0\)"):
        mg.with_extend_stride(2.0)


def test_seventy_seconds_is_exactly_seventy_seconds():
    mg = long_form_model("cross")
    out = mg.generate(input_ids=np.array([[4, 8, 15]], np.int32), duration=70.0, top_k=10, seed=3)
    assert out.wav.shape == (1, 1, 70 * 32000) and out.codes.shape == (1, 4, 70 * 50)


@functools.lru_cache(maxsize=2)
def long_form_model(conditioning: str):
    config = load_config("tiny", ["lm.max_duration=2", "lm.extend_stride=1", f"lm.conditioning={conditioning}",
                                  "lm.chroma_length=8", "lm.num_layers=1"])
    return mgjax.MusicGen.from_config(config, seed=1)


def jax_key(seed: int):
    import jax
    return jax.random.key(seed)
