"""Reading PyTorch checkpoints into `{key: float32 numpy array}` and folding weight norm."""
from __future__ import annotations

import json
import os
import pickle
import re
from typing import Mapping

import numpy as np


class ConversionError(ValueError):
    """A source directory that cannot be converted: not a checkpoint, an unsupported config, a missing key."""


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor; bf16 has no numpy dtype
        value = value.detach().cpu()
        if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
            value = value.float()
        return value.numpy()
    return np.asarray(value)


class UnsafePickleError(ConversionError):
    """A PyTorch file holding Python objects besides tensors and plain containers: refused unread, since
    unpickling them could run any code."""


def load_torch_file(path: str) -> dict:
    """`torch.load(weights_only=True)` onto the CPU: tensors, numbers, strings and plain containers only, so a
    file from anywhere cannot run code while it is read. Anything else raises `UnsafePickleError` naming the
    first refused object; a clear error when torch is not installed."""
    try:
        import torch
    except ImportError:
        raise ConversionError(f"reading {path} needs PyTorch: pip install torch==2.13.0 (CPU build), "
                              f"or re-save the checkpoint as safetensors") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise ConversionError(f"{path} is not a readable PyTorch file ({type(err).__name__}: {err}); "
                                  f"it may be truncated or corrupt") from None
        raise UnsafePickleError(f"{path} holds a pickled Python object ({refused_global(str(err))}) besides tensors; "
                                f"mgjax reads tensors only, because unpickling objects can run any code. Convert a "
                                f"safetensors copy of these weights, or re-save them as tensors where you trust "
                                f"the file") from None
    except Exception as err:
        raise ConversionError(f"{path} is not a readable PyTorch file ({type(err).__name__}: {err}); "
                              f"it may be truncated or corrupt") from None


def refused_global(message: str) -> str:
    """The `module.name` the weights-only unpickler refused, from its error message ('an unsupported object' when
    the message names none)."""
    found = re.search(r"GLOBAL ([\w.]+)", message)
    return found.group(1) if found else "an unsupported object"


def load_transformers_state_dict(directory: str) -> dict[str, np.ndarray]:
    """All tensors of a transformers `save_pretrained` directory (safetensors, sharded or not, or pytorch .bin)."""
    from safetensors.numpy import load_file

    names = sorted(os.listdir(directory))
    # safetensors first: it holds only arrays, while a .bin is a pickle (read weights-only, but still a pickle)
    index = ([n for n in names if n.endswith(".safetensors.index.json")] or
             [n for n in names if n.endswith(".bin.index.json")])
    if index:
        with open(os.path.join(directory, index[0])) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = [n for n in names if n.endswith(".safetensors")] or [n for n in names if n.endswith(".bin")]
    if not files:
        raise ConversionError(f"{directory} has a config.json but no weights (*.safetensors or *.bin)")
    state: dict[str, np.ndarray] = {}
    for name in files:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise ConversionError(f"{path} is listed in the index but missing; the checkpoint is incomplete")
        if name.endswith(".safetensors"):
            try:
                loaded = load_file(path)
            except Exception as err:
                raise ConversionError(f"{path} is not a readable safetensors file ({err}); "
                                      f"it may be truncated or corrupt") from None
            state.update({k: _as_float32(v) for k, v in loaded.items()})
        else:
            state.update({k: _as_float32(_to_numpy(v)) for k, v in load_torch_file(path).items()})
    return state


def _as_float32(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.kind == "f" and array.dtype != np.float32:
        return array.astype(np.float32)
    if array.dtype.kind == "V" or str(array.dtype) == "bfloat16":
        return array.astype(np.float32)
    return array


def get(state: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    """`state[key]` or a `ConversionError` naming the missing key."""
    try:
        return state[key]
    except KeyError:
        raise ConversionError(f"missing weight '{key}' in the source checkpoint; it does not match its config "
                              f"or is not a supported checkpoint") from None


def weight_normed(state: Mapping[str, np.ndarray], prefix: str, norm_axis: int = 0) -> np.ndarray:
    """The effective weight of a (possibly weight-normed) layer `prefix` (`prefix.weight` etc.), norm folded in.

    Weight norm stores g and v as `parametrizations.weight.original0/1` (transformers 5.x) or `weight_g/weight_v`
    (released checkpoints); w = g * v / ||v||, the norm taken over every axis but `norm_axis`.
    """
    candidates = [(f"{prefix}.parametrizations.weight.original0", f"{prefix}.parametrizations.weight.original1"),
                  (f"{prefix}.weight_g", f"{prefix}.weight_v")]
    for g_key, v_key in candidates:
        if g_key in state and v_key in state:
            g, v = state[g_key].astype(np.float64), state[v_key].astype(np.float64)
            axes = tuple(a for a in range(v.ndim) if a != norm_axis)
            norm = np.sqrt(np.sum(v ** 2, axis=axes, keepdims=True))
            return (g * v / norm).astype(np.float32)
    return get(state, f"{prefix}.weight")
