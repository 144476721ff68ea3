"""Weight maps: each model's torch <-> mgjax correspondence declared once, as a table of `Entry`s.

An entry pairs one leaf of our param tree (a '/' path) with the torch key it is stored under and a `Layout`, the
array change in both directions (transpose, split into heads, weight norm, ...). A leaf stacked on a leading axis
(`nn.scan` layers, codebooks) has `stack=n` and `{i}` in its torch key. `to_params` (torch state dict -> our params)
and `to_state` (our params -> torch state dict) are the only two readers of a table, so the directions cannot drift.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np

Shape = tuple  # of ints; a None dim matches any width (e.g. a projection's input, which the config does not know)


def _matches(shape: Shape, want: Shape) -> bool:
    return len(shape) == len(want) and all(w is None or w == d for d, w in zip(shape, want))


def tensor(state: Mapping[str, Any], key: str, shape: Shape | None = None) -> np.ndarray:
    """`state[key]` (numpy or torch) as float32 numpy: a `KeyError` naming a missing key, a `ValueError` naming
    one whose shape is not `shape`."""
    if key not in state:
        raise KeyError(f"missing key '{key}' in the state dict")
    value = state[key]
    if hasattr(value, "detach"):  # a torch tensor (fp16 / bf16 have no direct numpy route)
        value = value.detach().cpu().float().numpy()
    value = np.asarray(value, dtype=np.float32)
    if shape is not None and not _matches(value.shape, shape):
        raise ValueError(f"'{key}' has shape {value.shape}, expected {shape} from the config")
    return value


class Layout(NamedTuple):
    """How one of our leaves is stored in torch. `read(state, key, shape)` -> our array (of `shape`, checked where
    given) from the tensors `keys(key)` names; `write(array)` -> those tensors, in that order. Each is the other's
    inverse."""

    read: Callable[[Mapping[str, Any], str, Shape | None], np.ndarray]
    write: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    keys: Callable[[str], tuple[str, ...]] = lambda key: (key,)


IDENTITY = Layout(read=tensor, write=lambda array: (array,))


def _width(dims: Shape) -> int | None:
    return None if None in dims else math.prod(dims)


def linear(in_axes: int = 1) -> Layout:
    """torch Linear weight `[out, in]` <-> kernel `[*in, *out]`: transposed, and `in`/`out` split into our first
    `in_axes` axes and the rest (q/k/v `[D, H, Dh]`: in_axes=1; attention out `[H, Dh, D]`: in_axes=2)."""
    def read(state, key, shape):
        if shape is None:
            return tensor(state, key).T
        torch_shape = (_width(shape[in_axes:]), _width(shape[:in_axes]))
        return tensor(state, key, torch_shape).T.reshape([-1 if d is None else d for d in shape])

    return Layout(read, lambda kernel: (kernel.reshape(math.prod(kernel.shape[:in_axes]), -1).T,))


LINEAR = linear()


def tied(name: str, alias: str) -> Layout:
    """One tensor that torch lists under two keys (T5's `shared.weight` and `encoder.embed_tokens.weight`): read from
    the first present, written to both. `name` is the entry key's ending, `alias` replaces it."""
    def keys(key):
        return key, key[:-len(name)] + alias

    def read(state, key, shape):
        first, second = keys(key)
        return tensor(state, second if first not in state and second in state else first, shape)

    return Layout(read, lambda array: (array, array), keys)


# torch.nn.utils.parametrizations.weight_norm's names (transformers 5.x; torch renames legacy weight_g/weight_v
# checkpoints to these on load): g = ||w|| over every axis but 0, v = the direction.
WEIGHT_G = ".parametrizations.weight.original0"
WEIGHT_V = ".parametrizations.weight.original1"


def weight_normed(to_ours: Callable[[np.ndarray], np.ndarray], to_torch: Callable[[np.ndarray], np.ndarray]) -> Layout:
    """A weight-normed torch module `key` <-> our kernel `to_ours(w)`, w = g * v / ||v||.

    Read: g and v as `WEIGHT_G/V` or `weight_g/weight_v` (released checkpoints), or a plain `key.weight` (no norm).
    Written: g = ||w||, v = w; reading it back gives w to within one float32 ulp (g is rounded to float32, and
    bit-exact g and v do not exist in general).
    """
    def read(state, key, shape):
        for g_key, v_key in ((key + WEIGHT_G, key + WEIGHT_V), (f"{key}.weight_g", f"{key}.weight_v")):
            if g_key in state and v_key in state:
                g, v = tensor(state, g_key).astype(np.float64), tensor(state, v_key).astype(np.float64)
                norm = np.sqrt(np.sum(v ** 2, axis=tuple(range(1, v.ndim)), keepdims=True))
                return to_ours((g * v / norm).astype(np.float32))
        return to_ours(tensor(state, f"{key}.weight"))

    def write(kernel):
        weight = to_torch(kernel)
        g = np.sqrt(np.sum(np.square(weight, dtype=np.float64), axis=tuple(range(1, weight.ndim)), keepdims=True))
        # An all-zero channel has no direction: any nonzero v with g = 0 gives back the zeros (v = 0 would give NaN).
        return g, np.where(g == 0, np.float32(1), weight)

    return Layout(read, write, lambda key: (key + WEIGHT_G, key + WEIGHT_V))


@dataclasses.dataclass(frozen=True)
class Entry:
    """One leaf of ours <-> its torch tensor(s). `shape` is the leaf's (per stacked item; None: unchecked)."""

    ours: str  # '/'-joined path in our param tree
    theirs: str  # torch key, after the table's prefix; `{i}` is the index along `stack`
    layout: Layout = IDENTITY
    shape: Shape | None = None
    stack: int = 0  # > 0: our leaf stacks this many torch entries on a leading axis

    def items(self, prefix: str = "") -> list[str]:
        """The torch key of each stacked item (one key when unstacked)."""
        if not self.stack:
            return [prefix + self.theirs]
        return [prefix + self.theirs.format(i=i) for i in range(self.stack)]

    def torch_keys(self, prefix: str = "") -> list[str]:
        """Every torch key this entry maps."""
        return [key for item in self.items(prefix) for key in self.layout.keys(item)]


def to_params(entries: list[Entry], state: Mapping[str, Any], prefix: str = "") -> dict:
    """A torch state dict (numpy arrays or torch tensors) -> our nested param dict of float32 numpy arrays.
    A missing key raises a `KeyError` naming it, a shape that disagrees with the table a `ValueError`."""
    params: dict = {}
    for entry in entries:
        items = [entry.layout.read(state, key, entry.shape) for key in entry.items(prefix)]
        *parents, leaf = entry.ours.split("/")
        node = params
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = np.ascontiguousarray(np.stack(items) if entry.stack else items[0], dtype=np.float32)
    return params


def to_state(entries: list[Entry], params: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """Our params (numpy or jax) -> a flat torch state dict of contiguous float32 numpy copies (none aliases another
    or the params). A leaf whose shape disagrees with the table raises a `ValueError` naming its path."""
    state: dict[str, np.ndarray] = {}
    for entry in entries:
        node = params
        for name in entry.ours.split("/"):
            node = node[name]
        value = np.asarray(node, dtype=np.float32)  # to the host once, not once per stacked item
        lead = (entry.stack,) if entry.stack else ()
        want = lead + tuple(value.shape[len(lead):] if entry.shape is None else entry.shape)
        if not _matches(value.shape, want):
            raise ValueError(f"param '{entry.ours}' has shape {value.shape}, expected {want} from the config")
        for n, item in enumerate(entry.items(prefix)):
            for key, array in zip(entry.layout.keys(item), entry.layout.write(value[n] if entry.stack else value)):
                if key in state:
                    raise ValueError(f"two entries of the weight map write '{key}'")
                state[key] = np.array(array, dtype=np.float32, order="C", copy=True)
    return state
