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
    hbm_bytes_per_second: float


# By the device_kind JAX reports. HBM is what XLA:TPU lets a program use (v5e: "available HBM (15.75G)"); peaks and
# bandwidths are Google's published per-chip figures.
CHIPS = {
    "TPU v5 lite": Chip("v5e", int(15.75 * GiB), 197e12, 819e9),
    "TPU v5": Chip("v5p", int(95.74 * GiB), 459e12, 2765e9),
    "TPU v6 lite": Chip("v6e", int(31.25 * GiB), 918e12, 1640e9),
    "TPU v4": Chip("v4", int(31.25 * GiB), 275e12, 1228e9),
}


class TopologyError(RuntimeError):
    """libtpu missing, or a topology name XLA does not know."""


def add_libtpu_to_path() -> bool:
    """Makes `.libtpu/` importable (before JAX initialises its backends); True if it exists."""
    if os.path.isdir(os.path.join(LIBTPU_DIR, "libtpu")):
        if LIBTPU_DIR not in sys.path:
            sys.path.insert(0, LIBTPU_DIR)
        # Compiling touches no TPU: the programs run nowhere, so JAX's own backend stays the CPU; placeholders for
        # what libtpu would read from a TPU VM's metadata silence its start-up errors (the topology is named
        # explicitly); several compile checks may run at once (libtpu locks a real TPU per process).
        defaults = {"JAX_PLATFORMS": "cpu", "TPU_WORKER_HOSTNAMES": "localhost",
                    "TPU_ACCELERATOR_TYPE": "v5litepod-4", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
                    "TPU_STDERR_LOG_LEVEL": "3", "TPU_MIN_LOG_LEVEL": "3", "TF_CPP_MIN_LOG_LEVEL": "3"}
        for variable, value in defaults.items():
            os.environ.setdefault(variable, value)
        return True
    return False


def tpu_topology(name: str, num_slices: int = 1) -> list[Any]:
    """Abstract devices of a TPU slice (or `num_slices` slices joined by the data-centre network), e.g. "v5e:8x8"."""
    import importlib.util

    from jax.experimental import topologies

    if importlib.util.find_spec("libtpu") is None:
        raise TopologyError("compiling for a TPU topology needs libtpu: run `make tpu-tools` (installs it into "
                            f"{LIBTPU_DIR}, outside the venv) or `pip install 'mgjax[tpu]'`")
    kwargs: dict[str, Any] = {"num_slices": num_slices} if num_slices > 1 else {}
    chips = [int(n) for n in re.findall(r"\d+", name.partition(":")[2])]
    if chips and math.prod(chips) < 4:  # a host has 2x2 chips by default; one or two chips make a smaller host
        kwargs["chips_per_host_bounds"] = tuple(chips + [1] * (3 - len(chips)))
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

class DoesNotFit(RuntimeError):
    """XLA refused the program: it needs more memory per device than the chip has."""


def for_tpu(config: Any) -> Any:
    """`config` with its backend-chosen formulations ('auto') resolved as a TPU process resolves them: Pallas splash
    attention and the plain kernels. (This process runs on the CPU backend, where 'auto' would pick the CPU's.)"""
    from mgjax.kernels.attention import BACKEND_DEFAULTS

    lm = config.lm
    changes = {}
    if lm.attention == "auto":
        changes["attention"] = BACKEND_DEFAULTS["tpu"]
    if lm.kernels == "auto":
        changes["kernels"] = "plain"
    return dataclasses.replace(config, lm=dataclasses.replace(lm, **changes))


def with_scan_unroll(config: Any, unroll: int) -> Any:
    return dataclasses.replace(config, lm=dataclasses.replace(config.lm, scan_unroll=unroll))


def _compile(lowered: Any) -> Any:
    """`lowered.compile()`, XLA's out-of-memory refusal turned into `DoesNotFit` with XLA's own sentence."""
    try:
        return lowered.compile()
    except Exception as error:  # XlaRuntimeError; its type is not public API
        text = str(error)
        if "RESOURCE_EXHAUSTED" not in text and "exceeds" not in text:
            raise
        lines = [line.strip() for line in text.splitlines() if "exceeds" in line or "Ran out of memory" in line]
        raise DoesNotFit(lines[0] if lines else text.strip().splitlines()[0]) from None


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
    lowered on abstract inputs and compiled -> (compiled, seconds spent compiling). Raises `DoesNotFit`."""
    import jax

    from mgjax import training

    programs = training.programs(config, mesh)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = programs.train_step.lower(programs.abstract_state, programs.abstract_frozen,
                                            train_batch_spec(config, mesh))
        compiled = _compile(lowered)
    return compiled, time.perf_counter() - start


def abstract_lm_params(config: Any, mesh: Any) -> Any:
    """The LM params as `ShapeDtypeStruct`s (float32, as a converted checkpoint stores them) carrying the shardings
    the logical rules give on `mesh`."""
    import flax.linen as nn
    import jax

    from mgjax import sharding
    from mgjax.lm.model import boxed_lm_params

    boxed = jax.eval_shape(lambda: boxed_lm_params(config.lm, config.text.d_model, jax.random.key(0)))
    shardings = sharding.logical_shardings(boxed, mesh)
    return jax.tree.map(lambda leaf, sh: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sh),
                        nn.meta.unbox(boxed), shardings)


def compile_generate(config: Any, mesh: Any, *, batch: int, seconds: float, text_tokens: int = 32,
                     sampling: Any = None) -> tuple[Any, float]:
    """`sampling._generate_codes` (the one-program generation `MusicGen.generate` runs: prefill, then a scan over
    the pattern's steps with CFG and top-k) for `batch` prompts of `text_tokens` T5 states and `seconds` of
    audio, lowered on abstract sharded params and compiled -> (compiled, seconds spent compiling)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from mgjax import sampling as sampling_lib
    from mgjax import sharding
    from mgjax.lm.model import weights_for_compute

    sampling = sampling or sampling_lib.SamplingConfig()
    lm_config = config.lm
    frames = int(round(seconds * config.codec.frame_rate))

    def rows(shape, dtype):
        spec = sharding.mesh_spec(("activation_batch",), shape, mesh)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
    params = weights_for_compute(abstract_lm_params(config, mesh), lm_config)  # as `with_compute_dtype` holds them
    args = (params, rows((batch, text_tokens, config.text.d_model), jnp.float32),
            rows((batch, text_tokens), jnp.int32), jax.eval_shape(lambda: jax.random.key(0)),
            rows((batch, lm_config.num_codebooks, 0), jnp.int32), None, scalar, scalar, scalar)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = sampling_lib._generate_codes.lower(
            *args, lm_config=lm_config, frames=frames, shape=sampling_lib._LoopShape.of(sampling),
            split_layers=False)
        compiled = _compile(lowered)
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


def train_frames(config: Any) -> int:
    return int(round(config.train.segment_duration * config.codec.frame_rate))


def train_model_flops(config: Any) -> float:
    """Model FLOPs of one train step (forward + backward = 3x forward; remat's recomputation not counted, as MFU
    defines it): the LM's matmuls and attention (causal self-attention counted at half the square), and the frozen
    T5 encoder's forward."""
    from mgjax.conditioning.fuser import uses_cross_attention

    lm, text, train = config.lm, config.text, config.train
    seq = train_frames(config) + lm.num_codebooks - 1  # the delay pattern's steps
    rows, words = train.batch_size, train.max_text_tokens
    d, f = lm.dim, lm.ffn_dim
    per_position = 2 * (4 * d * d + 2 * d * f) + 2 * d * seq  # projections, FFN; causal scores + values (half)
    per_row = 0.0
    if uses_cross_attention(lm):
        per_position += 2 * 2 * d * d + 4 * d * words  # cross-attention q/out projections, scores and values
        per_row = 2 * 2 * d * d * words  # cross-attention keys/values of the text, once per row and layer
    heads = 2 * lm.num_codebooks * d * lm.card
    lm_forward = rows * (lm.num_layers * (seq * per_position + per_row) + seq * heads)
    t5_inner = text.num_heads * text.d_kv
    t5_forward = rows * words * text.num_layers * 2 * (4 * text.d_model * t5_inner + 2 * text.d_model * text.d_ff
                                                       + 2 * t5_inner * words)
    trainable_t5 = 3 if train.train_text_encoder else 1
    return 3 * lm_forward + trainable_t5 * t5_forward


def attention_kernel_flops(config: Any) -> float:
    """FLOPs the Pallas attention kernels of one train step execute (all devices), which XLA's cost analysis cannot
    see inside a custom call: forward (scores and values; causal at half the square), backward at 2.5x forward
    (splash recomputes the scores, then dq, dk, dv), and one more forward when remat recomputes the layer."""
    from mgjax.conditioning.fuser import uses_cross_attention

    lm, train = config.lm, config.train
    seq = train_frames(config) + lm.num_codebooks - 1
    forward = 2 * 2 * seq * seq * lm.dim / 2
    if uses_cross_attention(lm):
        forward += 2 * 2 * seq * train.max_text_tokens * lm.dim
    policy_name = lm.effective_remat_policy
    recomputed = policy_name != "none" and not (policy_name.startswith("names:") and "attention" in policy_name)
    return train.batch_size * lm.num_layers * forward * (1 + 2.5 + (1 if recomputed else 0))


def decode_step_cost(config: Any, mesh: Any, batch: int, frames: int, use_cfg: bool = True) -> tuple[float, float]:
    """(FLOPs, HBM bytes) per device of one decoding step, averaged over a generation of `frames` frames: every
    LM weight (matmul weights in the compute dtype as `weights_for_compute` holds them, int8 as int8, the rest
    float32; split over `tensor`) and the filled half of the KV cache are read once per step;
    the matmuls cost 2 FLOPs per weight per row (CFG doubles the rows)."""
    from mgjax.conditioning.fuser import uses_cross_attention

    lm = config.lm
    tensor = mesh.shape.get("tensor", 1)
    batch_shards = max(1, math.gcd(batch, mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)))
    rows = batch * (2 if use_cfg else 1) / batch_shards
    layer_weights = lm.num_layers * (4 * lm.dim * lm.dim * (2 if uses_cross_attention(lm) else 1)
                                     + 2 * lm.dim * lm.ffn_dim)
    head_weights = lm.num_codebooks * lm.dim * lm.card
    dtype_bytes = 2 if lm.compute_dtype in ("bfloat16", "float16") else 4
    cache_bytes = lm.num_layers * 2 * rows * lm.dim * (frames / 2) * dtype_bytes / tensor
    matmul_bytes = 1 if lm.weight_format == "int8" else dtype_bytes  # as `weights_for_compute` holds them
    weight_bytes = (matmul_bytes * (layer_weights + head_weights) + 4 * lm.num_codebooks * (lm.card + 1) * lm.dim) / tensor
    flops = 2 * rows * (layer_weights + head_weights) / tensor + 2 * 2 * rows * lm.dim * frames / 2 * lm.num_layers
    return flops, weight_bytes + cache_bytes


@dataclasses.dataclass
class CompileReport:
    """What one compiled program costs on one device of the topology.

    `step_seconds` is a roofline: max(FLOPs / peak, HBM bytes / bandwidth) per device, i.e. compute and memory
    traffic perfectly overlapped and collectives hidden behind them; an optimistic bound, like XLA's own
    `optimal_seconds`, which cannot be used as it is: its cost analysis counts a while loop's body once (the scan
    over layers, the sampling loop) and sees no FLOPs inside Pallas kernels, and for the larger programs it
    comes out negative. The training FLOPs and bytes are therefore XLA's counts corrected for the layer loop (one
    more compile with two layers per loop iteration prices one layer) plus the attention kernels' FLOPs
    (`attention_kernel_flops`); sampling's are `decode_step_cost` per step.
    """

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
    bytes_per_device: float
    compile_seconds: float
    collectives: dict[str, int]
    attention_kernel: bool
    xla_optimal_seconds: float
    model_flops: float = 0.0  # per step, all devices
    frames_per_step: float = 0.0  # audio frames a step trains on or generates (all devices)
    steps: int = 1  # steps the program runs (sampling: one per pattern step)
    codebooks: int = 4  # tokens per frame

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
    def compute_seconds(self) -> float:
        """The step's FLOPs at the chip's bf16 peak."""
        return self.flops_per_device / self.chip.peak_bf16_flops

    @property
    def memory_seconds(self) -> float:
        """The step's HBM traffic at the chip's bandwidth."""
        return self.bytes_per_device / self.chip.hbm_bytes_per_second

    @property
    def step_seconds(self) -> float:
        return max(self.compute_seconds, self.memory_seconds)

    def mfu_at(self, step_seconds: float) -> float:
        """Model FLOPs per second at a step time of `step_seconds` over the slice's bf16 peak (0 if unknown)."""
        if not self.model_flops or not step_seconds:
            return 0.0
        return self.model_flops / step_seconds / (self.devices * self.chip.peak_bf16_flops)

    @property
    def compute_bound_mfu(self) -> float:
        """MFU if the step ran at the compute roofline (the ceiling this program's FLOPs allow)."""
        return self.mfu_at(self.compute_seconds)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_seconds >= self.memory_seconds else "HBM bandwidth"

    @property
    def mfu(self) -> float:
        """MFU at the estimated step time."""
        return self.mfu_at(self.step_seconds)

    @property
    def frames_per_second(self) -> float:
        """Audio frames (50 per second of audio) trained on or generated per second of wall time."""
        return self.frames_per_step / (self.step_seconds * self.steps) if self.step_seconds else 0.0

    def summary(self) -> str:
        mesh = "x".join(f"{v}" for v in self.mesh.values())
        lines = [
            f"{self.program} on {self.topology} ({self.devices} x {self.chip.name}), mesh {mesh} {tuple(self.mesh)}",
            f"  memory per device: {self.total_bytes / GiB:.2f} GiB of {self.chip.hbm_bytes / GiB:.2f} GiB "
            f"({self.headroom:.0%} headroom): arguments {self.argument_bytes / GiB:.2f}, outputs "
            f"{self.output_bytes / GiB:.2f} (aliased {self.alias_bytes / GiB:.2f}), temporaries "
            f"{self.temp_bytes / GiB:.2f} GiB",
            f"  per device per step: {self.flops_per_device:.3e} FLOPs, {self.bytes_per_device / GiB:.2f} GiB of HBM "
            f"traffic -> estimated step time {self.step_seconds * 1e3:.1f} ms ({self.bound} bound; roofline: "
            f"compute {self.compute_seconds * 1e3:.1f} ms, HBM {self.memory_seconds * 1e3:.1f} ms)",
        ]
        if self.model_flops:
            frames = self.frames_per_second
            lines.append(f"  model FLOPs per step {self.model_flops:.3e}: MFU {self.mfu:.1%} (at the compute "
                         f"roofline {self.compute_bound_mfu:.1%}) of "
                         f"{self.chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 per chip; {frames:,.0f} frames/s = "
                         f"{frames * self.codebooks:,.0f} tokens/s ({self.codebooks} codebooks)")
        elif self.frames_per_step:
            lines.append(f"  {self.steps} decoding steps of {self.step_seconds * 1e3:.2f} ms: "
                         f"{self.frames_per_second / 50:,.1f} s of audio per second over the batch (real time: 1 "
                         "per clip)")
        lines.append(f"  collectives: {self.collectives or 'none'}; attention kernel: "
                     f"{'yes' if self.attention_kernel else 'no'}; compiled in {self.compile_seconds:.0f} s; "
                     f"XLA's raw optimal_seconds {self.xla_optimal_seconds:.3g}")
        return "\n".join(lines)


def has_attention_kernel(hlo_text: str) -> bool:
    """Whether a compiled TPU program calls a Pallas (Mosaic) kernel."""
    return "tpu_custom_call" in hlo_text


def xla_cost(compiled: Any) -> tuple[float, float, float]:
    """(flops, bytes accessed, optimal_seconds) of a compiled program by XLA's cost analysis."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return (float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)),
            float(cost.get("optimal_seconds", 0.0)))


def report(compiled: Any, *, program: str, topology: str, mesh: Any, compile_seconds: float, flops: float,
           bytes_accessed: float, **extra: Any) -> CompileReport:
    """Reads memory and HLO of a compiled program into a `CompileReport` (FLOPs and bytes per device given)."""
    devices = list(mesh.devices.flat)
    kind = devices[0].device_kind
    if kind not in CHIPS:
        raise TopologyError(f"no HBM/peak figures for device kind {kind!r}; known: {', '.join(CHIPS)}")
    memory = compiled.memory_analysis()
    text = compiled.as_text()
    return CompileReport(
        program=program, topology=topology, devices=len(devices), chip=CHIPS[kind], mesh=dict(mesh.shape),
        argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
        code_bytes=memory.generated_code_size_in_bytes, flops_per_device=flops, bytes_per_device=bytes_accessed,
        compile_seconds=compile_seconds, collectives=collectives(text), attention_kernel=has_attention_kernel(text),
        xla_optimal_seconds=xla_cost(compiled)[2], **extra)


def train_report(config: Any, topology: str, num_slices: int = 1, *, price_layers: bool = True) -> CompileReport:
    """Compiles train.py's step for `config` (its `train.mesh_shape`) on a TPU topology -> its report.

    `price_layers`: compile once more with two layers per scan iteration to correct XLA's FLOP and byte counts
    for the layer loop (doubles the compile time; without it the step-time estimate counts one layer)."""
    config = for_tpu(config)
    devices = tpu_topology(topology, num_slices)
    mesh = topology_mesh(config.train.mesh_shape, devices)
    compiled, seconds = compile_train_step(config, mesh)
    flops, bytes_accessed, _ = xla_cost(compiled)
    layers = config.lm.num_layers
    if price_layers and layers > 1:
        base = compiled if config.lm.scan_unroll == 1 else compile_train_step(with_scan_unroll(config, 1), mesh)[0]
        flops, bytes_accessed, _ = xla_cost(base)
        doubled, _ = compile_train_step(with_scan_unroll(config, 2), mesh)
        flops2, bytes2, _ = xla_cost(doubled)
        flops += (layers - 1) * max(0.0, flops2 - flops)
        bytes_accessed += (layers - 1) * max(0.0, bytes2 - bytes_accessed)
    text = compiled.as_text()
    if has_attention_kernel(text):
        flops += attention_kernel_flops(config) / len(devices)
    name = topology if num_slices == 1 else f"{num_slices} x {topology}"
    return report(compiled, program="train_step", topology=name, mesh=mesh, compile_seconds=seconds, flops=flops,
                  bytes_accessed=bytes_accessed, model_flops=train_model_flops(config),
                  frames_per_step=config.train.batch_size * train_frames(config),
                  codebooks=config.lm.num_codebooks)


def generate_report(config: Any, topology: str, mesh_shape: Sequence[int], *, batch: int, seconds: float,
                    text_tokens: int = 32) -> CompileReport:
    """Compiles the sampler's generation program on a TPU topology -> its report (step cost: `decode_step_cost`)."""
    from mgjax.sampling import SamplingConfig, steps_to_sample

    config = for_tpu(config)
    mesh = topology_mesh(mesh_shape, tpu_topology(topology))
    sampling = SamplingConfig()
    compiled, compile_seconds = compile_generate(config, mesh, batch=batch, seconds=seconds,
                                                 text_tokens=text_tokens, sampling=sampling)
    frames = int(round(seconds * config.codec.frame_rate))
    flops, bytes_accessed = decode_step_cost(config, mesh, batch, frames, use_cfg=sampling.cfg_coef != 1.0)
    return report(compiled, program=f"generate (batch {batch}, {seconds:g} s)", topology=topology, mesh=mesh,
                  compile_seconds=compile_seconds, flops=flops, bytes_accessed=bytes_accessed,
                  frames_per_step=batch * frames, steps=steps_to_sample(config.lm, frames, 0),
                  codebooks=config.lm.num_codebooks)


# ----------------------------------------------------------------------------------------------- command line

def add_arguments(parser: Any, *, sampling: bool) -> None:
    """`--compile-only`, `--topology`, `--num-slices` (training) or `--mesh-shape` (sampling)."""
    group = parser.add_argument_group("compile check for TPU pods (needs `make tpu-tools`)")
    group.add_argument("--compile-only", action="store_true",
                       help="compile this program for a TPU topology on this machine and print its memory per "
                            "chip, step-time estimate, MFU and collectives; nothing runs")
    group.add_argument("--topology", default=None, metavar="NAME",
                       help="TPU slice to compile for, e.g. v5e:8x8, v5p:4x4x4, v6e:4x4 (with --compile-only)")
    if sampling:
        group.add_argument("--mesh-shape", default="1,1,-1", metavar="D,F,T",
                           help="data, fsdp, tensor mesh sizes over the topology's chips (default 1,1,-1: tensor "
                                "parallel over all of them)")
    else:
        group.add_argument("--num-slices", type=int, default=1,
                           help="slices joined by the data-centre network (data parallel across them)")


def prepare(args: Any) -> None:
    """Before JAX starts: makes libtpu importable for `--compile-only`, or says the flags need it."""
    if getattr(args, "topology", None) and not args.compile_only:
        raise SystemExit("error: --topology is for --compile-only (compiling for a TPU without one)")
    if args.compile_only:
        if not args.topology:
            raise SystemExit("error: --compile-only needs --topology, e.g. --topology v5e:8x8")
        add_libtpu_to_path()


def run_train_check(config: Any, args: Any) -> int:
    """train.py --compile-only: prints the train step's report; 1 if it does not fit the chip."""
    try:
        result = train_report(config, args.topology, args.num_slices)
    except (TopologyError, DoesNotFit) as error:
        return _refused(error, args.topology, TRAIN_FIX)
    print(result.summary(), flush=True)
    return 0 if result.fits else 1


def run_sample_check(config: Any, args: Any) -> int:
    """sample.py --compile-only: prints the generation program's report; 1 if it does not fit the chip."""
    try:
        mesh_shape = [int(part) for part in str(args.mesh_shape).split(",")]
    except ValueError:
        raise SystemExit(f"error: --mesh-shape takes three comma-separated ints, got {args.mesh_shape!r}") from None
    try:
        result = generate_report(config, args.topology, mesh_shape, batch=args.batch_size, seconds=args.duration)
    except (TopologyError, DoesNotFit) as error:
        return _refused(error, args.topology, SAMPLE_FIX)
    print(result.summary(), flush=True)
    return 0 if result.fits else 1


TRAIN_FIX = ("shard more (train.mesh_shape with fsdp/tensor > 1), turn on remat (lm.remat_policy=full), or lower "
             "train.batch_size")
SAMPLE_FIX = ("spread the model over more chips (--mesh-shape 1,1,N on a larger --topology), or lower --batch-size or "
              "--duration (the KV cache grows with both)")


def _refused(error: Exception, topology: str, fix: str) -> int:
    if isinstance(error, DoesNotFit):
        print(f"does not fit on {topology}: {error}\nfix: {fix}", file=sys.stderr)
        return 1
    print(f"error: {error}", file=sys.stderr)
    return 2
