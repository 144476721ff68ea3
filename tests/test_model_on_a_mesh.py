"""The training-side model switches of the pod work, checked on this CPU: remat policies by name change what the
backward keeps, never the numbers; the Pallas attention kernel (interpret mode) inside the full LM, under a
(data 2, fsdp 1, tensor 2) mesh of 4 CPU devices where it runs in `shard_map` and the activations carry logical
sharding constraints, gives the dense single-device logits and gradients (float32, <= 1e-5)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgjax.config import ConfigError, LMConfig
from mgjax.lm.model import MusicGenLM
from tests.test_kernels_cpu import random_lm, tiny_config

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-5


def loss_and_grads(config: LMConfig, params, codes, cond, mask):
    def loss(p):
        logits = MusicGenLM(config).apply({"params": p}, codes, cond, mask)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * jnp.arange(logits.shape[2])[None, None, :])
    return jax.jit(jax.value_and_grad(loss))(params)


def max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch", "names:attention,mlp_hidden"])
def test_remat_policies_keep_the_numbers(policy):
    params, codes, cond, mask, _ = random_lm("cross")
    reference = loss_and_grads(tiny_config("cross", "plain"), params, codes, cond, mask)
    rematted = loss_and_grads(tiny_config("cross", "plain", remat_policy=policy), params, codes, cond, mask)
    assert max_diff(reference, rematted) <= TOL


def test_names_policy_keeps_what_it_names():
    """With `names:mlp_hidden` the backward reads the saved hidden activation: the jaxpr of the rematted layer
    names it as a residual; an unknown name is refused when the config is validated."""
    params, codes, cond, mask, _ = random_lm("cross")
    config = tiny_config("cross", "plain", remat_policy="names:mlp_hidden")
    fn = lambda p: MusicGenLM(config).apply({"params": p}, codes, cond, mask).sum()
    text = str(jax.make_jaxpr(jax.grad(fn))(params))
    assert "name=mlp_hidden" in text
    with pytest.raises((ConfigError, ValueError), match="mlp_hiden"):
        tiny_config("cross", "plain", remat_policy="names:mlp_hiden").validate()
        from mgjax.lm.remat import policy
        policy("names:mlp_hiden")


MESH_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    import jax.numpy as jnp
    from mgjax import sharding
    from tests.test_kernels_cpu import random_lm, tiny_config
    from tests.test_model_on_a_mesh import loss_and_grads, max_diff

    params, codes, cond, mask, _ = random_lm("cross")
    dense = loss_and_grads(tiny_config("cross", "plain", attention="dense"), params, codes, cond, mask)
    mesh = sharding.make_mesh((2, 1, 2))
    with jax.set_mesh(mesh):
        kernel_config = tiny_config("cross", "plain", attention="pallas_interpret", remat_policy="full")
        on_mesh = loss_and_grads(kernel_config, params, codes, cond, mask)
        lowered = jax.jit(lambda p: loss_and_grads(kernel_config, p, codes, cond, mask)).lower(params).as_text()
    print(json.dumps({"diff": max_diff(dense, on_mesh), "shard_map": "shard_map" in lowered or "manual" in lowered,
                      "devices": len(jax.devices())}))
""")


def test_kernel_attention_under_a_mesh_matches_dense():
    done = subprocess.run([sys.executable, "-c", MESH_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    import json
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["devices"] == 4 and found["shard_map"], found
    assert found["diff"] <= TOL, found
