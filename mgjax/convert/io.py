"""Reading source directories: format detection, hub caches, config.json, tokenizer files, and PyTorch weights
into `{key: float32 numpy array}`."""
from __future__ import annotations

import json
import os
import pickle
import re
from typing import Any, Callable

import numpy as np
from safetensors.numpy import load_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model",
                   "added_tokens.json", "vocab.json", "merges.txt")


class ConversionError(ValueError):
    """A source directory that cannot be converted: not a checkpoint, an unsupported config, a missing key."""


def matching(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, where a `KeyError` / `ValueError` (a weight missing or of the wrong shape) becomes a
    `ConversionError` saying `what: the cause`."""
    try:
        return fn(*args)
    except ConversionError:
        raise
    except (KeyError, ValueError) as err:
        raise ConversionError(f"{what}: {err.args[0] if err.args else err}") from None


def resolve_hub_cache(src_dir: str) -> str:
    """A Hugging Face hub cache folder (`models--facebook--musicgen-small`, as `huggingface_hub` downloads into)
    -> its one snapshot directory; any other directory as it is. Several snapshots: an error listing them."""
    snapshots = os.path.join(src_dir, "snapshots")
    if not os.path.isdir(snapshots) or os.path.exists(os.path.join(src_dir, "config.json")):
        return src_dir
    revisions = sorted(name for name in os.listdir(snapshots) if os.path.isdir(os.path.join(snapshots, name)))
    if len(revisions) == 1:
        return os.path.join(snapshots, revisions[0])
    example = os.path.join(snapshots, revisions[0]) if revisions else snapshots
    raise ConversionError(f"{src_dir} is a hub cache with {len(revisions)} snapshots "
                          f"({', '.join(revisions) or 'none'}); pass one of them, e.g. {example}")


def detect_format(src_dir: str) -> str:
    """'transformers' or 'audiocraft', or a `ConversionError` saying what the directory lacks."""
    if not os.path.isdir(src_dir):
        raise ConversionError(f"source {src_dir} is not a directory; pass the folder holding the checkpoint")
    names = set(os.listdir(src_dir))
    if "config.json" in names:
        return "transformers"
    if "state_dict.bin" in names or "compression_state_dict.bin" in names:
        return "audiocraft"
    raise ConversionError(f"{src_dir} is neither a transformers checkpoint (config.json + *.safetensors) nor an "
                          f"audiocraft one (state_dict.bin + compression_state_dict.bin)")


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ConversionError(f"cannot read {path} ({err}); the checkpoint is corrupt") from None


def tokenizer_files(directory: str) -> dict[str, str]:
    """`{name: path}` of the tokenizer files (`TOKENIZER_FILES`) that `directory` holds."""
    return {n: os.path.join(directory, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(directory, n))}


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
