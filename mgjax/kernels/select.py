"""Which formulation set the model runs (`lm.kernels`), resolved at trace time.

    auto   by `jax.default_backend()`: "cpu" on the CPU backend, "plain" elsewhere
    cpu    `mgjax.kernels.cpu`: custom-VJP matmuls, a hand-written FFN backward, per-layer decoding weights
    plain  `mgjax.kernels.plain`: einsums and autodiff (what XLA on TPU/GPU and remat policies see through)

Both give the same numbers (tests/test_kernels_cpu.py); the choice changes the program, never the params.
"""
from __future__ import annotations

from types import ModuleType

import jax

from mgjax.config import KERNELS
from mgjax.kernels import cpu, plain


def resolve_kernels(name: str = "auto") -> str:
    """"cpu" or "plain" for `name` ("auto" by the default backend). Raises ValueError for unknown names."""
    if name not in KERNELS:
        raise ValueError(f"unknown lm.kernels {name!r}; choose one of {', '.join(KERNELS)}")
    if name == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "plain"
    return name


def kernels_for(name: str = "auto") -> ModuleType:
    """The module of formulations `name` resolves to: `einsum(spec, x, w)`, `gelu_mlp(x, fc1, fc2)`,
    `codebook_heads(x, kernel)`, `split_layers_by_default(lm_params)`."""
    return cpu if resolve_kernels(name) == "cpu" else plain
