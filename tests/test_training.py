"""Training: loss falls, exact resume, every pattern, gradient accumulation, CFG dropout, frozen/trainable T5,
bf16 compute, the schedule, and the train.py CLI. Single device (multi-device checks live in test_sharding.py)."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgjax import checkpoint, sharding, training
from mgjax.config import load_config
from mgjax.data import SyntheticDataset
from mgjax.lm.patterns import PATTERNS, pattern_from_config

from helpers_scripts import load_script  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Most tests share these settings, so they share compiled programs (see training.programs); keep them aligned.
BASE = ["train.batch_size=8", "train.max_text_tokens=8", "train.segment_duration=0.6", "train.log_every=1000",
        "train.warmup_steps=0", "train.total_steps=6", "train.ema_decay=0.9"]


def tiny(*overrides: str):
    return load_config("train-tiny", BASE + list(overrides))


@pytest.fixture(scope="module")
def mesh():
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    jax.set_mesh(mesh)
    return mesh


def synthetic(config, stream: int = 0) -> SyntheticDataset:
    return SyntheticDataset(config.train, config.lm.num_codebooks, config.lm.card, config.codec.frame_rate,
                            config.text.vocab_size, process_index=0, process_count=1, stream=stream)


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(host(a)), jax.tree.leaves(host(b))))


def test_loss_falls_on_synthetic_data(mesh):
    """From ~log(card) = 4.16 to below 1.0 within 300 steps (measured: 4.15 -> 0.06, valid 0.06)."""
    config = tiny("train.total_steps=300", "train.warmup_steps=10")
    trainer = training.Trainer.create(config, mesh)
    losses = training.fit(trainer, synthetic(config))
    assert len(losses) == 300
    assert np.mean(losses[:3]) > 3.9
    assert np.mean(losses[-20:]) < 1.0, losses[-20:]
    valid = trainer.evaluate([synthetic(config, stream=1).batch(i) for i in range(2)])
    assert valid["loss"] < 1.0 and valid["per_codebook"].shape == (4,)


def test_kill_and_resume_equals_uninterrupted(mesh, tmp_path):
    config = tiny("train.checkpoint_every=3")
    data = synthetic(config)
    straight = training.Trainer.create(config, mesh)
    losses = training.fit(straight, data)

    manager = checkpoint.TrainCheckpointer(str(tmp_path), save_every=3, keep=2)
    first = training.Trainer.create(config, mesh, manager)
    head = training.fit(first, data, until=3, checkpointer=manager)
    manager.close()
    del first  # "killed": nothing of the first run survives but its checkpoint

    manager = checkpoint.TrainCheckpointer(str(tmp_path), save_every=3, keep=2)
    assert manager.latest_step() == 3
    resumed = training.Trainer.create(config, mesh, manager)
    assert resumed.step_count == 3 and resumed.meta["data_position"] == 3
    tail = training.fit(resumed, data, checkpointer=manager)
    manager.close()

    np.testing.assert_allclose(head + tail, losses, rtol=0, atol=1e-6)
    assert max_abs_diff(resumed.state.params, straight.state.params) <= 1e-6
    assert max_abs_diff(resumed.state.opt_state, straight.state.opt_state) <= 1e-6
    assert max_abs_diff(resumed.state.ema, straight.state.ema) <= 1e-6
    assert max_abs_diff(resumed.state.ema, resumed.state.params) > 0  # EMA is a separate, lagging copy
    assert int(resumed.state.step) == 6 and manager.all_steps() == [3, 6]


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_every_pattern_trains_through_the_same_path(mesh, name):
    """Only lm.pattern changes. One variant also computes in bfloat16 (float32 master params must stay)."""
    extra = ["lm.pattern_group_size=2"] if name == "musiclm" else []
    extra += ["lm.compute_dtype=bfloat16"] if name == "parallel" else []
    config = tiny(f"lm.pattern={name}", *extra)
    trainer = training.Trainer.create(config, mesh)
    losses = training.fit(trainer, synthetic(config))
    assert all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < losses[0] - 0.05, losses
    assert {x.dtype for x in jax.tree.leaves(trainer.state.params)} == {jnp.dtype(jnp.float32)}


def test_stereo_model_trains_with_its_interleaved_delays(mesh):
    """A stereo LM (8 codebooks, left/right interleaved, both channels' level k delayed by k) trains through the
    same path; its pattern is the stereo delay pattern."""
    config = tiny("lm.audio_channels=2", "lm.num_codebooks=8")
    assert pattern_from_config(config.lm).delays == (0, 0, 1, 1, 2, 2, 3, 3)
    trainer = training.Trainer.create(config, mesh)
    losses = training.fit(trainer, synthetic(config))
    assert all(np.isfinite(losses)) and np.mean(losses[-2:]) < losses[0] - 0.05, losses


def test_grad_accumulation_matches_one_big_batch(mesh):
    """With no padding every microbatch has the same number of valid targets, so the mean of microbatch
    gradients is the full-batch gradient: one step with 4 microbatches = one step on the whole batch."""
    one, four = tiny(), tiny("train.grad_accum_steps=4")
    local = synthetic(one).batch(0)
    local["mask"][:] = True
    batch = sharding.global_batch(local, mesh)
    results = []
    for config in (one, four):
        prog = training.programs(config, mesh)
        state, frozen = prog.init_state(jax.random.PRNGKey(0)), prog.init_frozen(jax.random.PRNGKey(0))
        results.append(prog.train_step(state, frozen, batch))
    (state1, metrics1), (state4, metrics4) = results
    np.testing.assert_allclose(metrics1["loss"], metrics4["loss"], atol=1e-6)
    np.testing.assert_allclose(metrics1["grad_norm"], metrics4["grad_norm"], rtol=1e-5)
    assert float(metrics1["tokens"]) == float(metrics4["tokens"])
    # Adam's first update is ~lr * g / |g|: float noise on near-zero gradients shows at ~1e-6 (lr is 3e-3)
    assert max_abs_diff(state1.params, state4.params) <= 1e-5


def test_cfg_dropout_gives_the_null_condition_to_the_whole_batch(mesh):
    config = tiny()
    prog = training.programs(config, mesh)
    state, frozen = prog.init_state(jax.random.PRNGKey(0)), prog.init_frozen(jax.random.PRNGKey(0))
    batch = sharding.global_batch(synthetic(config).batch(0), mesh)
    other = dict(batch, text_ids=(batch["text_ids"] + 7) % config.text.vocab_size)
    pattern = training.pattern_from_config(config.lm)
    loss = jax.jit(lambda b, d: training.pattern_loss(config, pattern, state.params, frozen, b, d)[0])
    assert float(loss(batch, True)) == float(loss(other, True))  # text ignored: zero states, zero mask
    assert float(loss(batch, False)) != float(loss(other, False))
    cond, mask = training.drop_condition(jnp.ones((2, 3, 4)), jnp.ones((2, 3), jnp.int32), jnp.asarray(True))
    assert not cond.any() and not mask.any()


def test_opening_loss_weight_weighs_the_training_loss_only(mesh):
    config = tiny("train.opening_seconds=0.2", "train.opening_loss_weight=4")
    frames = round(0.2 * config.codec.frame_rate)
    weights = np.asarray(training.opening_weights(config, 30))
    assert (weights[:frames] == 4).all() and (weights[frames:] == 1).all()
    assert training.opening_weights(tiny(), 30) is None
    plain = tiny()
    prog, plain_prog = training.programs(config, mesh), training.programs(plain, mesh)
    state, frozen = prog.init_state(jax.random.PRNGKey(0)), prog.init_frozen(jax.random.PRNGKey(0))
    batch = sharding.global_batch(synthetic(config).batch(0), mesh)
    # Validation stays the plain mean, whatever the training weights.
    assert float(prog.eval_step(state.params, frozen, batch)["loss"]) == pytest.approx(
        float(plain_prog.eval_step(state.params, frozen, batch)["loss"]), abs=1e-6)
    unweighted = float(plain_prog.train_step(prog.init_state(jax.random.PRNGKey(0)), frozen, batch)[1]["loss"])
    weighted = float(prog.train_step(state, frozen, batch)[1]["loss"])  # the state is donated: used last
    assert abs(weighted - unweighted) > 1e-4
    with pytest.raises(Exception, match="opening_loss_weight"):
        tiny("train.opening_loss_weight=0")


def test_text_encoder_is_frozen_unless_asked(mesh):
    frozen_cfg = tiny()
    trainer = training.Trainer.create(frozen_cfg, mesh)
    text_before = host(trainer.frozen["text"])
    training.fit(trainer, synthetic(frozen_cfg), until=2)
    assert set(trainer.state.params) == {"lm"}
    assert "text" not in str(jax.tree_util.tree_structure(trainer.state.opt_state))
    assert max_abs_diff(trainer.frozen["text"], text_before) == 0

    trainable = tiny("train.train_text_encoder=true", "train.cfg_dropout=0.0")
    trainer = training.Trainer.create(trainable, mesh)
    assert set(trainer.state.params) == {"lm", "text"} and trainer.frozen == {}
    before = host(trainer.state.params["text"])
    training.fit(trainer, synthetic(trainable), until=2)
    assert max_abs_diff(trainer.state.params["text"], before) > 0


def test_warmup_cosine_schedule():
    config = load_config("train-tiny", ["train.learning_rate=1e-3", "train.warmup_steps=10", "train.total_steps=110"])
    schedule = training.learning_rate_schedule(config.train)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(5e-4)
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(60)) == pytest.approx(5e-4, rel=1e-4)
    assert float(schedule(110)) == pytest.approx(0.0, abs=1e-9)


def _train_cli():
    return load_script("train.py", "train_cli")


def test_train_cli_synthetic_run_and_resume(mesh, tmp_path, capsys):
    cli = _train_cli()
    args = ["--config", "train-tiny", "--synthetic", *BASE, f"train.output_dir={tmp_path}",
            "train.checkpoint_every=3", "train.eval_every=3", "train.log_every=3"]
    assert cli.main(args + ["--steps", "3", "--quiet"]) == 0
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]
    assert "step 3 loss" not in capsys.readouterr().out  # quiet: nothing per step on the console...
    with open(tmp_path / "metrics.jsonl") as f:  # ...but the metrics are still recorded
        assert [json.loads(line)["step"] for line in f] == [3]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "resumed from" in out and "step 6 loss" in out and "tokens/s" in out and "valid" in out
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]


def test_cli_reports_bad_config_and_missing_data(mesh, tmp_path, capsys):
    cli = _train_cli()
    assert cli.main(["--config", "train-tiny", "train.no_such_key=1"]) == 2
    assert "unknown config key 'train.no_such_key'" in capsys.readouterr().err
    assert cli.main(["--config", "train-tiny", "text.num_layers=0"]) == 2  # found when a checkpoint save failed
    assert "text.num_layers and text.num_heads must be >= 1, got 0" in capsys.readouterr().err
    assert cli.main(["--config", "train-tiny", "lm.num_layers=0"]) == 2
    assert "lm.num_layers and lm.num_heads must be >= 1, got 0" in capsys.readouterr().err
    assert cli.main(["--config", "train-tiny", f"train.data_dir={tmp_path}/nowhere",
                     f"train.output_dir={tmp_path}/out"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_reports_a_failed_checkpoint_write_and_keeps_the_last_good_one(mesh, tmp_path, capsys, monkeypatch):
    """A full disk mid-run: a clear error (exit 2) naming the step, the directory and how to resume; the newest
    complete checkpoint stays, and nothing of the failed step is left behind."""
    import orbax.checkpoint as ocp

    cli = _train_cli()
    args = ["--config", "train-tiny", "--synthetic", *BASE, f"train.output_dir={tmp_path}",
            "train.checkpoint_every=3", "train.eval_every=3", "train.log_every=3", "--quiet"]
    assert cli.main(args + ["--steps", "3"]) == 0
    capsys.readouterr()

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"cannot write the training checkpoint {tmp_path}/checkpoints/6" in err
    assert "No space left on device" in err and "it resumes from step 3" in err
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]


def test_checkpointer_close_reports_a_failed_async_write_and_still_releases_the_manager(tmp_path, monkeypatch):
    ckpt = checkpoint.TrainCheckpointer(str(tmp_path), save_every=1, keep=1)
    closed = []

    def failed_write():
        raise RuntimeError("async commit failed")

    monkeypatch.setattr(ckpt.manager, "wait_until_finished", failed_write)
    monkeypatch.setattr(ckpt.manager, "close", lambda: closed.append(True))
    with pytest.raises(checkpoint.CheckpointError, match="async commit failed.*it starts afresh"):
        ckpt.close()
    assert closed == [True]
    with pytest.raises(KeyboardInterrupt):  # as a context manager: the error in flight wins over the failed close
        with ckpt:
            raise KeyboardInterrupt
    assert closed == [True, True]


def test_melody_model_trains_on_chroma_and_cfg_nulls_the_melody(mesh):
    """Prepend conditioning: the batch's chroma reaches the LM; CFG dropout swaps it for the null melody (one-hot
    on bin 0), so with the condition dropped any chroma gives the same loss as the null one."""
    config = tiny("lm.conditioning=prepend", "lm.chroma_length=8")
    prog = training.programs(config, mesh)
    state, frozen = prog.init_state(jax.random.PRNGKey(0)), prog.init_frozen(jax.random.PRNGKey(0))
    local = synthetic(config).batch(0)
    rng = np.random.default_rng(0)
    chroma = np.eye(12, dtype=np.float32)[rng.integers(0, 12, (8, 5))]
    null = np.eye(12, dtype=np.float32)[np.zeros((8, 5), int)]
    pattern = training.pattern_from_config(config.lm)
    loss = jax.jit(lambda b, d: training.pattern_loss(config, pattern, state.params, frozen, b, d)[0])
    with_melody = sharding.global_batch(dict(local, chroma=chroma), mesh)
    with_null = sharding.global_batch(dict(local, chroma=null), mesh)
    assert float(loss(with_melody, False)) != float(loss(with_null, False))
    assert float(loss(with_melody, True)) == float(loss(with_null, True))


def test_pretrained_checkpoint_supplies_t5_and_finetuned_lm(mesh, tmp_path):
    """`train.pretrained` (a converted checkpoint): T5 always comes from it; the LM too with `train.finetune`."""
    from mgjax.codec.encodec import init_codec_params

    base = tiny()
    prog = training.programs(base, mesh)
    rng = jax.random.PRNGKey(42)  # other values than the run's own init (seed 0)
    lm, text = prog.init_state(rng).params["lm"], prog.init_frozen(rng)["text"]
    codec = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(lambda: init_codec_params(base.codec)))
    directory = str(tmp_path / "pretrained")
    checkpoint.save(directory, "musicgen", {}, {"codec": codec, "text": host(text), "lm": host(lm)})

    fresh = training.Trainer.create(tiny(f"train.pretrained={directory}"), mesh)
    assert max_abs_diff(fresh.frozen["text"], text) == 0 and max_abs_diff(fresh.state.params["lm"], lm) > 0
    tuned = training.Trainer.create(tiny(f"train.pretrained={directory}", "train.finetune=true"), mesh)
    assert max_abs_diff(tuned.state.params["lm"], lm) == 0 and max_abs_diff(tuned.state.ema["lm"], lm) == 0
    losses = training.fit(tuned, synthetic(base), until=1)
    assert np.isfinite(losses[0])


def test_every_musicgen_recipe_in_configs_loads():
    """Each MusicGen YAML in configs/ (train_codec.py's, with a codec_train section, aside) is a valid config; the
    stereo fine-tuning recipe is stereo with its interleaved delays."""
    names = sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, "configs"))
                   if f.endswith(".yaml") and "codec_train" not in open(os.path.join(ROOT, "configs", f)).read())
    assert {"musicgen-small", "train-small", "train-stereo-small", "train-tiny"} <= set(names)
    configs = {name: load_config(name) for name in names}
    stereo = configs["train-stereo-small"]
    assert stereo.lm.audio_channels == 2 and stereo.train.finetune
    assert pattern_from_config(stereo.lm).delays == (0, 0, 1, 1, 2, 2, 3, 3)
