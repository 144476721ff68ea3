"""Process-level runtime settings: how XLA programs are compiled once (and kept on disk between runs), and how host
memory is kept between steps.

`keep_host_memory()` is called by the entry points (train.py, sample.py, train_codec.py, bench_train.py) before
JAX starts its threads. It is a no-op where the C library is not glibc, and with `MGJAX_KEEP_HOST_MEMORY=0`.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any, Callable


def current_umask() -> int:
    """The process's file-mode creation mask (read without changing it for longer than two calls)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_host_memory() -> bool:
    """Makes glibc keep freed memory for reuse instead of returning it to the OS; True when applied.

    Why: XLA:CPU allocates one temp buffer per program run (~800 MB for the demo LM's train step). glibc serves
    such a request from a worker thread with a fresh `mmap` and gives it back with `munmap`, so every step
    page-faults every page of it again (~196k faults per step of the demo LM, which then takes ~15 % longer on a
    2-core VM). With one arena, no `mmap`-backed chunks and up to 2 GiB of free heap kept, the buffer comes from
    the heap and its pages stay mapped after a few steps. Cost: the heap keeps its peak size (measured: ~3x the
    largest temp buffer, as consecutive runs overlap) until the process exits. Call it before JAX creates its
    thread pool (threads that already chose an arena keep it). `MGJAX_KEEP_HOST_MEMORY=0` turns it off.
    """
    if os.environ.get("MGJAX_KEEP_HOST_MEMORY", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # only glibc has both
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt takes an int: free memory at the top of the heap is kept up to 2 GiB.
    applied = [mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_MAX, 0), mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)]
    return all(status == 1 for status in applied)


DEFAULT_COMPILATION_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "mgjax",
                                         "xla")
COMPILATION_CACHE_MAX_BYTES = 2 * 1024 ** 3  # least recently used programs are evicted past this


def use_compilation_cache(directory: str | None) -> str | None:
    """Keeps compiled XLA programs in `directory` so that a later process with the same programs loads them instead
    of compiling (the demo's 8 s generation: 6.5 s -> 1.9 s on a 2-core CPU). Returns the directory used, or None:
    when `directory` is empty, when `JAX_COMPILATION_CACHE_DIR` already chose one (left as JAX set it), or when it
    cannot be created or written (a cache is an optimisation, never a reason to fail). JAX cannot store programs
    holding a host callback, which is why progress is reported between compiled calls (`sampling.generate_codes`).
    Call before the first compilation."""
    if not directory or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    path = os.path.abspath(os.path.expanduser(directory))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    if not os.access(path, os.W_OK | os.X_OK):
        return None
    import jax  # here, so that entry points can read this module's constants without starting JAX

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:  # JAX bounds the cache only with filelock (a dependency of huggingface_hub); unbounded without it
        import filelock  # noqa: F401

        jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_MAX_BYTES)
    except ImportError:
        pass
    return path


# Parameter init runs once, so its machine code need not be fast: with the backend's optimisation off it compiles
# ~4x sooner (a tiny codec's init: 5 s instead of 21 s on a 2-core CPU).
ONCE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def jit_once(fn: Callable[..., Any], **jit_kwargs: Any) -> Callable[..., Any]:
    """`jax.jit(fn, **jit_kwargs)` for programs run once or rarely (parameter init), compiled with
    `ONCE_COMPILER_OPTIONS`; one compilation per argument signature. Under a trace (e.g. `jax.eval_shape`) it is the
    plain jitted function."""
    import jax

    jitted = jax.jit(fn, **jit_kwargs)
    compiled: dict = {}

    def call(*args):
        leaves = jax.tree.leaves(args)
        if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
            return jitted(*args)
        signature = (jax.tree.structure(args), tuple(jax.typeof(leaf) for leaf in leaves))
        if signature not in compiled:
            compiled[signature] = jitted.lower(*args).compile(compiler_options=ONCE_COMPILER_OPTIONS)
        return compiled[signature](*args)

    return call
