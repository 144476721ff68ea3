"""Converted-model checkpoints on disk (the only module that imports orbax).

Layout of a checkpoint directory:
    mgjax.json     {"format": "mgjax", "version": 1, "kind": "codec" | "musicgen", "source": ...}
    config.yaml    the model config (`codec` section only for a codec checkpoint)
    params/        Orbax tree {"codec": ..., ["text": ..., "lm": ...]}
    tokenizer/     tokenizer files, when the source had them
Writes go to a temporary sibling directory that is renamed into place, so a failed write leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from typing import Any, Callable, Iterator, Mapping

import jax
import orbax.checkpoint as ocp
import yaml

from mgjax import config as config_lib
from mgjax.runtime import current_umask

META_FILE = "mgjax.json"
CONFIG_FILE = "config.yaml"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1
KINDS = ("codec", "musicgen")


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, foreign, corrupt or does not match its config."""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def stale_temporaries(parent: str, name: str) -> list[str]:
    """The leftovers of interrupted writes of `parent/name` (`.name.tmp-PID-*`, `.name.old-PID-*`) whose writing
    process no longer runs (or whose name carries no process id: older mgjax versions)."""
    pattern = re.compile(rf"\.{re.escape(name)}\.(?:tmp|old)-(?:(\d+)-)?")
    stale = []
    for entry in sorted(os.listdir(parent)):
        found = pattern.match(entry)
        if found and not (found.group(1) and _process_alive(int(found.group(1)))):
            stale.append(os.path.join(parent, entry))
    return stale


@contextlib.contextmanager
def atomic_directory(dst_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Yields a temporary directory beside `dst_dir`; renames it to `dst_dir` only if the block succeeds (an
    exception, Ctrl-C or a handled signal removes it). Leftovers of writes killed outright are removed on the next
    write to the same path (`stale_temporaries`); the result gets the mode of a normal `mkdir` (umask applied)."""
    dst_dir = os.path.abspath(dst_dir)
    if os.path.exists(dst_dir) and os.listdir(dst_dir) and not overwrite:
        raise CheckpointError(f"output directory {dst_dir} already exists and is not empty; "
                              f"choose another path or pass overwrite=True (--overwrite)")
    parent = os.path.dirname(dst_dir)
    os.makedirs(parent, exist_ok=True)
    leftovers = stale_temporaries(parent, os.path.basename(dst_dir))
    for leftover in leftovers:
        shutil.rmtree(leftover, ignore_errors=True)
    if leftovers:
        warnings.warn(f"removed {len(leftovers)} leftover(s) of an interrupted write of {dst_dir}: "
                      f"{', '.join(leftovers)}", stacklevel=3)
    tag = f".{os.path.basename(dst_dir)}.%s-{os.getpid()}-"
    tmp_dir = tempfile.mkdtemp(prefix=tag % "tmp", dir=parent)
    try:
        yield tmp_dir
        os.chmod(tmp_dir, 0o777 & ~current_umask())  # mkdtemp makes it private
        if os.path.exists(dst_dir):
            old = tempfile.mkdtemp(prefix=tag % "old", dir=parent)
            os.rename(dst_dir, os.path.join(old, "x"))
            os.rename(tmp_dir, dst_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp_dir, dst_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def _as_jax_arrays(tree: Any) -> Any:
    """Numpy leaves -> jax arrays, so Orbax records a sharding that restores onto devices."""
    return jax.tree.map(jax.numpy.asarray, tree)


def save(dst_dir: str, kind: str, config_dict: Mapping[str, Any], params: Mapping[str, Any], *,
         source: str = "", tokenizer_files: Mapping[str, str] | None = None, overwrite: bool = False) -> str:
    """Writes a checkpoint atomically. `tokenizer_files` maps file names to source paths to copy."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    with atomic_directory(dst_dir, overwrite) as tmp:
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            yaml.safe_dump(dict(config_dict), f, sort_keys=False)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(tmp, PARAMS_DIR), _as_jax_arrays(dict(params)))
        checkpointer.wait_until_finished()
        if tokenizer_files:
            os.makedirs(os.path.join(tmp, TOKENIZER_DIR))
            for name, path in tokenizer_files.items():
                shutil.copy(path, os.path.join(tmp, TOKENIZER_DIR, name))
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump({"format": "mgjax", "version": FORMAT_VERSION, "kind": kind, "source": source}, f)
    return os.path.abspath(dst_dir)


def read_meta(directory: str) -> dict:
    """The checkpoint's `mgjax.json`, or a `CheckpointError` saying what the directory is not."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory {directory} does not exist; convert a model first with "
                              f"`python -m mgjax.convert SRC {directory}`")
    meta_path = os.path.join(directory, META_FILE)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{directory} is not an mgjax checkpoint (no {META_FILE}); if it is a transformers or "
                              f"audiocraft checkpoint, convert it first with `python -m mgjax.convert {directory} DST`")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{meta_path} is unreadable or corrupt ({err}); re-run the conversion") from None
    if meta.get("format") != "mgjax" or meta.get("kind") not in KINDS:
        raise CheckpointError(f"{meta_path} does not describe an mgjax checkpoint: {meta}")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{directory} was written by a newer mgjax (format {meta['version']}); upgrade mgjax")
    return meta


def read_config_dict(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_FILE)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as err:
        raise CheckpointError(f"cannot read the checkpoint config {path} ({err}); re-run the conversion") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} does not hold a config mapping; re-run the conversion")
    return raw


def _key_name(key: Any) -> str:
    """A key-path entry's plain name: a dict key, an attribute (dataclass / namedtuple field) or an index."""
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _leaves_with_paths(tree: Any) -> dict[str, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key_name(k) for k in path): leaf for path, leaf in flat}


def check_tree_matches(expected: Any, actual: Any, what: str) -> None:
    """Raises `CheckpointError` naming the first leaf whose presence or shape differs."""
    expected_leaves, actual_leaves = _leaves_with_paths(expected), _leaves_with_paths(actual)
    for name in sorted(set(expected_leaves) | set(actual_leaves)):
        if name not in actual_leaves:
            raise CheckpointError(f"{what}: parameter '{name}' required by the config is missing from the checkpoint")
        if name not in expected_leaves:
            raise CheckpointError(f"{what}: checkpoint has parameter '{name}' that the config does not define")
        want, got = tuple(expected_leaves[name].shape), tuple(actual_leaves[name].shape)
        if want != got:
            raise CheckpointError(f"{what}: parameter '{name}' has shape {got} in the checkpoint but the config "
                                  f"implies {want}; the checkpoint and its config.yaml do not match")


def _ocdbt_data_missing(params_dir: str) -> bool:
    """True when `params_dir` has an OCDBT manifest but none of the per-process data folders it points into."""
    if not os.path.isfile(os.path.join(params_dir, "manifest.ocdbt")):
        return False
    return not any(name.startswith("ocdbt.process_") for name in os.listdir(params_dir))


def restore_params(directory: str, abstract_params: Mapping[str, Any],
                   sharding: Callable[[Any], Any] | None = None) -> dict:
    """Restores `params/` after checking it against `abstract_params` (top-level key -> tree of ShapeDtypeStruct).

    Only the top-level keys of `abstract_params` are checked and returned (a codec can be read out of a whole
    MusicGen checkpoint). `sharding(abstract_leaf) -> jax.sharding.Sharding` places each leaf (default: the first
    local device), so each host reads only its shards and nothing is materialised whole on one device.
    """
    params_dir = os.path.join(os.path.abspath(directory), PARAMS_DIR)
    if _ocdbt_data_missing(params_dir):  # orbax would fail too, but leak an async callback while failing
        raise CheckpointError(f"the parameters in {params_dir} have no array data (no ocdbt.process_* folder); "
                              f"the checkpoint is truncated or corrupt, re-run the conversion")
    checkpointer = ocp.StandardCheckpointer()
    try:
        stored = dict(checkpointer.metadata(params_dir).item_metadata.tree)
    except Exception as err:  # orbax raises several types for a missing/corrupt directory
        raise CheckpointError(f"cannot read the parameters in {params_dir} ({_first_line(err)}); "
                              f"the checkpoint is incomplete or corrupt, re-run the conversion") from None
    for key, abstract in abstract_params.items():
        if key not in stored:
            raise CheckpointError(f"{directory}: the checkpoint has no '{key}' parameters (it holds "
                                  f"{', '.join(stored) or 'nothing'})")
        check_tree_matches(abstract, stored[key], f"{directory} [{key}]")
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def placed(leaf, use_sharding=True):
        chosen = sharding(leaf) if (sharding and use_sharding) else default
        return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=chosen)

    target = {key: jax.tree.map(lambda leaf: placed(leaf, False), tree) for key, tree in stored.items()}
    target.update({key: jax.tree.map(placed, tree) for key, tree in abstract_params.items()})
    try:
        restored = checkpointer.restore(params_dir, target)
    except Exception as err:
        _silence_abandoned_reads()
        raise CheckpointError(f"cannot restore the parameters in {params_dir} ({_first_line(err)}); "
                              f"the checkpoint is truncated or corrupt, re-run the conversion") from None
    return {key: restored[key] for key in abstract_params}


def load_codec_config(directory: str) -> config_lib.CodecConfig:
    """The `CodecConfig` of a codec checkpoint, or of the codec inside a MusicGen checkpoint, checked (its params:
    `restore_params(directory, {"codec": abstract})`, as `Codec.load` does)."""
    read_meta(directory)
    raw = read_config_dict(directory)
    try:
        codec_config = config_lib.dataclass_from_dict(config_lib.CodecConfig, raw.get("codec") or {}, "codec")
        codec_config.validate()
    except config_lib.ConfigError as err:
        raise CheckpointError(f"{directory}/{CONFIG_FILE}: {err}") from None
    return codec_config


class CorruptCheckpointError(CheckpointError):
    """A training checkpoint step whose files are missing or broken (the message says which)."""


def diagnose_step(step_dir: str) -> str | None:
    """What is visibly wrong with a training checkpoint step folder (empty, an item missing, no `_METADATA`, no
    array data), or None when its files look complete."""
    if not os.path.isdir(step_dir) or not os.listdir(step_dir):
        return f"the step folder {step_dir} is empty (its write was killed before it began)"
    for item in ("state", "meta"):
        if not os.path.isdir(os.path.join(step_dir, item)):
            return f"{step_dir}/{item} is missing (its write was cut short)"
    state_dir = os.path.join(step_dir, "state")
    if not os.path.isfile(os.path.join(state_dir, "_METADATA")):
        return f"{state_dir}/_METADATA is missing (its write was cut short)"
    if _ocdbt_data_missing(state_dir):
        return f"{state_dir} has no array data (no ocdbt.process_* folder)"
    return None


def _stored_tree(state_dir: str) -> Any:
    """The stored tree of shapes and dtypes of an Orbax item, or None when its metadata is unreadable."""
    try:
        return dict(ocp.StandardCheckpointer().metadata(state_dir).item_metadata.tree)
    except Exception:  # orbax raises several types for unreadable metadata
        return None


def _first_line(err: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message` of the innermost cause (the one naming the file; TensorStore's outer
    errors run to pages), cut to `limit` characters."""
    while err.__cause__ is not None:
        err = err.__cause__
    message = str(err).strip()
    text = f"{type(err).__name__}: {message.splitlines()[0] if message else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


_ABANDONED_READ = "_read_array_index_and_device_put"  # orbax's per-array read coroutine


class _AbandonedReadFilter(logging.Filter):
    """Drops asyncio's "... exception was never retrieved" reports of orbax's failed reads."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage() + (repr(record.exc_info[1]) if record.exc_info else "")
        return not ("never retrieved" in text and ("orbax" in text or "TensorStore" in text))


def _silence_abandoned_reads() -> None:
    """Once per process, after a failed restore: keeps the reports of the read tasks orbax abandons (asyncio's
    "Task exception was never retrieved", never-awaited coroutines, each with a TensorStore spec of a page) off the
    console; they come when those tasks are collected, later. Only reports naming orbax's read coroutine are
    dropped; the failure itself is raised and reported in one line."""
    if any(isinstance(f, _AbandonedReadFilter) for f in logging.getLogger("asyncio").filters):
        return
    logging.getLogger("asyncio").addFilter(_AbandonedReadFilter())
    warnings.filterwarnings("ignore", message=f"coroutine '{_ABANDONED_READ}' was never awaited",
                            category=RuntimeWarning)
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if _ABANDONED_READ not in repr(unraisable.object):
            previous(unraisable)

    sys.unraisablehook = hook


# ==================================================================================================================
# Training checkpoints
# ==================================================================================================================
# A training run keeps `<output_dir>/checkpoints/<step>/` with two items: `state` (the whole train-state pytree:
# params, optimizer state, step, rng, EMA) and `meta` (JSON: config, data position, anything the loop adds).
# Restoring goes through an abstract state whose leaves carry the *current* mesh's shardings, so a checkpoint
# written on one mesh loads onto any other (each device reads only its own shards).

class TrainCheckpointer:
    """Periodic train-state checkpoints through an Orbax `CheckpointManager` (async writes where available).

    `save_every` steps, keeping the last `keep`; `save(..., force=True)` writes regardless (end of training).
    """

    def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.save_every = max(1, int(save_every))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1, max_to_keep=max(1, int(keep)), create=True,
            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        self.last_saved: int | None = None

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: Mapping[str, Any], *, force: bool = False) -> bool:
        """Starts writing `state` (+ JSON `meta`) for `step` if due (or `force`); True if a save started.
        A step that already has a checkpoint is not written again."""
        step = int(step)
        if not (force or step % self.save_every == 0) or step == self.last_saved or step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta)))
        # The interval is decided here: orbax's own policy would also save the very first step it is shown.
        try:
            started = bool(self.manager.save(step, args=args, force=True))
        except Exception as err:  # orbax re-raises a failed earlier async write here too
            raise self._write_error(step, err) from err
        if started:
            self.last_saved = step
        return started

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """(state, meta) of `step`, laid out as `abstract_state`'s leaves (`ShapeDtypeStruct`s with shardings) say.

        Without `step`: the newest intact checkpoint. A broken newer step (empty folder, missing `_METADATA`,
        truncated data) is skipped with a warning naming it and why, and moved aside to `<step>.corrupt` (kept for
        inspection, out of the way of the step's next save). A checkpoint of another model config is an error, not
        skipped. A `CheckpointError` of a few lines when no step is intact."""
        if step is not None:
            return self._restore_step(abstract_state, int(step))
        skipped: list[str] = []
        for candidate in reversed(self.all_steps()):
            try:
                restored = self._restore_step(abstract_state, candidate)
            except CorruptCheckpointError as err:
                skipped.append(f"step {candidate}: {err}")
                self._move_aside(candidate)
                continue
            if skipped:
                warnings.warn(f"skipped broken training checkpoint(s) ({'; '.join(skipped)}), each moved aside to "
                              f"<step>.corrupt; resuming from step {candidate}", stacklevel=2)
            return restored
        if not skipped:
            raise CheckpointError(f"no training checkpoint in {self.directory}")
        raise CheckpointError("no intact training checkpoint in " + self.directory + ":\n  " + "\n  ".join(skipped)
                              + "\neach was moved aside to <step>.corrupt: run again to start afresh, or restore a "
                                "backup of the checkpoints folder")

    def _restore_step(self, abstract_state: Any, step: int) -> tuple[Any, dict]:
        """(state, meta) of `step`; `CorruptCheckpointError` when its files are broken, `CheckpointError` when they
        hold another model config."""
        step_dir = os.path.join(self.directory, str(step))
        broken = diagnose_step(step_dir)
        if broken:
            raise CorruptCheckpointError(broken)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        try:
            restored = self.manager.restore(step, args=args)
        except Exception as err:  # orbax raises several types for a missing/corrupt/mismatched checkpoint
            _silence_abandoned_reads()
            stored = _stored_tree(os.path.join(step_dir, "state"))
            if stored is None:
                raise CorruptCheckpointError(f"{step_dir}/state/_METADATA is unreadable") from None
            check_tree_matches(abstract_state, stored, f"training checkpoint {step_dir} (another model config?)")
            raise CorruptCheckpointError(f"a data file under {step_dir}/state is truncated or corrupt "
                                         f"({_first_line(err)})") from None
        return restored.state, dict(restored.meta or {})

    def _move_aside(self, step: int) -> None:
        """Renames the broken `step` folder to `<step>.corrupt` (host 0 only) and forgets it."""
        if jax.process_index() == 0:
            step_dir = os.path.join(self.directory, str(step))
            target = step_dir + ".corrupt"
            if os.path.exists(target):
                shutil.rmtree(target)
            os.rename(step_dir, target)
        self.manager.reload()

    def wait(self) -> None:
        """Blocks until pending async writes are on disk."""
        try:
            self.manager.wait_until_finished()
        except Exception as err:
            raise self._write_error(self.last_saved, err) from err

    def close(self) -> None:
        """Waits for pending writes, then releases the manager (also when a write failed, then re-raises)."""
        try:
            self.wait()
        finally:
            self.manager.close()

    def __enter__(self) -> "TrainCheckpointer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Closes; when the block already raised, that error says more than a failed close after it."""
        if exc_type is None:
            self.close()
            return
        with contextlib.suppress(Exception):
            self.close()

    def _write_error(self, step: int | None, err: BaseException) -> CheckpointError:
        """A failed write named with its directory and step; orbax never commits a partial step, so the newest
        complete checkpoint still resumes."""
        latest = self.latest_step()
        resume = "it starts afresh" if latest is None else f"it resumes from step {latest}"
        return CheckpointError(f"cannot write the training checkpoint {self.directory}/{step} "
                               f"({type(err).__name__}: {err}); check the free disk space and write permission there, "
                               f"then run the same command again: {resume}")
