"""The KV cache's structure and the three modes: prefill (the prompt's columns into an empty cache, through the
attention kernel) and decode (appending at a traced index) give the teacher-forced (train mode) logits; the
stacked and per-layer layouts hold the same keys and values."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgjax.kernels.cpu import split_for_decoding
from mgjax.lm import kv_cache as kvs
from mgjax.lm.model import MusicGenLM
from tests.test_kernels_cpu import random_lm as random_params
from tests.test_kernels_cpu import tiny_config

TOL = 1e-5
PROMPT = 4  # columns prefilled


def random_lm(conditioning: str):
    """configs/tiny.yaml's LM (2 layers, 4 heads of 8) with random weights at a scale where the layers matter:
    (model, params, codes `[2, 4, 9]`, cond, mask with padding, chroma or None)."""
    return (MusicGenLM(tiny_config(conditioning, "auto")),) + random_params(conditioning)


@pytest.mark.parametrize("split", [False, True], ids=["stacked", "per-layer"])
@pytest.mark.parametrize("conditioning", ["cross", "prepend"])
def test_prefilled_prompt_then_decoding_gives_the_teacher_forced_logits(conditioning, split):
    model, params, codes, cond, mask, chroma = random_lm(conditioning)
    variables = {"params": params}
    full = model.apply(variables, codes, cond, mask, chroma=chroma)
    seq = codes.shape[-1]
    cache = model.apply(variables, cond, mask, chroma=chroma, max_length=seq, codes=codes[:, :, :PROMPT],
                        method=MusicGenLM.prefill)
    prefix = 0 if conditioning == "cross" else model.config.chroma_length + cond.shape[1]
    assert int(cache["index"]) == prefix + PROMPT
    assert cache["k"].shape == (2, 2, prefix + seq, 4 * 8)  # [L, B, S, H*Dh]
    layer_params = None
    if split:
        layer_params, cache = split_for_decoding(params["layers"], cache)
        assert cache["k"][0].shape == (2, 4, prefix + seq, 8)  # L x [B, H, S, Dh]
    step = jax.jit(lambda c, x: model.apply(variables, x, c, layer_params, method=MusicGenLM.decode_step))
    logits = []
    for t in range(PROMPT - 1, seq - 1):  # column t's logits predict column t + 1; the prompt's last is fed again
        if t == PROMPT - 1:
            cache = dict(cache, index=cache["index"] - 1)  # rewrite the prompt's last column, now in decode mode
        out, cache = step(cache, codes[:, :, t:t + 1])
        logits.append(out)
    err = float(jnp.abs(jnp.concatenate(logits, axis=2) - full[:, :, PROMPT - 1:seq - 1]).max())
    assert err <= TOL, err


@pytest.mark.parametrize("conditioning", ["cross", "prepend"])
def test_prefill_writes_what_decoding_writes(conditioning):
    """The prompt's keys/values from prefill mode (the kernel over the new positions) equal those decode mode
    writes one call later (dense attention over the cache)."""
    model, params, codes, cond, mask, chroma = random_lm(conditioning)
    variables = {"params": params}
    prefilled = model.apply(variables, cond, mask, chroma=chroma, max_length=9, codes=codes[:, :, :PROMPT],
                            method=MusicGenLM.prefill)
    empty = model.apply(variables, cond, mask, chroma=chroma, max_length=9, method=MusicGenLM.prefill)
    _, decoded = model.apply(variables, codes[:, :, :PROMPT], empty, method=MusicGenLM.decode_step)
    assert int(decoded["index"]) == int(prefilled["index"])
    for name in ("k", "v"):
        assert float(jnp.abs(prefilled[name] - decoded[name]).max()) <= TOL
        assert float(jnp.abs(prefilled[name][:, :, int(prefilled["index"]) - 1]).max()) > 0  # written


def test_layouts_round_trip_exactly():
    rng = np.random.default_rng(0)
    stacked = {"index": jnp.int32(3), "k": jnp.asarray(rng.normal(size=(2, 3, 5, 4 * 8)), jnp.float32),
               "v": jnp.asarray(rng.normal(size=(2, 3, 5, 4 * 8)), jnp.float32),
               "cross_k": jnp.asarray(rng.normal(size=(2, 3, 6, 4, 8)), jnp.float32),
               "cross_v": jnp.asarray(rng.normal(size=(2, 3, 6, 4, 8)), jnp.float32),
               "cross_mask": jnp.ones((3, 6), bool)}
    per_layer = kvs.split_by_layer(stacked, num_heads=4)
    # head h of the folded axis is columns h*Dh .. (h+1)*Dh - 1
    np.testing.assert_array_equal(per_layer["k"][1][:, 2], stacked["k"][1][:, :, 16:24])
    back = kvs.stack_layers(per_layer)
    for name in stacked:
        np.testing.assert_array_equal(back[name], stacked[name])


def test_writes_land_where_the_layouts_say():
    new = jnp.arange(2 * 2 * 3 * 4, dtype=jnp.float32).reshape(2, 2, 3, 4)  # [B, T, H, Dh]
    stacked = kvs.write_stacked(jnp.zeros((2, 2, 5, 12)), new, jnp.int32(1), jnp.int32(3))
    np.testing.assert_array_equal(kvs.read_stacked(stacked, jnp.int32(1), 3)[:, 3:5], new)
    assert float(jnp.abs(stacked[0]).max()) == 0 and float(jnp.abs(stacked[1][:, :3]).max()) == 0
    own = kvs.write_own(jnp.zeros((2, 3, 5, 4)), new, jnp.int32(2))
    np.testing.assert_array_equal(jnp.swapaxes(own, 1, 2)[:, 2:4], new)
