"""Rematerialisation policies by name (`lm.remat_policy`): what a layer's backward pass keeps from its forward.

    none           no remat: every intermediate the backward needs stays alive (fastest, most memory)
    full           only the layer's input is kept; the whole layer is recomputed in the backward
    dots           matmul outputs are kept, elementwise work (norms, GELU, softmax) is recomputed
    dots_no_batch  matmul outputs without batch dimensions (weights-only products) are kept
    names:a,b      only the intermediates tagged `checkpoint_name(x, a)` / `b` are kept (`CHECKPOINT_NAMES`)

The layer tags its intermediates with `tag(x, name)`; on a path where a formulation hides them (the CPU's custom
VJPs) the tags simply match nothing.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
from jax.ad_checkpoint import checkpoint_name

# Intermediates of one decoder layer that `names:` policies can keep.
CHECKPOINT_NAMES = ("query", "key", "value", "attention", "self_attention_out", "cross_attention_out",
                    "mlp_hidden", "mlp_out")


def tag(x: jax.Array, name: str) -> jax.Array:
    """Names an intermediate for `names:` remat policies (identity otherwise)."""
    return checkpoint_name(x, name)


def policy(name: str) -> Callable[..., Any] | None:
    """A `jax.checkpoint` policy for `name` (see the module docstring); None for 'none' (no remat at all)."""
    policies = jax.checkpoint_policies
    if name == "none":
        return None
    if name == "full":
        return policies.nothing_saveable
    if name == "dots":
        return policies.checkpoint_dots
    if name == "dots_no_batch":
        return policies.dots_with_no_batch_dims_saveable
    if name.startswith("names:"):
        names = tuple(n.strip() for n in name[len("names:"):].split(",") if n.strip())
        unknown = [n for n in names if n not in CHECKPOINT_NAMES]
        if unknown or not names:
            raise ValueError(f"remat policy {name!r}: unknown or no checkpoint names {unknown}; choose from "
                             f"{', '.join(CHECKPOINT_NAMES)}")
        return policies.save_only_these_names(*names)
    raise ValueError(f"unknown remat policy {name!r}; choose none, full, dots, dots_no_batch or names:<a,b,...>")
