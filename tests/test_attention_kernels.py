"""mgjax.kernels.attention: every implementation gives the dense reference's numbers (forward and gradients), rows
with no allowed key included; the TPU splash kernel runs in Pallas' interpret mode on CPU, and its real TPU lowering
is checked by lowering for the "tpu" platform (no TPU needed)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgjax.kernels import attention as attn

TOL = 1e-5
HEADS, HEAD_DIM = 2, 64


def xla_sdpa(q, k, v, *, causal=False, kv_mask=None, q_offset=0):
    """The "cudnn" wrapper with XLA's implementation: the same padding and masks, runnable on CPU."""
    return attn._xla_sdpa(q, k, v, causal=causal, kv_mask=kv_mask, q_offset=q_offset, implementation=None,
                          length_multiple=attn.CUDNN_LENGTH_MULTIPLE)


IMPLEMENTATIONS = {
    "dense": functools.partial(attn.attention, implementation="dense"),
    "pallas_interpret": functools.partial(attn.attention, implementation="pallas_interpret"),
    "xla_sdpa": xla_sdpa,
}


def random_inputs(seed: int, batch: int, length: int, key_length: int):
    """q `[B, T, H, Dh]`, k, v `[B, S, H, Dh]` and a cotangent weight shaped like the output, float32."""
    rng = np.random.default_rng(seed)
    shapes = [(batch, length), (batch, key_length), (batch, key_length), (batch, length)]
    return [jnp.asarray(rng.standard_normal(shape + (HEADS, HEAD_DIM)), jnp.float32) for shape in shapes]


def reference_mask(length, key_length, *, causal, kv_mask, q_offset=0):
    """`[B or 1, 1, T, S]` bool (True = attend), written out independently of the module under test."""
    mask = None
    if causal:
        mask = jnp.asarray(np.arange(key_length)[None, :] <= q_offset + np.arange(length)[:, None])[None, None]
    if kv_mask is not None:
        mask = kv_mask[:, None, None, :] if mask is None else mask & kv_mask[:, None, None, :]
    return mask


def dot_product_attention(q, k, v, mask):
    """The textbook reference: softmax(q.k / sqrt(Dh), masked with float32's min) . v, scores in float32."""
    scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) / np.sqrt(q.shape[-1])
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1).astype(v.dtype), v)


def max_errors(fn, q, k, v, weight, *, causal, kv_mask):
    """Max abs error of the output and of d/dq, d/dk, d/dv of `sum(weight * out)` against the dense reference."""
    mask = reference_mask(q.shape[1], k.shape[1], causal=causal, kv_mask=kv_mask)

    def reference(q, k, v):
        return dot_product_attention(q, k, v, mask)

    def candidate(q, k, v):
        return fn(q, k, v, causal=causal, kv_mask=kv_mask)

    def loss(f, q, k, v):
        return jnp.sum(f(q, k, v) * weight)

    out, grads = jax.jit(candidate)(q, k, v), jax.jit(jax.grad(functools.partial(loss, candidate), (0, 1, 2)))(q, k, v)
    ref_out, ref_grads = reference(q, k, v), jax.grad(functools.partial(loss, reference), (0, 1, 2))(q, k, v)
    assert out.shape == q.shape and out.dtype == v.dtype
    return [float(jnp.max(jnp.abs(a - b))) for a, b in zip((out, *grads), (ref_out, *ref_grads))]


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_causal_self_attention_matches_dense(name):
    # 199: neither a multiple of splash's 128-blocks nor even (cuDNN's wrapper pads it).
    q, k, v, weight = random_inputs(0, batch=2, length=199, key_length=199)
    errors = max_errors(IMPLEMENTATIONS[name], q, k, v, weight, causal=True, kv_mask=None)
    assert max(errors) <= TOL, errors


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_padded_cross_attention_matches_dense(name):
    q, k, v, weight = random_inputs(1, batch=3, length=150, key_length=37)
    # No padding, a padded row with a hole, and CFG's null condition (nothing to attend: the mean of v).
    kv_mask = np.ones((3, 37), bool)
    kv_mask[1, 11:] = False
    kv_mask[1, 3] = False
    kv_mask[2] = False
    errors = max_errors(IMPLEMENTATIONS[name], q, k, v, weight, causal=False, kv_mask=jnp.asarray(kv_mask))
    assert max(errors) <= TOL, errors


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_offset_causal_with_left_padding_matches_dense(name):
    """Queries at positions 130..145 of 150 keys (a prefill chunk), keys left-padded: row 0's queries all see keys,
    row 1's (the first 140 keys masked) none before position 140."""
    q, k, v, _ = random_inputs(2, batch=2, length=16, key_length=150)
    kv_mask = jnp.asarray(np.arange(150)[None, :] >= np.array([[5], [140]]))
    out = jax.jit(functools.partial(IMPLEMENTATIONS[name], causal=True, kv_mask=kv_mask, q_offset=130))(q, k, v)
    mask = reference_mask(16, 150, causal=True, kv_mask=kv_mask, q_offset=130)
    assert float(jnp.max(jnp.abs(out - dot_product_attention(q, k, v, mask)))) <= TOL


def test_resolve_implementation(monkeypatch):
    if jax.default_backend() == "cpu":
        assert attn.resolve_implementation("auto") == "dense"
    for backend, name in (("cpu", "dense"), ("gpu", "cudnn"), ("tpu", "pallas")):
        monkeypatch.setattr(jax, "default_backend", lambda: backend)
        assert attn.resolve_implementation() == name
    monkeypatch.undo()
    for name in ("dense", "pallas", "pallas_interpret", "cudnn"):
        assert attn.resolve_implementation(name) == name
    with pytest.raises(ValueError, match="valid: auto, dense, pallas, pallas_interpret, cudnn"):
        attn.resolve_implementation("flash")
    with pytest.raises(ValueError, match="valid"):
        attn.attention(*random_inputs(0, 1, 4, 4)[:3], implementation="splash")


@pytest.mark.parametrize("length, block", [(1, 128), (37, 128), (200, 256), (512, 512), (1503, 512), (1600, 128)])
def test_splash_block_size(length, block):
    assert attn.splash_block_size(length) == block


def test_pallas_lowers_for_tpu_at_musicgen_shapes():
    """The non-interpreted kernels (forward, dq, dkv) lower through Mosaic for a TPU at the training shapes: 30 s of
    delayed codes (1503 positions) in bfloat16, causal self-attention and cross-attention to padded text."""
    batch, length, heads = 2, 1503, 16
    x = jax.ShapeDtypeStruct((batch, length, heads, HEAD_DIM), jnp.bfloat16)
    text = jax.ShapeDtypeStruct((batch, 128, heads, HEAD_DIM), jnp.bfloat16)
    text_mask = jax.ShapeDtypeStruct((batch, 128), jnp.bool_)

    def train_grads(implementation):
        def loss(q, k, v, c, mask):
            h = attn.attention(q, k, v, causal=True, implementation=implementation)
            h = attn.attention(h, c, c, kv_mask=mask, implementation=implementation)
            return jnp.sum(h.astype(jnp.float32))
        lowered = jax.jit(jax.grad(loss, (0, 1, 2, 3))).trace(x, x, x, text, text_mask)
        return lowered.lower(lowering_platforms=("tpu",)).as_text()

    kernel_text = train_grads("pallas")
    assert attn.uses_attention_kernel(kernel_text)
    assert kernel_text.count("splash_mha_") >= 6  # forward, dq and dkv of each attention
    assert not attn.uses_attention_kernel(train_grads("dense"))
