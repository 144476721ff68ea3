"""The LM training loss: per-codebook cross-entropy over the positions the pattern marks valid."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def codebook_cross_entropy(logits: Any, codes: Any, mask: Any, weights: Any = None) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy per codebook, averaged over its valid positions, then averaged over codebooks.

    Args:
      logits: `[B, K, T, card]` float (any float dtype; the math is float32).
      codes: `[B, K, T]` int targets; masked positions may hold anything (special token, -1).
      mask: `[B, K, T]` or `[K, T]` bool, True where the target counts (e.g. `revert_logits`' mask & padding).
      weights: None, or float weights broadcastable to `[B, K, T]` (e.g. `[T]`): codebook k's loss is then the
        weighted mean `sum(w * nll) / sum(w)` over its valid positions.
    Returns:
      `(loss, per_codebook)`: scalar float32, and `[K]` float32.

    As audiocraft's MusicGen solver (`_compute_cross_entropy`): codebook k's loss is the mean over the B*T
    positions where its mask is set, and the loss is the plain mean of the K codebook losses. Where audiocraft
    would give NaN (a codebook with no valid position) this gives 0 for that codebook. Masked logits never reach
    the result nor its gradient, even if they are NaN.
    """
    logits = jnp.asarray(logits).astype(jnp.float32)
    if logits.ndim != 4:
        raise ValueError(f"logits must be [B, K, T, card], got shape {logits.shape}")
    shape = logits.shape[:3]
    codes = jnp.asarray(codes)
    if codes.shape != shape:
        raise ValueError(f"codes must be [B, K, T] = {shape}, got shape {codes.shape}")
    mask = jnp.asarray(mask, dtype=bool)
    if mask.shape not in (shape, shape[1:]):
        raise ValueError(f"mask must be [B, K, T] = {shape} or [K, T] = {shape[1:]}, got shape {mask.shape}")
    mask = jnp.broadcast_to(mask, shape)

    # Selecting (not multiplying) keeps NaN/inf at masked positions out of both the value and the gradient.
    logits = jnp.where(mask[..., None], logits, 0.0)
    targets = jnp.where(mask, codes, 0).astype(jnp.int32)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jnp.where(mask, jax.nn.logsumexp(logits, axis=-1) - target_logits, 0.0)  # [B, K, T]
    # Unweighted, every valid position weighs 1: the weighted mean is then the plain mean over valid positions.
    weights = jnp.where(mask, 1.0 if weights is None else jnp.asarray(weights, jnp.float32), 0.0)  # [B, K, T]
    total = weights.sum(axis=(0, 2))
    per_codebook = (weights * nll).sum(axis=(0, 2)) / jnp.where(total > 0, total, 1.0)
    return per_codebook.mean(), per_codebook
