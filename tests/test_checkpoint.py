"""Checkpoints: what conversion writes, and how corrupt, truncated, mismatched or foreign directories are refused."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch", reason="the PyTorch oracle needs torch (pip install -e .[test])")

import mgjax  # noqa: E402
from mgjax.checkpoint import CheckpointError  # noqa: E402
from mgjax.convert.io import ConversionError  # noqa: E402
from oracle import musicgen  # noqa: E402

DECODER = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=24, num_codebooks=2,
               vocab_size=16)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    src = tmp_path_factory.mktemp("hf")
    musicgen(DECODER, seed=7).save_pretrained(src)
    return src


@pytest.fixture()
def converted(source, tmp_path):
    return mgjax.convert_checkpoint(str(source), str(tmp_path / "ckpt"))


def test_round_trip_keeps_every_weight(source, converted):
    mg = mgjax.MusicGen.load(converted)
    assert set(os.listdir(converted)) >= {"mgjax.json", "config.yaml", "params"}
    assert mg.config.lm.num_codebooks == 2 and mg.config.lm.card == 16
    codec = mgjax.Codec.load(converted)  # the codec alone out of a whole MusicGen checkpoint
    np.testing.assert_array_equal(np.asarray(codec.params["quantizer"]["codebooks"]),
                                  np.asarray(mg.params["codec"]["quantizer"]["codebooks"]))


def test_mismatched_config_names_the_first_differing_leaf(converted):
    path = os.path.join(converted, "config.yaml")
    with open(path) as f:
        raw = yaml.safe_load(f)
    raw["lm"]["ffn_dim"] = 32
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    with pytest.raises(CheckpointError, match=r"lm\].*'layers/ffn/fc1' has shape"):
        mgjax.MusicGen.load(converted)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # no callback leaked on refusal
def test_truncated_params_are_refused(converted):
    params_dir = os.path.join(converted, "params")
    data = [p for p in os.listdir(params_dir) if p.startswith("ocdbt.process") or p == "d"]
    assert data, os.listdir(params_dir)
    for name in data:
        shutil.rmtree(os.path.join(params_dir, name))
    with pytest.raises(CheckpointError, match="re-run the conversion"):
        mgjax.MusicGen.load(converted)
    shutil.rmtree(params_dir)
    with pytest.raises(CheckpointError, match="incomplete or corrupt"):
        mgjax.MusicGen.load(converted)


def test_corrupt_meta_and_foreign_directories_are_refused(converted, tmp_path):
    with open(os.path.join(converted, "mgjax.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        mgjax.MusicGen.load(converted)
    with pytest.raises(CheckpointError, match="not an mgjax checkpoint"):
        mgjax.MusicGen.load(str(tmp_path))
    with pytest.raises(CheckpointError, match="does not exist"):
        mgjax.MusicGen.load(str(tmp_path / "missing"))


def test_a_codec_checkpoint_is_not_a_musicgen(tmp_path):
    from test_codec import build_oracle
    src = tmp_path / "encodec"
    build_oracle(dict(sampling_rate=8000, upsampling_ratios=[4, 2], num_filters=2, hidden_size=4,
                      num_lstm_layers=1, use_causal_conv=False), 2, 16, seed=0).save_pretrained(src)
    dst = mgjax.convert_checkpoint(str(src), str(tmp_path / "codec"))
    assert json.load(open(os.path.join(dst, "mgjax.json")))["kind"] == "codec"
    with pytest.raises(CheckpointError, match="Codec.load"):
        mgjax.MusicGen.load(dst)


def test_failed_conversion_leaves_nothing(source, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated download
    with pytest.raises(ConversionError, match="truncated or corrupt"):
        mgjax.convert_checkpoint(str(broken), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".out")] == []

    config = json.loads((broken / "config.json").read_text())
    config["decoder"]["num_hidden_layers"] = 3  # the weights hold one layer
    shutil.copy(source / "model.safetensors", weights)
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="does not match its config"):
        mgjax.convert_checkpoint(str(broken), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_existing_output_is_not_overwritten_unless_asked(source, converted):
    with pytest.raises(CheckpointError, match="already exists"):
        mgjax.convert_checkpoint(str(source), converted)
    assert mgjax.convert_checkpoint(str(source), converted, overwrite=True) == converted
    mgjax.MusicGen.load(converted)


SHARDED_LOAD = """
import sys
import jax
import numpy as np
import mgjax
from mgjax.sharding import make_mesh
mesh = make_mesh((2, 2, 2))
sharded = mgjax.MusicGen.load(sys.argv[1], mesh=mesh)
plain = mgjax.MusicGen.load(sys.argv[1])
fc1 = sharded.params["lm"]["layers"]["ffn"]["fc1"]
assert len(jax.devices()) == 8 and fc1.sharding.mesh.shape == mesh.shape
assert not fc1.sharding.is_fully_replicated, fc1.sharding
shard_shapes = {s.data.shape for s in fc1.addressable_shards}
assert shard_shapes == {(fc1.shape[0], fc1.shape[1] // 2, fc1.shape[2] // 2)}, shard_shapes
for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(plain.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
# the sharded model samples the same tokens (decoding on split layer weights, each split keeping its shards)
ids = np.array([[3, 5, 7, 1], [4, 2, 1, 0]]); mask = (ids > 0).astype(np.int32)
kwargs = dict(input_ids=ids, attention_mask=mask, duration=6 / plain.frame_rate, greedy=True)
np.testing.assert_array_equal(sharded.generate(**kwargs).codes, plain.generate(**kwargs).codes)
# and in calls of a few steps with the KV cache donated between them (the progress path), sampling with top-k
seen = []
kwargs = dict(kwargs, greedy=False, top_k=5, seed=3)
reported = sharded.generate(**kwargs, progress=lambda step, total: seen.append(step), progress_every=3)
np.testing.assert_array_equal(reported.codes, plain.generate(**kwargs).codes)
assert seen[:-1] == list(range(3, seen[-1], 3)) and seen[-1] == 6 + plain.config.lm.num_codebooks - 1, seen
print("OK")
"""


def test_load_straight_into_shards_on_a_mesh(converted):
    import subprocess
    import sys
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SHARDED_LOAD, converted], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
