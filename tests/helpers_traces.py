"""Retrace guards: `chex.assert_max_traces` on a plain function that jitted programs run while they trace."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import chex


@contextlib.contextmanager
def max_traces(owner: Any, name: str, n: int) -> Iterator[None]:
    """Within the block, `owner.name` (a plain Python function that a jitted program calls while it traces, e.g.
    `sampling._prepare` for every generation program) may run in at most `n` traces, i.e. at most `n` programs are
    traced anew: a program already compiled runs no Python, so only new traces count. More fails with chex's
    AssertionError from inside the trace."""
    original = getattr(owner, name)
    chex.clear_trace_counter()
    setattr(owner, name, chex.assert_max_traces(original, n=n))
    try:
        yield
    finally:
        setattr(owner, name, original)
