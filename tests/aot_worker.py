"""Run by tests/test_aot.py in its own process (libtpu must be on the path before JAX starts): compiles train.py's
step and the sampler's generation program for a small TPU topology and prints one JSON line of findings.

    python tests/aot_worker.py TOPOLOGY MESH_SHAPE [overrides...]
"""
from __future__ import annotations

import json
import re
import sys

from mgjax import aot

aot.add_libtpu_to_path()


def square_score_shapes(hlo_text: str, lengths: range) -> list[str]:
    """HLO shapes `[..., n, n]` of rank >= 3 with n in `lengths`: attention scores materialised for every (query,
    key) pair of a training sequence (its length is the segment's frames give or take the pattern's delays)."""
    found = re.findall(r"\w+\[(?:\d+,)+\d+,\d+\]", hlo_text)
    return sorted({shape for shape in found
                   if (dims := shape[shape.index("[") + 1:-1].split(","))[-1] == dims[-2] and int(dims[-1]) in lengths})


def main(topology: str, mesh_shape: str, overrides: list[str]) -> None:
    from mgjax.config import load_config

    config = aot.for_tpu(load_config("train-tiny", [f"train.mesh_shape=[{mesh_shape}]"] + overrides))
    mesh = aot.topology_mesh(config.train.mesh_shape, aot.tpu_topology(topology))
    compiled, seconds = aot.compile_train_step(config, mesh)
    train = aot.report(compiled, program="train_step", topology=topology, mesh=mesh, compile_seconds=seconds,
                       flops=0.0, bytes_accessed=0.0)
    frames = aot.train_frames(config)
    lengths = range(frames - config.lm.num_codebooks, frames + config.lm.num_codebooks + 1)
    generate = aot.generate_report(config, topology, (1, 1, -1), batch=2, seconds=1.0, text_tokens=8)
    print(json.dumps({
        "device_kind": mesh.devices.flat[0].device_kind, "mesh": dict(mesh.shape),
        "train_bytes": train.total_bytes, "train_fits": train.fits, "train_headroom": train.headroom,
        "train_attention_kernel": train.attention_kernel, "train_collectives": train.collectives,
        "square_scores": square_score_shapes(compiled.as_text(), lengths),
        "generate_bytes": generate.total_bytes, "generate_fits": generate.fits,
        "generate_steps": generate.steps, "generate_step_seconds": generate.step_seconds}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
