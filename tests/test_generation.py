"""Generation: greedy CFG parity with transformers `generate`, sampling filters, a single compiled loop."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch oracle needs torch (pip install -e .[test])")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import mgjax  # noqa: E402
from mgjax import sampling  # noqa: E402
from mgjax.kernels import cpu as cpu_kernels  # noqa: E402
from mgjax.lm.model import MusicGenLM  # noqa: E402
from helpers_traces import max_traces  # noqa: E402
from oracle import musicgen, reference_generate, reference_generate_from  # noqa: E402
from helpers_tokenizer import build_test_tokenizer  # noqa: E402

torch.set_num_threads(1)

DECODERS = {
    "d32_l2_h4_k4_card32": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48,
                                num_codebooks=4, vocab_size=32),
    "d24_l3_h2_k2_card16": dict(hidden_size=24, num_hidden_layers=3, num_attention_heads=2, ffn_dim=40,
                                num_codebooks=2, vocab_size=16),
}
PROMPTS = ["happy rock with electric guitar and drums", "calm piano"]  # different lengths: row 1 is padded


@pytest.fixture(scope="module", params=sorted(DECODERS))
def pair(request, tmp_path_factory):
    model = musicgen(DECODERS[request.param], seed=3)
    src = tmp_path_factory.mktemp("hf")
    model.save_pretrained(src)
    tokenizer_dir = build_test_tokenizer(str(src))
    dst = tmp_path_factory.mktemp("mg") / "ckpt"
    mgjax.convert_checkpoint(str(src), str(dst))
    from transformers import AutoTokenizer
    return model, AutoTokenizer.from_pretrained(tokenizer_dir), mgjax.MusicGen.load(str(dst))


# transformers only applies its delay mask when max_length >= 2K - 1, i.e. frames >= K - 1: shorter generations
# are not a valid reference there (ours handle them; see test_short_generations).
@pytest.mark.parametrize("frames", [3, 8, 17])
def test_greedy_cfg_matches_transformers(pair, frames):
    model, tokenizer, mg = pair
    encoded = tokenizer(PROMPTS, padding="longest", return_tensors="np")
    assert encoded["attention_mask"].min() == 0, "the test needs padded text"
    ref_audio, ref_codes = reference_generate(model, encoded["input_ids"], encoded["attention_mask"], frames,
                                              do_sample=False, guidance_scale=3.0)
    out = mg.generate(PROMPTS, duration=frames / mg.frame_rate, greedy=True, cfg_coef=3.0)
    assert out.codes.shape == ref_codes.shape == (2, mg.config.lm.num_codebooks, frames)
    np.testing.assert_array_equal(out.codes, ref_codes)
    assert out.wav.shape == ref_audio.shape
    assert np.abs(out.wav - ref_audio).max() <= 1e-3


def test_unconditional_matches_transformers(pair):
    """`generate_unconditional` against transformers `generate(**get_unconditional_inputs(2))` (greedy, token
    exact); guidance over two copies of the null condition (what audiocraft runs) picks the same tokens."""
    model, _, mg = pair
    frames = 17
    ref_audio, ref_codes = reference_generate_from(model, dict(model.get_unconditional_inputs(num_samples=2)), frames,
                                                   do_sample=False)
    out = mg.generate_unconditional(2, duration=frames / mg.frame_rate, greedy=True)
    np.testing.assert_array_equal(out.codes, ref_codes)
    assert out.wav.shape == ref_audio.shape and np.abs(out.wav - ref_audio).max() <= 1e-3
    null_states = jnp.zeros((2, 1, mg.config.text.d_model), jnp.float32)
    guided = sampling.generate_codes(mg.params["lm"], null_states, jnp.zeros((2, 1), jnp.int32), jax.random.key(0),
                                     jnp.zeros((2, mg.config.lm.num_codebooks, 0), jnp.int32),
                                     lm_config=mg.config.lm, frames=frames,
                                     sampling=sampling.SamplingConfig(greedy=True, cfg_coef=3.0))
    np.testing.assert_array_equal(guided, out.codes)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        mg.generate_unconditional(0, duration=0.1)


def test_short_generations(pair):
    _, _, mg = pair
    out = mg.generate(PROMPTS, duration=1 / mg.frame_rate, greedy=True)
    assert out.codes.shape == (2, mg.config.lm.num_codebooks, 1)
    assert out.wav.shape == (2, 1, mg.config.codec.hop_length)


def test_token_ids_and_strings_agree(pair):
    _, tokenizer, mg = pair
    encoded = tokenizer(PROMPTS, padding="longest", return_tensors="np")
    by_text = mg.generate(PROMPTS, duration=0.1, seed=5)
    by_ids = mg.generate(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"], duration=0.1,
                         seed=5)
    np.testing.assert_array_equal(by_text.codes, by_ids.codes)


def test_same_seed_same_output_and_seed_matters(pair):
    _, _, mg = pair
    a = mg.generate(PROMPTS, duration=0.2, seed=1, top_k=0)
    b = mg.generate(PROMPTS, duration=0.2, seed=1, top_k=0)
    c = mg.generate(PROMPTS, duration=0.2, seed=2, top_k=0)
    np.testing.assert_array_equal(a.codes, b.codes)
    assert not np.array_equal(a.codes, c.codes)


def test_top_k_one_equals_greedy(pair):
    _, _, mg = pair
    greedy = mg.generate(PROMPTS, duration=0.2, greedy=True)
    top1 = mg.generate(PROMPTS, duration=0.2, top_k=1, temperature=0.7, seed=9)
    np.testing.assert_array_equal(greedy.codes, top1.codes)


def test_audio_prompt_is_kept_and_continued(pair):
    _, _, mg = pair
    first = mg.generate(PROMPTS, duration=0.3, greedy=True)
    prompt_wav = first.wav[:, :, : int(0.1 * mg.sample_rate)]
    prompt_codes = np.asarray(mg.encode(prompt_wav))
    continued = mg.generate(PROMPTS, duration=0.3, greedy=True, prompt_audio=prompt_wav)
    frames = prompt_codes.shape[-1]
    np.testing.assert_array_equal(continued.codes[:, :, :frames], prompt_codes)
    assert continued.codes.shape == first.codes.shape


def test_audio_prompt_at_another_rate_and_channel_count(pair):
    """A stereo prompt at 16 kHz continues as the same prompt mixed down and resampled to 32 kHz first (what
    audiocraft's `generate_continuation(prompt, prompt_sample_rate)` does); a prompt of the wrong rank is refused."""
    from mgjax.conditioning.chroma import resample

    _, _, mg = pair
    t = np.arange(1600) / 16000
    left, right = np.sin(2 * np.pi * 330 * t), 0.5 * np.sin(2 * np.pi * 440 * t)
    stereo_16k = np.tile(np.stack([left, right])[None], (2, 1, 1)).astype(np.float32)  # [2, 2, 1600]
    mono_32k = np.asarray(resample(stereo_16k.mean(axis=1, keepdims=True), 16000, 32000))
    given = mg.generate(PROMPTS, duration=0.3, greedy=True, prompt_audio=stereo_16k, prompt_sample_rate=16000)
    converted = mg.generate(PROMPTS, duration=0.3, greedy=True, prompt_audio=mono_32k)
    np.testing.assert_array_equal(given.codes, converted.codes)
    as_32k = mg.generate(PROMPTS, duration=0.3, greedy=True, prompt_audio=stereo_16k)  # the rate matters
    prompt_frames = np.asarray(mg.encode(mono_32k)).shape[-1]
    assert not np.array_equal(as_32k.codes[:, :, :prompt_frames], given.codes[:, :, :prompt_frames])
    with pytest.raises(ValueError, match=r"prompt_audio must be \[batch, channels, samples\]"):
        mg.generate(PROMPTS, duration=0.3, prompt_audio=np.zeros(1600, np.float32))


def test_no_recompilation_and_one_compiled_loop(pair):
    _, _, mg = pair
    mg.generate(PROMPTS, duration=0.24, seed=0)
    with max_traces(sampling, "_prepare", 0):  # traced settings: no retrace
        mg.generate(PROMPTS, duration=0.24, seed=1, temperature=0.5, cfg_coef=2.0)
    with pytest.raises(AssertionError, match="traced > 0 times"), max_traces(sampling, "_prepare", 0):
        mg.generate(PROMPTS, duration=0.38, seed=1)  # a length no other test runs, a new program: the guard sees it

    ids, mask = mg.tokenize(PROMPTS)
    cond = mg.encode_text(ids, mask)
    frames = 12
    jaxpr = jax.make_jaxpr(lambda c: sampling._generate_codes(
        mg.params["lm"], c, jnp.asarray(mask), jax.random.key(0), jnp.zeros((2, mg.config.lm.num_codebooks, 0),
                                                                           jnp.int32),
        None, 3.0, 1.0, 0.0, lm_config=mg.config.lm, frames=frames,
        shape=sampling._LoopShape.of(sampling.SamplingConfig())))(cond)
    text = str(jaxpr)
    steps = frames + mg.config.lm.num_codebooks - 1  # delay pattern: S - 1 decoding steps
    assert text.count(f"length={steps}") >= 1, "the decoding steps must run inside one scan of fixed length"


def test_split_layer_decoding_gives_the_same_tokens(pair, monkeypatch):
    """Decoding on split layer weights (the CPU default) and scanning the stacked weights pick the same tokens; the
    split is skipped where its copy of the layer weights would not fit in free memory, or off a CPU."""
    _, _, mg = pair
    ids, mask = mg.tokenize(PROMPTS)
    cond = mg.encode_text(ids, mask)
    prompt = jnp.zeros((2, mg.config.lm.num_codebooks, 0), jnp.int32)
    greedy = sampling.SamplingConfig(greedy=True, cfg_coef=3.0)
    topk = sampling.SamplingConfig(top_k=5, cfg_coef=3.0)
    for config in (greedy, topk):
        runs = [sampling.generate_codes(mg.params["lm"], cond, jnp.asarray(mask), jax.random.key(7), prompt,
                                        lm_config=mg.config.lm, frames=10, sampling=config, split_layers=split)
                for split in (True, False)]
        np.testing.assert_array_equal(runs[0], runs[1])
    # the CPU's kernels split (the tiny model fits in memory), the plain ones elsewhere never do
    assert sampling.split_layers_by_default(mg.params["lm"]) == (jax.default_backend() == "cpu")
    monkeypatch.setattr(cpu_kernels, "free_host_bytes", lambda: cpu_kernels.layer_weight_bytes(mg.params["lm"]) - 1)
    assert not sampling.split_layers_by_default(mg.params["lm"])
    monkeypatch.setattr(cpu_kernels, "free_host_bytes", lambda: None)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert not sampling.split_layers_by_default(mg.params["lm"])


def test_with_compute_dtype_samples_in_that_dtype(pair):
    """`with_compute_dtype` changes the LM's compute dtype and stores its matmul weights in a half dtype (codec,
    T5, norms and embeddings shared as they are): bfloat16 compiles its own sampling program, its greedy tokens
    stay valid codes, and the stored weights give the logits the float32 ones cast per use give; an unknown dtype
    is refused by name."""
    _, _, mg = pair
    bf16 = mg.with_compute_dtype("bfloat16")
    assert bf16.config.lm.compute_dtype == "bfloat16" and mg.config.lm.compute_dtype == "float32"
    assert bf16.params["codec"] is mg.params["codec"] and bf16.config.codec == mg.config.codec
    assert bf16.params["lm"]["layers"]["ffn"]["fc1"].dtype == jnp.bfloat16
    assert bf16.params["lm"]["heads"]["kernel"].dtype == jnp.bfloat16
    assert bf16.params["lm"]["embed"]["embedding"].dtype == jnp.float32
    lm = MusicGenLM(bf16.config.lm)
    codes = jnp.zeros((1, mg.config.lm.num_codebooks, 5), jnp.int32).at[:, :, 2:].set(3)
    cond = jnp.ones((1, 4, mg.config.text.d_model), jnp.float32)
    stored, cast_per_use = (lm.apply({"params": params}, codes, cond, None)
                            for params in (bf16.params["lm"], mg.params["lm"]))
    np.testing.assert_array_equal(np.asarray(stored), np.asarray(cast_per_use))
    with max_traces(sampling, "_prepare", 1):
        out = bf16.generate(PROMPTS, duration=8 / mg.frame_rate, greedy=True)
    assert out.codes.shape == (2, mg.config.lm.num_codebooks, 8)
    assert out.codes.min() >= 0 and out.codes.max() < mg.config.lm.card and np.isfinite(out.wav).all()
    with pytest.raises(ValueError, match="lm.compute_dtype must be float32, bfloat16 or float16, got 'int4'"):
        mg.with_compute_dtype("int4")


def test_free_host_bytes_reads_available_memory(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n")
    assert cpu_kernels.free_host_bytes(str(meminfo)) == 20000000 * 1024  # page cache counts: it is reclaimable
    free = cpu_kernels.free_host_bytes(str(tmp_path / "absent"))  # no /proc: the OS's free pages, or None
    assert free is None or free > 0


@pytest.mark.parametrize("every", [2, 5])
def test_progress_callback_reports_steps_and_changes_no_token(pair, every, monkeypatch):
    """With a progress callback the generation runs `every` steps per compiled call: the callback sees each call's
    end, and the tokens are those of the single compiled loop (top-k sampling, a prompt, both layer layouts)."""
    _, _, mg = pair
    prompt_wav = mg.generate(PROMPTS, duration=0.06, greedy=True).wav
    for split in (True, False):
        monkeypatch.setattr(mgjax.api, "split_layers_by_default", lambda *_, split=split: split)
        seen = []
        reported = mg.generate(PROMPTS, duration=0.2, top_k=5, seed=4, prompt_audio=prompt_wav,
                               progress=lambda step, total: seen.append((step, total)), progress_every=every)
        plain = mg.generate(PROMPTS, duration=0.2, top_k=5, seed=4, prompt_audio=prompt_wav)
        np.testing.assert_array_equal(reported.codes, plain.codes)
    prompt_frames = np.asarray(mg.encode(prompt_wav)).shape[-1]
    total = 10 - prompt_frames + mg.config.lm.num_codebooks - 1
    assert [s for s, _ in seen] == [*range(every, total, every), total] and all(t == total for _, t in seen)


def test_generate_codes_reports_to_the_callback_it_is_given(pair):
    """Progress is an argument (no module state): with a callback `generate_codes` runs `progress_every` steps per
    compiled call and reports after each; without one (or with `progress_every` 0) it runs the one loop. Same
    tokens either way."""
    _, _, mg = pair
    ids, mask = mg.tokenize(PROMPTS)
    arguments = (mg.params["lm"], mg.encode_text(ids, mask), jnp.asarray(mask), jax.random.key(2),
                 jnp.zeros((2, mg.config.lm.num_codebooks, 0), jnp.int32))
    options = dict(lm_config=mg.config.lm, frames=6, sampling=sampling.SamplingConfig(top_k=5))
    seen = []
    reported = sampling.generate_codes(*arguments, progress=lambda step, total: seen.append((step, total)),
                                       progress_every=4, **options)
    np.testing.assert_array_equal(reported, sampling.generate_codes(*arguments, **options))
    total = 6 + mg.config.lm.num_codebooks - 1
    assert seen == [(step, total) for step in (*range(4, total, 4), total)]
    sampling.generate_codes(*arguments, progress=lambda *_: seen.append(None), progress_every=0, **options)
    assert None not in seen


@pytest.mark.parametrize("top_k", [1, 3, 5])
def test_top_k_support_and_frequencies(top_k):
    logits = jnp.array([2.0, 1.5, 1.5, 0.3, -1.0, 0.9, -3.0, 0.0])
    kept = np.asarray(sampling.top_k_filter(logits, top_k))
    order = np.argsort(-np.asarray(logits), kind="stable")
    threshold = np.asarray(logits)[order[top_k - 1]]
    assert set(np.nonzero(np.isfinite(kept))[0]) == set(np.nonzero(np.asarray(logits) >= threshold)[0])
    _check_frequencies(kept)


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9])
def test_top_p_support_and_frequencies(top_p):
    logits = jnp.array([2.0, 1.2, 0.7, 0.3, -1.0, 0.9, -3.0, 0.0])
    kept = np.asarray(sampling.top_p_filter(logits, top_p))
    probs = np.asarray(jax.nn.softmax(logits))
    order = np.argsort(-probs)
    mass_before = np.cumsum(probs[order]) - probs[order]
    expected = set(order[mass_before <= top_p])  # smallest prefix whose mass reaches top_p
    assert set(np.nonzero(np.isfinite(kept))[0]) == expected
    _check_frequencies(kept)


def _check_frequencies(filtered_logits: np.ndarray, draws: int = 40000) -> None:
    """Samples never leave the support; frequencies match the renormalised probabilities within 5 standard errors."""
    shape = sampling._LoopShape(greedy=False, top_k=0, use_top_p=False, use_cfg=False)
    batch = jnp.broadcast_to(jnp.asarray(filtered_logits), (draws, 1, filtered_logits.shape[-1]))
    tokens = np.asarray(sampling.sample_tokens(batch, jax.random.key(0), shape, 1.0, 0.0))[:, 0]
    probs = np.exp(filtered_logits - filtered_logits[np.isfinite(filtered_logits)].max())
    probs = np.where(np.isfinite(filtered_logits), probs, 0.0)
    probs /= probs.sum()
    counts = np.bincount(tokens, minlength=len(probs)) / draws
    assert np.all(counts[probs == 0] == 0)
    stderr = np.sqrt(probs * (1 - probs) / draws) + 1e-12
    assert np.all(np.abs(counts - probs) <= 5 * stderr + 1e-9)


def test_bad_sampling_settings_are_refused(pair):
    _, _, mg = pair
    with pytest.raises(ValueError, match="temperature"):
        mg.generate(PROMPTS, duration=0.1, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        mg.generate(PROMPTS, duration=0.1, top_p=1.5)
    with pytest.raises(ValueError, match="duration"):
        mg.generate(PROMPTS, duration=0.0)
    with pytest.raises(ValueError, match="empty"):
        mg.generate([""], duration=0.1)
