"""T5 encoder parity against transformers' `T5EncoderModel` (random weights), converter and tokenizer checks."""
from __future__ import annotations

import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from helpers_tokenizer import build_test_tokenizer
from mgjax.config import ConfigError, T5Config
from mgjax.convert.hf_t5 import t5_config_from_hf, t5_params_from_hf
from mgjax.text.t5 import T5Encoder, relative_position_buckets
from mgjax.text.tokenizer import load_tokenizer, tokenize

torch.set_num_threads(1)

# Two shapes of oracle: relu with log-spaced and clamped buckets (max_distance < L), gated-gelu with
# num_heads * d_kv != d_model and the default bucket settings.
HF_CONFIGS = {
    "relu": dict(vocab_size=99, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                 relative_attention_num_buckets=8, relative_attention_max_distance=8,
                 feed_forward_proj="relu", layer_norm_epsilon=1e-6),
    "gated-gelu": dict(vocab_size=77, d_model=24, d_kv=6, num_heads=3, d_ff=40, num_layers=3,
                       relative_attention_num_buckets=32, relative_attention_max_distance=128,
                       feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-5),
}
LENGTHS = {"relu": (11, 6), "gated-gelu": (5, 9)}  # odd lengths, padding in either row
TOL = 1e-4


def _oracle(name: str) -> transformers.T5EncoderModel:
    """A random `T5EncoderModel` with every parameter randomised (norms included: they start at ones)."""
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(transformers.T5Config(dropout_rate=0.0, **HF_CONFIGS[name])).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "layer_norm" in pname:
                p.uniform_(0.5, 1.5)
            elif "relative_attention_bias" in pname:
                p.normal_(0.0, 1.0)
            elif p.ndim == 2 and "shared" not in pname and "embed_tokens" not in pname:
                p.normal_(0.0, p.shape[1] ** -0.5)
            else:
                p.normal_(0.0, 1.0)
    return model


def _inputs(name: str, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    lengths = LENGTHS[name]
    length = max(lengths)
    ids = rng.integers(1, vocab, size=(len(lengths), length)).astype(np.int32)
    mask = (np.arange(length)[None, :] < np.array(lengths)[:, None]).astype(np.int32)
    return np.where(mask, ids, 0).astype(np.int32), mask


def _torch_out(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    return out.last_hidden_state.numpy()


def _state_dict(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _shapes(tree):
    return jax.tree.map(lambda x: tuple(x.shape), tree)


def _max_err(ours, ref, mask) -> float:
    keep = mask.astype(bool)
    return float(np.max(np.abs(np.asarray(ours)[keep] - ref[keep])))


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_parity_with_transformers(name):
    model = _oracle(name)
    cfg = t5_config_from_hf(model.config.to_dict())
    assert cfg == T5Config(pad_token_id=0, **HF_CONFIGS[name])
    ids, mask = _inputs(name, cfg.vocab_size)
    ref = _torch_out(model, ids, mask)

    encoder = T5Encoder(cfg)
    # abstract init: the structure and shapes are what matter, and eager scan init is slow
    init = flax.linen.meta.unbox(
        jax.eval_shape(encoder.init, jax.random.key(0), jnp.asarray(ids), jnp.asarray(mask))["params"])
    params = t5_params_from_hf(_state_dict(model), cfg)
    assert jax.tree.structure(params) == jax.tree.structure(init)
    assert _shapes(params) == _shapes(init)
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))

    ours = jax.jit(encoder.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert ours.shape == (2, max(LENGTHS[name]), cfg.d_model) and ours.dtype == jnp.float32
    err = _max_err(ours, ref, mask)
    print(f"{name}: max abs error {err:.2e} (output scale {np.abs(ref).max():.2f})")
    assert err <= TOL


def test_parity_through_save_pretrained(tmp_path):
    from safetensors.numpy import load_file

    model = _oracle("gated-gelu")
    model.save_pretrained(tmp_path)
    with open(os.path.join(tmp_path, "config.json")) as f:
        cfg = t5_config_from_hf(json.load(f))
    state_dict = load_file(os.path.join(tmp_path, "model.safetensors"))
    # a MusicGen checkpoint nests the encoder under `text_encoder.`
    params = t5_params_from_hf({"text_encoder." + k: v for k, v in state_dict.items()}, cfg, prefix="text_encoder.")
    ids, mask = _inputs("gated-gelu", cfg.vocab_size)
    ours = T5Encoder(cfg).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert _max_err(ours, _torch_out(model, ids, mask), mask) <= TOL


def test_bfloat16_compute_stays_close():
    model = _oracle("relu")
    cfg = t5_config_from_hf(model.config.to_dict())
    params = t5_params_from_hf(_state_dict(model), cfg)
    ids, mask = _inputs("relu", cfg.vocab_size)
    ours = T5Encoder(cfg, dtype=jnp.bfloat16).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    ref = _torch_out(model, ids, mask)
    assert ours.dtype == jnp.float32
    assert _max_err(ours, ref, mask) <= 0.05 * np.abs(ref).max()


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    length = 300
    relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    for num_buckets, max_distance in ((32, 128), (8, 8), (16, 20), (64, 256)):
        ref = T5Attention._relative_position_bucket(relative, True, num_buckets, max_distance).numpy()
        np.testing.assert_array_equal(relative_position_buckets(length, length, num_buckets, max_distance), ref)


def test_missing_key_is_named():
    model = _oracle("relu")
    cfg = t5_config_from_hf(model.config.to_dict())
    state_dict = _state_dict(model)
    del state_dict["encoder.block.1.layer.1.layer_norm.weight"]
    with pytest.raises(KeyError, match=r"encoder\.block\.1\.layer\.1\.layer_norm\.weight"):
        t5_params_from_hf(state_dict, cfg)
    with pytest.raises(KeyError, match="shared.weight"):
        t5_params_from_hf(_state_dict(model), cfg, prefix="text_encoder.")


def test_embedding_from_encoder_embed_tokens():
    model = _oracle("relu")
    cfg = t5_config_from_hf(model.config.to_dict())
    state_dict = _state_dict(model)
    shared = state_dict.pop("shared.weight")
    state_dict["encoder.embed_tokens.weight"] = shared
    np.testing.assert_array_equal(t5_params_from_hf(state_dict, cfg)["embedding"], shared)


@pytest.mark.parametrize("bad", [
    {"feed_forward_proj": "gated-silu"},
    {"feed_forward_proj": "gelu"},
    {"feed_forward_proj": "relu", "is_gated_act": True},
    {"feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu"},
    {"model_type": "umt5"},
])
def test_config_rejects_unsupported(bad):
    with pytest.raises(ConfigError):
        t5_config_from_hf({"d_model": 16, **bad})


def test_config_defaults_follow_transformers():
    assert t5_config_from_hf({"pad_token_id": None}) == T5Config(
        vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8, pad_token_id=0)


def test_tokenizer_pads_to_longest(tmp_path):
    tokenizer = load_tokenizer(build_test_tokenizer(str(tmp_path / "tok")))
    ids, mask = tokenize(tokenizer, ["calm piano", "happy rock with electric guitar and drums", "jazz"])
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    assert ids.shape == mask.shape == (3, 8)  # 7 words + </s>
    np.testing.assert_array_equal(mask.sum(axis=1), [3, 8, 2])
    assert (ids[mask == 0] == tokenizer.pad_token_id).all()
    assert (ids[np.arange(3), mask.sum(axis=1) - 1] == tokenizer.eos_token_id).all()
    single_ids, single_mask = tokenize(tokenizer, ["calm piano"])
    np.testing.assert_array_equal(single_ids, ids[:1, :3])
    assert single_mask.all()


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nowhere"))
    tokenizer = load_tokenizer(build_test_tokenizer(str(tmp_path / "tok")))
    with pytest.raises(ValueError, match="empty"):
        tokenize(tokenizer, [])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        tokenize(tokenizer, ["calm piano", ""])
    with pytest.raises(TypeError):
        tokenize(tokenizer, "calm piano")
