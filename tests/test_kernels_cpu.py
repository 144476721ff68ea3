"""The CPU formulations (`mgjax.kernels.cpu`) give the plain path's numbers (`mgjax.kernels.plain`): teacher-forced
logits and gradients of a tiny LM, the heads at one and many positions, greedy tokens of the sampler (float32 and
int8 weights); and `lm.kernels` resolves and validates as documented."""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgjax import sampling
from mgjax.config import ConfigError, LMConfig, dataclass_from_dict
from mgjax.kernels import cpu, plain
from mgjax.kernels.select import kernels_for, resolve_kernels
from mgjax.lm.model import MusicGenLM, quantize_lm_params

TOL = 1e-5
TEXT_WIDTH = 24


def tiny_config(conditioning: str, kernels: str, **overrides) -> LMConfig:
    """configs/tiny.yaml's LM (prepend: a 7-frame chroma prefix)."""
    return LMConfig(dim=32, num_layers=2, num_heads=4, ffn_dim=64, num_codebooks=4, card=64,
                    conditioning=conditioning, chroma_length=7, kernels=kernels, **overrides)


def random_lm(conditioning: str, seed: int = 0):
    """(params, codes `[2, 4, 9]`, cond `[2, 5, 24]`, mask `[2, 5]` with padding, chroma `[2, 3, 12]` or None).

    Every param is redrawn at a scale where the layers matter (the 0.02 init leaves the logits near zero, where
    any two formulations agree trivially); norm scales stay near one."""
    config = tiny_config(conditioning, "plain")
    keys = jax.random.split(jax.random.key(seed), 5)
    codes = jax.random.randint(keys[0], (2, 4, 9), 0, config.card + 1)
    cond = jax.random.normal(keys[1], (2, 5, TEXT_WIDTH))
    mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
    chroma = jax.nn.one_hot(jax.random.randint(keys[2], (2, 3), 0, 12), 12) if conditioning == "prepend" else None
    params = MusicGenLM(config).init(keys[3], codes, cond, mask, chroma=chroma)["params"]
    params = flax.core.unfreeze(flax.linen.meta.unbox(params))
    flat = flax.traverse_util.flatten_dict(params)
    leaf_keys = jax.random.split(keys[4], len(flat))
    for leaf_key, (path, value) in zip(leaf_keys, sorted(flat.items())):
        noise = jax.random.normal(leaf_key, value.shape, value.dtype)
        flat[path] = 1.0 + 0.1 * noise if path[-1] == "scale" else 0.3 * noise
    return flax.traverse_util.unflatten_dict(flat), codes, cond, mask, chroma


def logits_and_grads(kernels: str, conditioning: str, params, codes, cond, mask, chroma):
    lm = MusicGenLM(tiny_config(conditioning, kernels))
    shape = (2, 4, codes.shape[-1], 64)
    cotangent = jax.random.normal(jax.random.key(9), shape) / np.sqrt(np.prod(shape))  # a unit-norm direction

    def objective(p):
        logits = lm.apply({"params": p}, codes, cond, mask, chroma=chroma)
        return jnp.sum(logits * cotangent), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
    return logits, grads


def test_auto_resolves_by_backend(monkeypatch):
    assert resolve_kernels("auto") == ("cpu" if jax.default_backend() == "cpu" else "plain")
    assert resolve_kernels() == resolve_kernels("auto")
    assert resolve_kernels("cpu") == "cpu" and resolve_kernels("plain") == "plain"
    for backend, expected in (("cpu", "cpu"), ("gpu", "plain"), ("tpu", "plain")):
        monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
        assert resolve_kernels("auto") == expected
        assert kernels_for("auto") is (cpu if expected == "cpu" else plain)
    assert kernels_for("cpu") is cpu and kernels_for("plain") is plain
    with pytest.raises(ValueError, match="unknown lm.kernels 'gpu'; choose one of auto, cpu, plain"):
        resolve_kernels("gpu")


def test_config_key_validates_and_defaults_for_old_configs():
    with pytest.raises(ConfigError, match="lm.kernels must be one of auto, cpu, plain, got 'fast'"):
        tiny_config("cross", "fast").validate()
    old = {"dim": 32, "num_layers": 2, "num_heads": 4, "ffn_dim": 64, "card": 64}  # written before the key existed
    assert dataclass_from_dict(LMConfig, old, "lm").kernels == "auto"
    assert dataclass_from_dict(LMConfig, dict(old, kernels="plain"), "lm").kernels == "plain"


@pytest.mark.parametrize("conditioning", ["cross", "prepend"])
def test_teacher_forced_logits_and_gradients_agree(conditioning):
    inputs = random_lm(conditioning)
    cpu_logits, cpu_grads = logits_and_grads("cpu", conditioning, *inputs)
    plain_logits, plain_grads = logits_and_grads("plain", conditioning, *inputs)
    assert float(jnp.abs(plain_logits).std()) > 0.5  # the layers matter at this scale
    err = float(jnp.abs(cpu_logits - plain_logits).max())
    print(f"{conditioning}: logits max |{float(jnp.abs(plain_logits).max()):.2f}|, max abs err {err:.2e}")
    assert err <= TOL
    flat_cpu, flat_plain = (flax.traverse_util.flatten_dict(g) for g in (cpu_grads, plain_grads))
    assert flat_cpu.keys() == flat_plain.keys()
    worst = max((float(jnp.abs(flat_cpu[k] - flat_plain[k]).max()), "/".join(k)) for k in flat_plain)
    print(f"{conditioning}: largest gradient {max(float(jnp.abs(g).max()) for g in flat_plain.values()):.2f}, "
          f"max abs err {worst[0]:.2e} ({worst[1]})")
    assert worst[0] <= TOL, worst


@pytest.mark.parametrize("positions", [1, 6])
def test_codebook_heads_agree_with_gradients(positions):
    """One position (a decoding step: K matrix-vector products) and many (one flattened matmul)."""
    kx, kk, kc = jax.random.split(jax.random.key(1), 3)
    x, kernel = jax.random.normal(kx, (3, positions, 16)), jax.random.normal(kk, (4, 16, 40))
    cotangent = jax.random.normal(kc, (3, 4, positions, 40))
    results = [jax.value_and_grad(lambda a, b, f=f: jnp.sum(f(a, b) * cotangent), argnums=(0, 1))(x, kernel)
               for f in (cpu.codebook_heads, plain.codebook_heads)]
    assert cpu.codebook_heads(x, kernel).shape == plain.codebook_heads(x, kernel).shape == (3, 4, positions, 40)
    for got, expected in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(got, expected, atol=TOL, rtol=TOL)


def test_plain_path_has_no_custom_vjp_or_barrier():
    """What remat policies and XLA on TPU/GPU get: the plain path's backward is autodiff of einsums."""
    params, codes, cond, mask, chroma = random_lm("cross")
    for kernels, expect_custom in (("plain", False), ("cpu", True)):
        lm = MusicGenLM(tiny_config("cross", kernels))
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(lm.apply({"params": p}, codes, cond, mask))))(params))
        assert ("custom_vjp_call" in jaxpr) == expect_custom
        assert ("optimization_barrier" in jaxpr) == expect_custom


@pytest.mark.parametrize("weight_format", ["float32", "int8"])
@pytest.mark.parametrize("conditioning", ["cross", "prepend"])
def test_greedy_tokens_identical_both_ways(conditioning, weight_format):
    """The sampler on the CPU kernels (split layer weights, per-position heads) and on the plain ones (scanned
    layers, einsum heads) picks the same greedy tokens, with guidance, from float32 or int8 weights."""
    params, _, cond, mask, chroma = random_lm(conditioning, seed=3)
    if weight_format == "int8":
        params = quantize_lm_params(params)
    runs = {}
    for kernels in ("cpu", "plain"):
        config = tiny_config(conditioning, kernels, weight_format=weight_format)
        runs[kernels] = sampling.generate_codes(
            params, cond, mask, jax.random.key(0), jnp.zeros((2, 4, 0), jnp.int32), lm_config=config, frames=12,
            sampling=sampling.SamplingConfig(greedy=True, cfg_coef=3.0), chroma=chroma)
    np.testing.assert_array_equal(runs["cpu"], runs["plain"])
    assert len(np.unique(np.asarray(runs["plain"]))) > 4  # not a constant stream
    assert not sampling.split_layers_by_default(params, "plain")
    assert sampling.split_layers_by_default(params, "cpu") == cpu.split_layers_by_default(params)


def test_split_layers_default_follows_the_config(monkeypatch):
    """`split_layers=None` resolves by `lm.kernels`: never split on the plain path, even on a CPU with memory."""
    params, _, cond, mask, _ = random_lm("cross")
    seen = []
    real = sampling._generate_codes
    monkeypatch.setattr(sampling, "_generate_codes", lambda *a, **kw: seen.append(kw["split_layers"]) or real(*a, **kw))
    monkeypatch.setattr(cpu, "free_host_bytes", lambda: 10 ** 15)
    for kernels in ("plain", "cpu"):
        sampling.generate_codes(params, cond, mask, jax.random.key(0), jnp.zeros((2, 4, 0), jnp.int32),
                                lm_config=tiny_config("cross", kernels), frames=3,
                                sampling=sampling.SamplingConfig(greedy=True))
    assert seen == [False, True]
