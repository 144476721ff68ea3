"""Mesh and logical-axis rules; on 8 simulated CPU devices (in a subprocess, so this process keeps one device):
a (2,2,2)-mesh train step equals the single-device one, params really are sharded, and a checkpoint written on
one mesh restores onto others with identical values."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from mgjax import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rules_table_names_every_logical_axis_once():
    names = [name for name, _ in sharding.LOGICAL_RULES]
    assert len(names) == len(set(names))
    for name in ("embed", "mlp", "heads", "kv", "vocab", "codebooks", "layers", "conv_in", "conv_out", "batch"):
        assert name in names
    for _, axes in sharding.LOGICAL_RULES:
        for axis in (axes,) if isinstance(axes, str) else (axes or ()):
            assert axis in sharding.MESH_AXES


@pytest.mark.parametrize("shape, devices, expected", [
    ((-1, 1, 1), 8, (8, 1, 1)), ((2, -1, 2), 8, (2, 2, 2)), ((1, 1, -1), 1, (1, 1, 1)), ((2, 2, 2), 8, (2, 2, 2))])
def test_resolve_mesh_shape(shape, devices, expected):
    assert sharding.resolve_mesh_shape(shape, devices) == expected


@pytest.mark.parametrize("shape, devices, message", [
    ((3, -1, 1), 8, "not divisible"), ((-1, -1, 1), 8, "at most one -1"), ((2, 2, 1), 8, "needs 4 devices"),
    ((8, 1), 8, "needs 3 entries")])
def test_resolve_mesh_shape_errors(shape, devices, message):
    with pytest.raises(ValueError, match=message):
        sharding.resolve_mesh_shape(shape, devices)


def test_logical_to_mesh_spec_and_uneven_dims():
    mesh = AbstractMesh((2, 2, 2), sharding.MESH_AXES)
    assert sharding.mesh_spec(("codebooks", "vocab", "embed"), (4, 64, 32), mesh) == P(None, "tensor", "fsdp")
    # card + 1 rows cannot be split in two: replicated rather than an error
    assert sharding.mesh_spec(("codebooks", "vocab", "embed"), (4, 65, 32), mesh) == P(None, None, "fsdp")
    assert sharding.mesh_spec(("layers", "embed", "heads", "kv"), (2, 32, 4, 8), mesh) == P(None, "fsdp", "tensor")
    assert sharding.mesh_spec(("layers", "mlp", "embed"), (2, 64, 32), mesh) == P(None, "tensor", "fsdp")
    assert sharding.mesh_spec(None, (3,), mesh) == P()


def test_batch_size_must_split_over_data_parallel_devices():
    mesh = AbstractMesh((2, 2, 2), sharding.MESH_AXES)
    sharding.check_batch_size(8, mesh, grad_accum_steps=2)
    with pytest.raises(ValueError, match="multiple of data\\*fsdp=4"):
        sharding.check_batch_size(6, mesh)


MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np
    from mgjax import checkpoint, sharding, training
    from mgjax.config import load_config
    from mgjax.data import SyntheticDataset

    out_dir = sys.argv[1]
    config = load_config("train-tiny", ["train.batch_size=16", "train.max_text_tokens=8", "train.segment_duration=0.6",
                                        "train.warmup_steps=1", "train.total_steps=6", "train.grad_accum_steps=2"])
    data = SyntheticDataset(config.train, 4, config.lm.card, 50.0, config.text.vocab_size)
    host = lambda tree: jax.tree.map(np.asarray, jax.device_get(tree))
    def max_err(a, b):
        return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(host(a)), jax.tree.leaves(host(b))))

    def two_steps(mesh):
        jax.set_mesh(mesh)
        trainer = training.Trainer.create(config, mesh)
        losses = training.fit(trainer, data, until=2)
        return trainer, losses

    single, single_losses = two_steps(sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    mesh = sharding.make_mesh((2, 2, 2))
    sharded, sharded_losses = two_steps(mesh)
    specs = {k: str(s.sharding.spec) for k, s in
             zip(sharding.describe(sharded.state.params), jax.tree.leaves(sharded.state.params))}
    fc1 = sharded.state.params["lm"]["layers"]["ffn"]["fc1"]
    mu = sharded.state.opt_state[1][0].mu["lm"]["layers"]["ffn"]["fc1"]
    result = {
        "step_err": max_err(single.state.params, sharded.state.params),
        "opt_err": max_err(single.state.opt_state, sharded.state.opt_state),
        "losses": [single_losses, sharded_losses],
        "fc1_spec": str(fc1.sharding.spec), "fc1_devices": len(fc1.sharding.device_set),
        "fc1_shard_shape": list(fc1.addressable_shards[0].data.shape),
        "mu_spec": str(mu.sharding.spec), "frozen_spec": str(sharded.frozen["text"]["embedding"].sharding.spec),
        "specs": specs,
    }

    manager = checkpoint.TrainCheckpointer(out_dir, save_every=1, keep=1)
    manager.save(2, sharded.state, training.checkpoint_meta(config, 2), force=True)
    manager.close()
    for name, shape, devices in (("8x1x1", (8, 1, 1), jax.devices()), ("1dev", (1, 1, 1), jax.devices()[:1])):
        target = sharding.make_mesh(shape, devices)
        jax.set_mesh(target)
        manager = checkpoint.TrainCheckpointer(out_dir, save_every=1, keep=1)
        state, meta = manager.restore(training.programs(config, target).abstract_state)  # what Trainer.create does
        manager.close()
        leaf = state.params["lm"]["layers"]["ffn"]["fc1"]
        result[name] = {"err": max_err(state, sharded.state), "step": int(state.step), "position": meta["data_position"],
                        "mesh": dict(leaf.sharding.mesh.shape), "spec": str(leaf.sharding.spec),
                        "devices": len(leaf.sharding.device_set)}
    print("RESULT" + json.dumps(result))
""")


@pytest.fixture(scope="module")
def multi_device(tmp_path_factory):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    ckpt = tmp_path_factory.mktemp("mesh-ckpt")
    proc = subprocess.run([sys.executable, "-c", MULTI_DEVICE_SCRIPT, str(ckpt)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(lines[-1][len("RESULT"):])


def test_sharded_steps_match_single_device(multi_device):
    assert multi_device["step_err"] <= 1e-5
    assert multi_device["opt_err"] <= 1e-5
    single, sharded = multi_device["losses"]
    assert max(abs(a - b) for a, b in zip(single, sharded)) <= 1e-5


def test_params_and_optimizer_state_are_sharded(multi_device):
    assert multi_device["fc1_spec"] == "P(None, 'fsdp', 'tensor')"
    assert multi_device["fc1_devices"] == 8
    assert multi_device["fc1_shard_shape"] == [2, 16, 32]  # [L, D/fsdp, F/tensor] of [2, 32, 64]
    assert multi_device["mu_spec"] == multi_device["fc1_spec"]
    assert "fsdp" in multi_device["frozen_spec"]
    assert sum("fsdp" in spec for spec in multi_device["specs"].values()) >= len(multi_device["specs"]) - 1


@pytest.mark.parametrize("target, mesh, spec, devices", [
    ("8x1x1", {"data": 8, "fsdp": 1, "tensor": 1}, "P(None, 'fsdp', 'tensor')", 8),
    ("1dev", {"data": 1, "fsdp": 1, "tensor": 1}, "P(None, 'fsdp', 'tensor')", 1)])
def test_checkpoint_restores_onto_another_mesh(multi_device, target, mesh, spec, devices):
    restored = multi_device[target]
    assert restored["err"] == 0.0 and restored["step"] == 2 and restored["position"] == 2
    assert restored["mesh"] == mesh and restored["devices"] == devices and restored["spec"] == spec


def test_main_process_keeps_one_device(multi_device):
    """The 8 simulated devices live in the subprocess only: this process still has one CPU device (and its
    accelerators, if any), and a `-1` mesh axis takes every device it has."""
    assert len(jax.devices("cpu")) == 1
    mesh = sharding.make_mesh((-1, 1, 1))
    assert mesh.devices.size == len(jax.devices()) and dict(mesh.shape)["data"] == len(jax.devices())
