"""The pod compile check (`mgjax.aot`, `train.py --compile-only`) on a small real TPU topology, compiled by libtpu on
this CPU: train-tiny's step on v5e:2x2 with mesh (data 2, fsdp 1, tensor 2) must fit, call the Pallas attention
kernel and materialise no `[B, H, T, T]` scores; the dense path, compiled the same way, does materialise them (so
the check can fail). The generation program compiles too. Each compile runs in its own process: libtpu must be on
the path before JAX starts. Needs `make tpu-tools` (run by `make test`); skipped, saying so, where it is missing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mgjax import aot

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "aot_worker.py"
TIMEOUT_S = 300

pytestmark = pytest.mark.skipif(
    not os.path.isdir(os.path.join(aot.LIBTPU_DIR, "libtpu")),
    reason=f"libtpu is not installed in {aot.LIBTPU_DIR}: run `make tpu-tools` (CI's `make test` does)")


def compile_tiny(*overrides: str) -> dict:
    """Findings of tests/aot_worker.py for train-tiny on v5e:2x2, mesh (2, 1, 2)."""
    done = subprocess.run([sys.executable, str(WORKER), "v5e:2x2", "2,1,2", *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_train_step_fits_a_v5e_slice_with_the_attention_kernel():
    found = compile_tiny()
    assert found["device_kind"] == "TPU v5 lite"
    assert found["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
    assert found["train_fits"] and found["train_headroom"] > 0.9, found
    assert found["train_attention_kernel"], "the TPU program lost its Pallas attention kernel"
    assert found["square_scores"] == [], f"attention scores materialised: {found['square_scores']}"
    assert "all-reduce" in found["train_collectives"]  # gradients over data, activations over tensor
    assert found["generate_fits"] and found["generate_steps"] > 0 and found["generate_step_seconds"] > 0


def test_dense_attention_shows_what_the_kernel_avoids():
    found = compile_tiny("lm.attention=dense")
    assert not found["train_attention_kernel"]
    assert found["square_scores"], "the dense path should materialise [B, H, T, T] scores"


def test_cli_reports_and_refuses(tmp_path):
    """train.py --compile-only prints the report; a missing --topology and an unknown one are clear errors."""
    env = dict(os.environ)
    base = [sys.executable, "train.py", "--config", "train-tiny", "--compile-only"]
    done = subprocess.run(base + ["--topology", "v5e:2x2", "train.mesh_shape=[2,1,2]"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    for words in ("memory per device", "headroom", "estimated step time", "MFU", "collectives",
                  "attention kernel: yes"):
        assert words in done.stdout
    done = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode != 0 and "--topology" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run(base + ["--topology", "v9z:3x3"], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 2 and "unknown TPU topology" in done.stderr and "Traceback" not in done.stderr


def test_out_of_memory_becomes_a_does_not_fit_report():
    class Refused:
        def compile(self):
            raise RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
                               "space hbm. Used 32.12G of 15.75G hbm. Exceeded hbm capacity by 16.37G.\n"
                               "Total hbm usage >= 32.12G: the total memory required exceeds available HBM")

    with pytest.raises(aot.DoesNotFit, match="Ran out of memory|exceeds"):
        aot._compile(Refused())
