"""Multi-host training, really run: two CPU processes of 4 devices each train `train-tiny` through the train.py CLI
(`train.distributed=true`, jax.distributed on localhost, gloo collectives between the processes), each building
only its own rows of every batch, and write one Orbax checkpoint together. One process of 8 devices then restores it
and compares it with a single-process 8-device run of the same config and mesh.

jax.make_mesh lays the devices out in process order, so only the outermost mesh axis of size > 1 spans the two
processes; two meshes cover both data-parallel axes: (2, 4, 1) puts `data` across the processes (gradient
all-reduce over gloo), (1, 8, 1) puts `fsdp` across them (params, gradients and optimizer state split between the
processes, so each writes its own half of the checkpoint).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "multihost_worker.py"
STEPS = 2
TRAIN_TIMEOUT_S = 300  # all three training processes together, on a busy 2-core machine
RESTORE_TIMEOUT_S = 120
PARAM_TOL = 1e-5  # cross-process reductions sum in another order than one process does: ~1e-8 observed
METRIC_RTOL = 1e-5


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_env(devices: int, port: int | None = None) -> dict[str, str]:
    """Environment of a CPU-only JAX process with `devices` devices; with a coordinator `port`, its coordinator
    service (process 0) listens on 127.0.0.1 only and the processes talk through gloo (jax 0.10's default, set
    explicitly so that a changed default fails here rather than training without cross-process collectives)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))
    if port is not None:
        env.update(JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}")
    return env


def train_command(output_dir: Path, mesh: tuple[int, ...], *overrides: str) -> list[str]:
    """The train.py command line of a short synthetic `train-tiny` run on `mesh`."""
    return [sys.executable, str(ROOT / "train.py"), "--config", "train-tiny", "--synthetic", "--steps", str(STEPS),
            "--fresh", "--quiet", f"train.mesh_shape=[{','.join(map(str, mesh))}]", f"train.output_dir={output_dir}",
            *overrides]


def host_command(output_dir: Path, mesh: tuple[int, ...], port: int, process_id: int) -> list[str]:
    """`train_command` for process `process_id` of 2 (process 0 hosts the coordinator on `port`)."""
    return train_command(output_dir, mesh, "train.distributed=true", f"train.coordinator_address=127.0.0.1:{port}",
                         "train.num_processes=2", f"train.process_id={process_id}")


def _tail(path: Path, chars: int = 3000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:]


def run_together(jobs: dict[str, tuple[list[str], dict[str, str]]], log_dir: Path, timeout_s: float) -> dict[str, str]:
    """Starts every job `{name: (argv, env)}` at once -> `{name: stdout}` once all have exited with 0.

    Fails as soon as one exits non-zero or when `timeout_s` pass, after killing the others (a process whose peer
    died would wait in a collective), with each one's exit code and stderr in the message.
    """
    procs: dict[str, subprocess.Popen] = {}
    with contextlib.ExitStack() as files:
        try:
            for name, (argv, env) in jobs.items():
                out = files.enter_context(open(log_dir / f"{name}.out", "w"))
                err = files.enter_context(open(log_dir / f"{name}.err", "w"))
                procs[name] = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                               stderr=err)
            deadline = time.monotonic() + timeout_s
            while True:
                codes = {name: proc.poll() for name, proc in procs.items()}
                if all(code == 0 for code in codes.values()):
                    break
                failed = any(code not in (None, 0) for code in codes.values())
                if failed or time.monotonic() > deadline:
                    why = "a process failed" if failed else f"timed out after {timeout_s} s"
                    report = "\n".join(f"--- {name}: exit code {codes[name]} (None: killed)\n"
                                       f"stderr: {_tail(log_dir / f'{name}.err')}\n"
                                       f"stdout: {_tail(log_dir / f'{name}.out', 1000)}" for name in procs)
                    pytest.fail(f"{why}:\n{report}", pytrace=False)
                time.sleep(0.2)
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    return {name: (log_dir / f"{name}.out").read_text() for name in jobs}


def logged_metrics(output_dir: Path) -> list[dict]:
    """The records of <output_dir>/metrics.jsonl."""
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("mesh", [(2, 4, 1), (1, 8, 1)], ids=["data-across-processes", "fsdp-across-processes"])
def test_two_processes_train_as_one_process_of_all_devices(tmp_path, mesh):
    """2 processes x 4 devices vs 1 process x 8 devices, same config, mesh and synthetic data, 2 steps.

    Compared: every param leaf of the restored checkpoints (max abs diff <= 1e-5), the optimizer state (<= 1e-5),
    the step, the loss and gradient norm that process 0 alone logged (rtol 1e-5); and the two-process checkpoint
    restored onto a (1, 2, 2) mesh of 4 devices equals its (exact) restore on the 8-device mesh. A process building
    more than its own rows would change the global batch shape, and so the params.
    """
    port = free_port()
    multi, single = tmp_path / "two-processes", tmp_path / "one-process"
    outputs = run_together({
        "process0": (host_command(multi, mesh, port, 0), cpu_env(4, port)),
        "process1": (host_command(multi, mesh, port, 1), cpu_env(4, port)),
        "single": (train_command(single, mesh), cpu_env(8)),
    }, tmp_path, TRAIN_TIMEOUT_S)
    for name, stdout in outputs.items():
        assert f"done: step {STEPS}," in stdout, (name, stdout[-2000:])

    (restored,) = run_together({"restore": (
        [sys.executable, str(WORKER), str(single), str(multi), "--mesh", ",".join(map(str, mesh)),
         "--reshard", "1,2,2"], cpu_env(8))}, tmp_path, RESTORE_TIMEOUT_S).values()
    diffs = json.loads(restored.strip().splitlines()[-1])
    assert diffs["steps"] == [STEPS, STEPS], diffs
    assert diffs["params"] <= PARAM_TOL, diffs
    assert diffs["opt_state"] <= PARAM_TOL, diffs
    assert diffs["resharded"] == 0.0, diffs

    (multi_log,), (single_log,) = logged_metrics(multi), logged_metrics(single)  # one writer: process 0
    assert multi_log["step"] == single_log["step"] == STEPS
    for key in ("loss", "grad_norm", "tokens"):
        np.testing.assert_allclose(multi_log[key], single_log[key], rtol=METRIC_RTOL, err_msg=key)
