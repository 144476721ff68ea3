"""Per-codebook cross-entropy: values against hand/numpy/torch references, masking."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgjax.lm.loss import codebook_cross_entropy


def numpy_reference(logits, codes, mask, time_weights=None):
    """audiocraft's formula written out: per codebook, mean of -log softmax over valid positions; mean over K.
    With `time_weights` `[T]`: the weighted mean over valid positions instead."""
    logits = logits.astype(np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    mask = np.broadcast_to(mask, codes.shape)
    weight = np.ones(codes.shape[2]) if time_weights is None else time_weights
    per_codebook = []
    for k in range(codes.shape[1]):
        terms = [(weight[t], -log_probs[b, k, t, codes[b, k, t]])
                 for b in range(codes.shape[0]) for t in range(codes.shape[2]) if mask[b, k, t]]
        per_codebook.append(sum(w * x for w, x in terms) / sum(w for w, _ in terms))
    return np.mean(per_codebook), np.array(per_codebook)


def test_hand_example():
    # B=1, K=2, T=2, card=2. Codebook 0: uniform logits -> log 2 at both steps.
    # Codebook 1: logits [0, log 3] -> p = [1/4, 3/4]; targets 1 then 0, the second masked out.
    logits = np.array([[[[0.0, 0.0], [5.0, 5.0]],
                        [[0.0, math.log(3.0)], [0.0, math.log(3.0)]]]], np.float32)
    codes = np.array([[[0, 1], [1, 0]]])
    mask = np.array([[True, True], [True, False]])
    loss, per_codebook = codebook_cross_entropy(logits, codes, mask)
    np.testing.assert_allclose(per_codebook, [math.log(2.0), -math.log(0.75)], rtol=1e-6)
    np.testing.assert_allclose(loss, (math.log(2.0) - math.log(0.75)) / 2, rtol=1e-6)


def random_case(seed: int, b: int, k: int, t: int, card: int, valid: float):
    """Random logits `[B, K, T, card]`, codes `[B, K, T]` and a mask with about `valid` of the positions set."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, k, t, card)).astype(np.float32) * 3
    return logits, rng.integers(0, card, (b, k, t)), rng.random((b, k, t)) < valid


def assert_matches_reference(logits, codes, mask, weights=None):
    loss, per_codebook = codebook_cross_entropy(logits, codes, mask, weights)
    ref_loss, ref_per_codebook = numpy_reference(logits, codes, mask, weights)
    np.testing.assert_allclose(per_codebook, ref_per_codebook, rtol=1e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    return loss, per_codebook


def test_matches_reference_and_averages_per_codebook():
    b, k, t, card = 3, 4, 7, 11
    logits, codes, mask = random_case(0, b, k, t, card, 0.6)
    mask[:, 3] = False
    mask[1, 3, 2] = True  # codebook 3 has a single valid position: it still weighs 1/K in the loss
    loss, per_codebook = assert_matches_reference(logits, codes, mask)
    assert per_codebook.shape == (k,) and loss.dtype == jnp.float32


def test_time_weights_give_the_weighted_mean_over_valid_positions():
    t = 9
    logits, codes, mask = random_case(1, 2, 3, t, 7, 0.7)
    weights = np.where(np.arange(t) < 4, 5.0, 1.0).astype(np.float32)  # an opening weighted 5x
    loss, _ = assert_matches_reference(logits, codes, mask, weights)
    assert abs(float(loss) - numpy_reference(logits, codes, mask)[0]) > 1e-3  # the weights do change the loss
    np.testing.assert_allclose(codebook_cross_entropy(logits, codes, mask, np.ones(t))[0],
                               codebook_cross_entropy(logits, codes, mask)[0], rtol=1e-6)


def test_matches_torch_cross_entropy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    b, k, t, card = 2, 3, 9, 16
    logits = rng.normal(size=(b, k, t, card)).astype(np.float32)
    codes = rng.integers(0, card, (b, k, t))
    mask_kt = np.tril(np.ones((k, t), bool), k=t - k)  # a delay-like [K, T] mask, broadcast over B
    loss, per_codebook = codebook_cross_entropy(logits, codes, mask_kt)
    expected = []
    for q in range(k):
        selected = np.broadcast_to(mask_kt, codes.shape)[:, q].reshape(-1)
        expected.append(torch.nn.functional.cross_entropy(
            torch.from_numpy(logits[:, q].reshape(-1, card)[selected]),
            torch.from_numpy(codes[:, q].reshape(-1)[selected])).item())
    np.testing.assert_allclose(per_codebook, expected, rtol=1e-5)
    np.testing.assert_allclose(loss, np.mean(expected), rtol=1e-5)


def test_masked_positions_are_ignored():
    rng = np.random.default_rng(2)
    b, k, t, card = 2, 4, 6, 8
    logits = rng.normal(size=(b, k, t, card)).astype(np.float32)
    codes = rng.integers(0, card, (b, k, t))
    mask = rng.random((b, k, t)) < 0.5
    mask[:, :, 0] = True
    loss, per_codebook = codebook_cross_entropy(logits, codes, mask)

    junk_logits = np.where(mask[..., None], logits, rng.normal(size=logits.shape) * 100).astype(np.float32)
    junk_logits[~mask] = np.nan  # audiocraft's fill value for invalid positions
    junk_codes = np.where(mask, codes, card)  # the special token id, out of range
    junk_codes[~mask & (rng.random(codes.shape) < 0.5)] = -1
    loss2, per_codebook2 = codebook_cross_entropy(junk_logits, junk_codes, mask)
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)
    np.testing.assert_allclose(per_codebook2, per_codebook, rtol=1e-6)

    grad = jax.grad(lambda x: codebook_cross_entropy(x, junk_codes, mask)[0])(jnp.asarray(junk_logits))
    assert np.isfinite(grad).all()
    assert (np.asarray(grad)[~mask] == 0).all() and (np.abs(np.asarray(grad)[mask]).sum() > 0)

    # and changing a valid position does change the loss
    logits[0, 0, 0, codes[0, 0, 0]] += 1.0
    assert abs(float(codebook_cross_entropy(logits, codes, mask)[0]) - float(loss)) > 1e-4


def test_empty_codebook_is_zero_not_nan():
    logits = np.zeros((1, 2, 3, 4), np.float32)
    mask = np.array([[True, True, True], [False, False, False]])
    loss, per_codebook = codebook_cross_entropy(logits, np.zeros((1, 2, 3), int), mask)
    np.testing.assert_allclose(per_codebook, [math.log(4.0), 0.0], rtol=1e-6)
    np.testing.assert_allclose(loss, math.log(4.0) / 2, rtol=1e-6)


def test_bfloat16_logits_float32_math():
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(2, 2, 5, 32)) * 4, jnp.bfloat16)
    codes = rng.integers(0, 32, (2, 2, 5))
    mask = np.ones((2, 5), bool)
    loss, _ = jax.jit(codebook_cross_entropy)(logits, codes, mask)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, numpy_reference(np.asarray(logits, np.float32), codes, mask)[0], rtol=1e-5)


def test_shape_errors():
    logits = np.zeros((1, 2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="codes"):
        codebook_cross_entropy(logits, np.zeros((1, 2, 4), int), np.ones((2, 3), bool))
    with pytest.raises(ValueError, match="mask"):
        codebook_cross_entropy(logits, np.zeros((1, 2, 3), int), np.ones((3, 2), bool))
