"""The sampler under every interleaving pattern, and the int8 weight format."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mgjax
from mgjax.config import load_config
from mgjax.lm.model import MusicGenLM, quantize_lm_params
from mgjax.lm.patterns import pattern_from_config

CASES = [("delay", []), ("delay", ["lm.pattern_flatten_first=2", "lm.pattern_empty_initial=1"]),
         ("parallel", []), ("parallel", ["lm.pattern_empty_initial=2"]), ("unroll", []),
         ("unroll", ["lm.pattern_flattening=[0,1,1,2]"]), ("coarse_first", []), ("musiclm", [])]


def tiny_model(overrides=()):
    config = load_config("tiny", ["lm.dim=48", "lm.num_heads=4", "lm.ffn_dim=64", *overrides])
    return mgjax.MusicGen(config, dict(base_params(), lm=mgjax.api.init_lm_params(config)))


@functools.lru_cache(maxsize=1)
def base_params():
    """Codec and T5 params of the tiny config, shared: only the LM differs between these tests."""
    return mgjax.api.init_params(load_config("tiny", ["lm.dim=48", "lm.num_heads=4", "lm.ffn_dim=64"]))


def perturbed(params, scale=0.5):
    """Random init gives near-uniform logits; push them apart so argmax is decisive."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("name, overrides", CASES, ids=[f"{p}{i}" for i, (p, _) in enumerate(CASES)])
def test_greedy_generation_is_the_argmax_of_the_teacher_forced_model(name, overrides):
    """Whatever the pattern, each generated token is the argmax of the full (uncached) model's logits at the step
    before it: the cached loop feeds the right columns at the right positions and writes only valid cells."""
    mg = tiny_model([f"lm.pattern={name}", *overrides])
    mg.params["lm"] = perturbed(mg.params["lm"])
    ids = np.array([[5, 9, 13, 2], [7, 3, 0, 0]], np.int32)
    mask = (ids > 0).astype(np.int32)
    frames = 9
    out = mg.generate(input_ids=ids, attention_mask=mask, duration=frames / mg.frame_rate, greedy=True, cfg_coef=1.0)
    assert out.codes.shape == (2, mg.config.lm.num_codebooks, frames)
    pattern = pattern_from_config(mg.config.lm)
    special = mg.config.lm.card
    seq = np.asarray(pattern.build(out.codes, special))
    cond = mg.encode_text(ids, mask)
    logits = np.asarray(jax.jit(MusicGenLM(mg.config.lm).apply)({"params": mg.params["lm"]}, jnp.asarray(seq), cond,
                                                                jnp.asarray(mask, bool)))
    step_map = pattern.step_map(frames)
    valid_k, valid_s = np.nonzero(step_map >= 0)
    assert len(valid_k) == mg.config.lm.num_codebooks * frames
    predicted = logits[:, valid_k, valid_s - 1].argmax(-1)
    np.testing.assert_array_equal(seq[:, valid_k, valid_s], predicted)
    assert (seq[:, step_map < 0] == special).all()


def test_int8_weights_track_float32():
    mg = tiny_model()
    lm_params = perturbed(mg.params["lm"], 0.05)
    int8_config = dataclasses.replace(mg.config.lm, weight_format="int8")
    int8_params = quantize_lm_params(lm_params)
    expected = mgjax.api.abstract_params(dataclasses.replace(mg.config, lm=int8_config))["lm"]
    assert jax.tree.structure(expected) == jax.tree.structure(int8_params)
    assert jax.tree.leaves(jax.tree.map(lambda a, b: a.shape == b.shape, expected, int8_params)) == \
        [True] * len(jax.tree.leaves(expected))  # stored as the model declares them (contracted axes last)
    assert int8_params["layers"]["ffn"]["fc1"].dtype == jnp.int8
    codes = jax.random.randint(jax.random.key(1), (2, 4, 16), 0, mg.config.lm.card)
    cond = jax.random.normal(jax.random.key(2), (2, 5, mg.config.text.d_model))
    cond_mask = jnp.ones((2, 5), bool)
    full = jax.jit(MusicGenLM(mg.config.lm).apply)({"params": lm_params}, codes, cond, cond_mask)
    quant = jax.jit(MusicGenLM(int8_config).apply)({"params": int8_params}, codes, cond, cond_mask)
    relative = float(jnp.abs(full - quant).max() / full.std())
    assert relative < 0.1, relative  # per-channel int8: a few percent of the logits' spread
    assert float((full.argmax(-1) == quant.argmax(-1)).mean()) > 0.9


def test_unknown_pattern_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown lm.pattern 'zigzag'"):
        load_config("tiny", ["lm.pattern=zigzag"])


def test_pattern_sweep_times_the_sampler(tmp_path):
    """`train.py --sweep` (the pattern ablation) trains each variant, then times the sampler itself on it: the
    table holds a measured speed, and a sampler error would fail the sweep, not hide in it."""
    import re

    import yaml
    from helpers_scripts import load_script

    cli = load_script("train.py", "train_cli")
    spec = {"base": "train-tiny",
            "overrides": ["train.batch_size=2", "train.segment_duration=0.3", "train.warmup_steps=0",
                          "train.total_steps=2", "train.eval_batches=1", "train.log_every=1000",
                          f"train.output_dir={tmp_path / 'runs'}"],
            "variants": [{"name": "musiclm", "overrides": ["lm.pattern=musiclm"]}]}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    rows = cli.sweep(cli.parse_args(["--sweep", str(tmp_path / "sweep.yaml"), "--synthetic"]))
    assert [row["pattern"] for row in rows] == ["musiclm"]
    assert re.fullmatch(r"\d+\.\d s/s", rows[0]["sampling_speed"]), rows
    # musiclm lays out one codebook per step: 1 + 4 x 15 steps for 0.3 s (15 frames)
    assert rows[0]["steps_per_s_audio"] == pytest.approx((1 + 4 * 15) / 0.3)
