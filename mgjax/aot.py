"""Ahead-of-time compile checks for TPU topologies, on a machine without a TPU (MaxText's `train_compile` idea).

With `libtpu` importable (`make tpu-tools` puts it in `.libtpu/`, outside the default venv), JAX describes a real
TPU slice (`jax.experimental.topologies.get_topology_desc`) as abstract devices. The exact programs `train.py` and
`sample.py` run are lowered on `ShapeDtypeStruct`s carrying that mesh's shardings and compiled by XLA:TPU, which
answers what a pod user needs before spending TPU hours: bytes per chip (arguments, outputs, temporaries) against
the chip's HBM, FLOPs per step, XLA's own step-time estimate (`optimal_seconds`), and the collectives and kernels
in the program.

Entry points: `tpu_topology(name, num_slices)`, `topology_mesh(...)`, `compile_train_step(config, mesh)`,
`compile_generate(...)`, `report(...)` (a `CompileReport`). The CLIs are `train.py --compile-only --topology T`
and `sample.py --compile-only --topology T`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from typing import Any, Sequence

GiB = 1024 ** 3
# Where `make tpu-tools` installs libtpu (kept out of the venv: it is large, and a libtpu in the venv makes every
# JAX process probe for TPUs at start-up).
LIBTPU_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".libtpu")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation: usable HBM per device and the published dense bf16 peak per chip."""

    name: str
    hbm_bytes: int
    peak_bf16_flops: float


# By the device_kind JAX reports. HBM is what XLA:TPU lets a program use (v5e: "available HBM (15.75G)").
CHIPS = {
    "TPU v5 lite": Chip("v5e", int(15.75 * GiB), 197e12),
    "TPU v5": Chip("v5p", int(95.74 * GiB), 459e12),
    "TPU v6 lite": Chip("v6e", int(31.25 * GiB), 918e12),
    "TPU v4": Chip("v4", int(31.25 * GiB), 275e12),
}


class TopologyError(RuntimeError):
    """libtpu missing, or a topology name XLA does not know."""


def add_libtpu_to_path() -> bool:
    """Makes `.libtpu/` importable (before JAX initialises its backends); True if it exists."""
    if os.path.isdir(os.path.join(LIBTPU_DIR, "libtpu")):
        if LIBTPU_DIR not in sys.path:
            sys.path.insert(0, LIBTPU_DIR)
        return True
    return False


def tpu_topology(name: str, num_slices: int = 1) -> list[Any]:
    """Abstract devices of a TPU slice (or `num_slices` slices joined by the data-centre network), e.g. "v5e:8x8"."""
    import importlib.util

    from jax.experimental import topologies

    if importlib.util.find_spec("libtpu") is None:
        raise TopologyError("compiling for a TPU topology needs libtpu: run `make tpu-tools` (installs it into "
                            f"{LIBTPU_DIR}, outside the venv) or `pip install 'mgjax[tpu]'`")
    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name, **kwargs).devices)
    except Exception as error:  # XLA's message for an unknown name is long; keep its first line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TopologyError(f"unknown TPU topology {name!r} ({first}); use e.g. v5e:2x2, v5e:8x8, v5p:2x2x2, "
                            "v6e:4x4") from error


def topology_mesh(mesh_shape: Sequence[int], devices: Sequence[Any]) -> Any:
    """The `('data', 'fsdp', 'tensor')` mesh over a topology's devices. Several slices: `data` is split across the
    slices (data parallelism over the slow links), the rest of the mesh lies inside each slice."""
    import jax
    from jax.experimental import mesh_utils
    from jax.sharding import AxisType, Mesh

    from mgjax import sharding

    shape = sharding.resolve_mesh_shape(mesh_shape, len(devices))
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices == 1:
        return sharding.make_mesh(shape, devices)
    if shape[0] % slices:
        raise TopologyError(f"mesh {list(shape)}: the data axis must be a multiple of the {slices} slices")
    grid = mesh_utils.create_hybrid_device_mesh((shape[0] // slices,) + tuple(shape[1:]), (slices, 1, 1), devices)
    return Mesh(grid, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * len(sharding.MESH_AXES))


# ----------------------------------------------------------------------------------------------- programs

def train_batch_spec(config: Any, mesh: Any) -> dict:
    """Abstract global batch of `train.py` (codes, padding mask, caption tokens), sharded on the batch dim."""
    import jax
    import jax.numpy as jnp

    from mgjax import sharding

    train = config.train
    frames = int(round(train.segment_duration * config.codec.frame_rate))
    rows, sh = train.batch_size, sharding.batch_sharding(mesh)
    return {"codes": jax.ShapeDtypeStruct((rows, config.lm.num_codebooks, frames), jnp.int32, sharding=sh),
            "mask": jax.ShapeDtypeStruct((rows, frames), jnp.bool_, sharding=sh),
            "text_ids": jax.ShapeDtypeStruct((rows, train.max_text_tokens), jnp.int32, sharding=sh),
            "text_mask": jax.ShapeDtypeStruct((rows, train.max_text_tokens), jnp.int32, sharding=sh)}


def compile_train_step(config: Any, mesh: Any) -> tuple[Any, float]:
    """`training.programs(config, mesh).train_step` (the jitted step train.py runs: same shardings, donation)
    lowered on abstract inputs and compiled -> (compiled, seconds spent compiling)."""
    import jax

    from mgjax import training

    programs = training.programs(config, mesh)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = programs.train_step.lower(programs.abstract_state, programs.abstract_frozen,
                                            train_batch_spec(config, mesh))
        compiled = lowered.compile()
    return compiled, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------- analysis

def _count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text))


def collectives(hlo_text: str) -> dict[str, int]:
    """Collective ops in a compiled program's HLO (async start/done pairs counted once)."""
    counts = {}
    for op in COLLECTIVES:
        n = _count(rf"= [^=\n]*\b{op}(?:-start)?\(", hlo_text)
        if n:
            counts[op] = n
    return counts


def train_model_flops(config: Any) -> float:
    """Model FLOPs of one train step (forward + backward = 3x forward; remat's recomputation not counted, as MFU
    defines it): the LM's matmuls and attention (causal self-attention counted at half the square), and the frozen
    T5 encoder's forward."""
    lm, text, train = config.lm, config.text, config.train
    frames = int(round(train.segment_duration * config.codec.frame_rate))
    seq = frames + lm.num_codebooks - 1  # the delay pattern's steps
    rows, words = train.batch_size, train.max_text_tokens
    d, f = lm.dim, lm.ffn_dim
    per_position = 2 * (4 * d * d + 2 * d * f) + 2 * d * seq  # projections, FFN; causal scores + values (half)
    per_row = 0.0
    if lm.conditioning == "cross":
        per_position += 2 * 2 * d * d + 4 * d * words  # cross-attention q/out projections, scores and values
        per_row = 2 * 2 * d * d * words  # cross-attention keys/values of the text, once per row and layer
    heads = 2 * lm.num_codebooks * d * lm.card
    lm_forward = rows * (lm.num_layers * (seq * per_position + per_row) + seq * heads)
    t5_inner = text.num_heads * text.d_kv
    t5_forward = rows * words * text.num_layers * 2 * (4 * text.d_model * t5_inner + 2 * text.d_model * text.d_ff
                                                       + 2 * t5_inner * words)
    trainable_t5 = 3 if train.train_text_encoder else 1
    return 3 * lm_forward + trainable_t5 * t5_forward


@dataclasses.dataclass
class CompileReport:
    """What one compiled program costs on one device of the topology."""

    program: str
    topology: str
    devices: int
    chip: Chip
    mesh: dict
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    flops_per_device: float
    step_seconds: float  # XLA's estimate (cost_analysis 'optimal_seconds')
    compile_seconds: float
    collectives: dict[str, int]
    attention_kernel: bool
    model_flops: float = 0.0  # per step, all devices
    frames_per_step: float = 0.0

    @property
    def total_bytes(self) -> int:
        """Peak bytes per device: live arguments and outputs (donated outputs reuse their argument) + temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def headroom(self) -> float:
        return 1.0 - self.total_bytes / self.chip.hbm_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.chip.hbm_bytes

    @property
    def chips(self) -> float:
        return self.devices

    @property
    def mfu(self) -> float:
        """Model FLOPs per second at XLA's estimated step time over the slice's bf16 peak."""
        if not self.model_flops or not self.step_seconds:
            return 0.0
        return self.model_flops / self.step_seconds / (self.chips * self.chip.peak_bf16_flops)

    @property
    def frames_per_second(self) -> float:
        return self.frames_per_step / self.step_seconds if self.step_seconds else 0.0

    def summary(self) -> str:
        mesh = "x".join(f"{v}" for v in self.mesh.values())
        lines = [
            f"{self.program} on {self.topology} ({self.devices} x {self.chip.name}), mesh {mesh} "
            f"{tuple(self.mesh)}",
            f"  memory per device: {self.total_bytes / GiB:.2f} GiB of {self.chip.hbm_bytes / GiB:.2f} GiB "
            f"({self.headroom:+.0%} headroom): arguments {self.argument_bytes / GiB:.2f}, outputs "
            f"{self.output_bytes / GiB:.2f} (aliased {self.alias_bytes / GiB:.2f}), temporaries "
            f"{self.temp_bytes / GiB:.2f} GiB",
            f"  FLOPs per device per step: {self.flops_per_device:.3e}; XLA's estimated step time "
            f"{self.step_seconds * 1e3:.1f} ms",
        ]
        if self.model_flops:
            lines.append(f"  model FLOPs per step {self.model_flops:.3e}: MFU {self.mfu:.1%} of "
                         f"{self.chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 per chip; "
                         f"{self.frames_per_second:,.0f} frames/s ({self.frames_per_second / 50:,.0f} s of audio/s)")
        lines.append(f"  collectives: {self.collectives or 'none'}; attention kernel: "
                     f"{'yes' if self.attention_kernel else 'no'}; compiled in {self.compile_seconds:.0f} s")
        return "\n".join(lines)


def has_attention_kernel(hlo_text: str) -> bool:
    """Whether a compiled TPU program calls a Pallas (Mosaic) kernel."""
    return "tpu_custom_call" in hlo_text


def report(compiled: Any, *, program: str, topology: str, mesh: Any, compile_seconds: float,
           model_flops: float = 0.0, frames_per_step: float = 0.0) -> CompileReport:
    """Reads memory, cost and HLO of a compiled program into a `CompileReport`."""
    devices = list(mesh.devices.flat)
    kind = devices[0].device_kind
    if kind not in CHIPS:
        raise TopologyError(f"no HBM/peak figures for device kind {kind!r}; known: {', '.join(CHIPS)}")
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    text = compiled.as_text()
    return CompileReport(
        program=program, topology=topology, devices=len(devices), chip=CHIPS[kind], mesh=dict(mesh.shape),
        argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
        code_bytes=memory.generated_code_size_in_bytes, flops_per_device=float(cost.get("flops", 0.0)),
        step_seconds=float(cost.get("optimal_seconds", 0.0)), compile_seconds=compile_seconds,
        collectives=collectives(text), attention_kernel=has_attention_kernel(text), model_flops=model_flops,
        frames_per_step=frames_per_step)


def train_report(config: Any, topology: str, num_slices: int = 1) -> CompileReport:
    """Compiles train.py's step for `config` (its `train.mesh_shape`) on a TPU topology -> its report."""
    devices = tpu_topology(topology, num_slices)
    mesh = topology_mesh(config.train.mesh_shape, devices)
    compiled, seconds = compile_train_step(config, mesh)
    frames = config.train.batch_size * int(round(config.train.segment_duration * config.codec.frame_rate))
    name = topology if num_slices == 1 else f"{num_slices} x {topology}"
    return report(compiled, program="train_step", topology=name, mesh=mesh, compile_seconds=seconds,
                  model_flops=train_model_flops(config), frames_per_step=frames)
