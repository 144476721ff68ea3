"""Restores two train.py runs in one process and prints how far apart their train states are, as one JSON line
(the single-process side of tests/test_multihost.py).

    JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=8 python tests/multihost_worker.py REF_RUN OTHER_RUN \
        --mesh 2,4,1 --reshard 1,2,2

REF_RUN, OTHER_RUN: train.py output directories (config.yaml + checkpoints/). Both latest checkpoints are restored
onto `--mesh` over all local devices; OTHER_RUN is restored once more onto `--reshard` over the first
prod(reshard) devices, which lays every leaf out differently from how it was written. Printed keys:
    steps               [ref step, other step]
    params, opt_state   max |ref - other| over every leaf of that part of the state, and worst_params, the leaf's path
    resharded           max |other on --mesh - other on --reshard| over the whole state
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mgjax import checkpoint, sharding, training  # noqa: E402
from mgjax.config import load_config  # noqa: E402


def restore_run(run_dir: str, mesh: jax.sharding.Mesh) -> Any:
    """The latest train state of a train.py run, laid out for `mesh` (shardings from the run's own config)."""
    config = load_config(os.path.join(run_dir, "config.yaml"))
    abstract = training.programs(config, mesh).abstract_state
    with checkpoint.TrainCheckpointer(os.path.join(run_dir, "checkpoints"), save_every=1, keep=1) as ckpt:
        state, _ = ckpt.restore(abstract)
    return state


def max_abs_diff(a: Any, b: Any) -> tuple[float, str]:
    """(max |a - b| over all leaves of two same-structured trees, path of the leaf where it occurs)."""
    worst, where = 0.0, ""
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    if tree_a != tree_b:
        raise ValueError(f"the trees differ: {tree_a} vs {tree_b}")
    for (path, x), (_, y) in zip(flat_a, flat_b):
        diff = float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0.0))
        if diff > worst or not where:
            worst, where = diff, jax.tree_util.keystr(path)
    return worst, where


def shape_arg(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ref_run")
    parser.add_argument("other_run")
    parser.add_argument("--mesh", type=shape_arg, required=True)
    parser.add_argument("--reshard", type=shape_arg, required=True)
    args = parser.parse_args()
    mesh = sharding.make_mesh(args.mesh)
    reshard_mesh = sharding.make_mesh(args.reshard, devices=jax.devices()[:math.prod(args.reshard)])
    ref, other = restore_run(args.ref_run, mesh), restore_run(args.other_run, mesh)
    params, worst = max_abs_diff(ref.params, other.params)
    print(json.dumps({
        "steps": [int(ref.step), int(other.step)],
        "params": params, "worst_params": worst,
        "opt_state": max_abs_diff(ref.opt_state, other.opt_state)[0],
        "resharded": max_abs_diff(other, restore_run(args.other_run, reshard_mesh))[0],
    }), flush=True)


if __name__ == "__main__":
    main()
