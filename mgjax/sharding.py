"""Device mesh, the one logical-axis rules table, and the shardings of params, train state and batches.

Mesh axes are `('data', 'fsdp', 'tensor')`:
- `data`: pure data parallelism (params replicated along it);
- `fsdp`: data parallelism with params, gradients and optimizer state sharded on their `embed` dimension;
- `tensor`: tensor (model) parallelism over heads, feed-forward width and vocabulary.

Modules only name logical axes (`nn.with_logical_partitioning`); `LOGICAL_RULES` is the single place that maps them
to mesh axes. A dimension whose size the mapped mesh axes do not divide is left unsharded (e.g. the `card + 1` rows
of the code embeddings on an even `tensor` axis), so any config runs on any mesh.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mgjax.config import ConfigError
from mgjax.runtime import jit_once

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (or axes, or None = replicated). The whole sharding strategy is this table.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("codebooks", None),
    ("layers", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
    # activations (constrained at layer boundaries, `constrain`) and the KV cache
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("cache_layers", None),
    ("cache_batch", BATCH_AXES),
    ("cache_heads", "tensor"),
    ("cache_length", None),
    ("cache_kv", None),
)


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
    """`(data, fsdp, tensor)` with at most one -1 (the devices left over) -> concrete sizes whose product is
    `num_devices`, or a `ConfigError` (a ValueError) that says how to fix the shape."""
    shape = tuple(int(s) for s in mesh_shape)
    if len(shape) != len(MESH_AXES):
        raise ConfigError(f"train.mesh_shape needs {len(MESH_AXES)} entries {MESH_AXES}, got {list(shape)}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"train.mesh_shape entries must be positive, with at most one -1; got {list(shape)}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ConfigError(f"train.mesh_shape={list(shape)}: {num_devices} devices are not divisible by {known}")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ConfigError(f"train.mesh_shape={list(shape)} needs {math.prod(shape)} devices, but {num_devices} are "
                         f"available; use -1 for one axis to take the rest")
    return shape  # type: ignore[return-value]


def make_mesh(mesh_shape: Sequence[int] = (-1, 1, 1), devices: Sequence[Any] | None = None) -> Mesh:
    """A `('data', 'fsdp', 'tensor')` mesh over `devices` (default: all devices of all hosts), Auto axis types."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_shape, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def initialize_distributed(train_config: Any) -> bool:
    """`jax.distributed.initialize` when `train.distributed` is set (before any other JAX call); True if it ran.

    Empty/unset coordinator, process count and id let JAX auto-detect them (TPU pods, SLURM, Kubernetes).
    """
    if not train_config.distributed:
        return False
    kwargs: dict[str, Any] = {}
    if train_config.coordinator_address:
        kwargs["coordinator_address"] = train_config.coordinator_address
    if train_config.num_processes > 0:
        kwargs["num_processes"] = train_config.num_processes
    if train_config.process_id >= 0:
        kwargs["process_id"] = train_config.process_id
    jax.distributed.initialize(**kwargs)
    return True


def _axis_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[name] for name in names)


def mesh_spec(logical_spec: Any, shape: Sequence[int], mesh: Mesh,
              rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> P:
    """Logical `PartitionSpec` (axis names per dim, or None) of an array of `shape` -> mesh `PartitionSpec`.

    Dims whose size the mesh axes do not divide are replicated instead (uneven shards are not allowed by jit).
    """
    if logical_spec is None or len(logical_spec) == 0:
        return P()
    mapped = nn.logical_to_mesh_axes(tuple(logical_spec), rules)
    out = []
    for dim, axes in zip(shape, tuple(mapped) + (None,) * (len(shape) - len(mapped))):
        out.append(axes if axes is not None and dim % _axis_size(mesh, axes) == 0 else None)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical axis names (one per dim of x) under the current mesh (`jax.set_mesh`);
    x unchanged when no mesh (or a one-device mesh) is set, or every dim maps to None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    spec = mesh_spec(tuple(logical_axes), x.shape, mesh)
    return x if spec == P() else jax.lax.with_sharding_constraint(x, spec)


def logical_shardings(abstract_boxed: Any, mesh: Mesh,
                      rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Any:
    """Shardings for a tree from `jax.eval_shape` whose leaves may be `nn.LogicallyPartitioned` boxes.

    Returns a tree with the *unboxed* structure holding `NamedSharding`s (unannotated leaves are replicated).
    """
    specs = nn.get_partition_spec(abstract_boxed)
    shapes = nn.meta.unbox(abstract_boxed)
    return jax.tree.map(lambda spec, leaf: NamedSharding(mesh, mesh_spec(spec, leaf.shape, mesh, rules)),
                        specs, shapes, is_leaf=lambda x: isinstance(x, P))


def sharded_initializer(init_fn: Callable[..., Any], mesh: Mesh, *args: Any) -> tuple[Callable[..., Any], Any]:
    """(jitted init, shardings) for `init_fn(*args)`, which may return logically boxed params.

    `jax.eval_shape` gives the shapes and logical axes without computing anything; the jitted init then writes each
    shard on its own device, so no full copy of the params ever sits on one device. `args` may be abstract.
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = logical_shardings(abstract, mesh)
    return jit_once(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings), shardings


def sharded_init(init_fn: Callable[..., Any], mesh: Mesh, *args: Any) -> tuple[Any, Any]:
    """Runs `init_fn(*args)` straight into its shardings (see `sharded_initializer`) -> (tree, shardings)."""
    init, shardings = sharded_initializer(init_fn, mesh, *args)
    return init(*args), shardings


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) dim split over ('data', 'fsdp'); other dims replicated."""
    del ndim  # trailing dims are replicated by an unpadded PartitionSpec
    return NamedSharding(mesh, P(BATCH_AXES))


def check_batch_size(batch_size: int, mesh: Mesh, grad_accum_steps: int = 1) -> None:
    """The global batch must split evenly over the data-parallel devices (per microbatch)."""
    shards = _axis_size(mesh, BATCH_AXES)
    if batch_size % grad_accum_steps or (batch_size // grad_accum_steps) % shards:
        raise ConfigError(f"train.batch_size={batch_size} with grad_accum_steps={grad_accum_steps} gives microbatches "
                         f"of {batch_size / grad_accum_steps:g}, which must be a multiple of data*fsdp={shards} "
                         f"(mesh {dict(mesh.shape)})")


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This host's rows of the batch (each array `[B / num_hosts, ...]`) -> global arrays sharded on the batch dim."""
    sharding = batch_sharding(mesh)
    out = {}
    for key, value in local.items():
        value = np.asarray(value)
        global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def describe(tree: Any) -> dict[str, str]:
    """`{'path/to/leaf': 'shape spec'}` for logging how a tree is laid out."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): f"{tuple(leaf.shape)} {getattr(leaf.sharding, 'spec', '')}"
            for path, leaf in flat}
