"""transformers T5 (encoder) config and weights -> `T5Config` and the `mgjax.text.t5.T5Encoder` param tree.

Torch `nn.Linear` stores `[out, in]`; our kernels are `[in, ...]`, so every projection is transposed, and the
attention projections are split into heads: q/k/v `[H*K, D]` -> `[D, H, K]`, o `[D, H*K]` -> `[H, K, D]`.
Per-layer weights are stacked on a leading `layers` axis to match the `nn.scan` params.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from mgjax.config import ConfigError, T5Config, dataclass_from_dict
from mgjax.convert.maps import LINEAR, Entry, linear, tied, to_params, to_state

# transformers' T5Config defaults: a config.json may omit any key that equals them.
_HF_DEFAULTS = {
    "vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6, "num_heads": 8,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "relu", "pad_token_id": 0,
}
# feed_forward_proj -> (is_gated_act, dense_act_fn) as transformers derives them.
_SUPPORTED_FF = {"relu": (False, "relu"), "gated-gelu": (True, "gelu_new")}
_SUPPORTED_MODEL_TYPES = ("t5", "mt5")  # same encoder; umt5 (per-layer position bias) is not supported


def t5_config_from_hf(cfg: Mapping[str, Any]) -> T5Config:
    """A transformers T5 `config.json` dict (or MusicGen's `text_encoder` sub-dict) -> `T5Config`.

    Raises `ConfigError` for encoders this implementation would not reproduce exactly.
    """
    model_type = cfg.get("model_type", "t5")
    if model_type not in _SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"text encoder model_type {model_type!r} is not supported (expected one of "
                          f"{', '.join(_SUPPORTED_MODEL_TYPES)})")
    values = {key: cfg.get(key, default) for key, default in _HF_DEFAULTS.items()}
    if values["pad_token_id"] is None:
        values["pad_token_id"] = 0
    ff = values["feed_forward_proj"]
    if ff not in _SUPPORTED_FF:
        raise ConfigError(f"T5 feed_forward_proj {ff!r} is not supported (only 'relu' and 'gated-gelu')")
    gated, act = _SUPPORTED_FF[ff]
    # transformers re-derives these from feed_forward_proj; a config that says otherwise was not made by it.
    if "is_gated_act" in cfg and bool(cfg["is_gated_act"]) != gated:
        raise ConfigError(f"T5 is_gated_act={cfg['is_gated_act']} contradicts feed_forward_proj={ff!r}")
    if "dense_act_fn" in cfg and cfg["dense_act_fn"] != act:
        raise ConfigError(f"T5 dense_act_fn={cfg['dense_act_fn']!r} with feed_forward_proj={ff!r} is not supported "
                          f"(expected {act!r})")
    config = dataclass_from_dict(T5Config, values, "text")
    config.validate()
    return config


def t5_entries(cfg: T5Config) -> list[Entry]:
    """The encoder's weight map over a `T5EncoderModel` state dict. The embedding is read from `shared.weight` or,
    if that tied copy was dropped on save, `encoder.embed_tokens.weight`, and written to both (as
    `T5EncoderModel.state_dict()` lists both); the relative attention bias `[R, H]`, shared by all layers, is
    block 0's."""
    D, H, K, F, N = cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.num_layers
    attn, ff = "encoder.block.{i}.layer.0.SelfAttention.", "encoder.block.{i}.layer.1.DenseReluDense."
    up = ("wi",) if cfg.feed_forward_proj == "relu" else ("wi_0", "wi_1")
    return [Entry("embedding", "shared.weight", tied("shared.weight", "encoder.embed_tokens.weight"),
                  (cfg.vocab_size, D)),
            Entry("relative_attention_bias", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                  shape=(cfg.relative_attention_num_buckets, H)),
            Entry("final_norm/scale", "encoder.final_layer_norm.weight", shape=(D,)),
            Entry("layers/attention_norm/scale", "encoder.block.{i}.layer.0.layer_norm.weight", shape=(D,), stack=N),
            *(Entry(f"layers/attention/{ours}", f"{attn}{theirs}.weight", LINEAR, (D, H, K), N)
              for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v"))),
            Entry("layers/attention/out", f"{attn}o.weight", linear(2), (H, K, D), N),
            Entry("layers/mlp_norm/scale", "encoder.block.{i}.layer.1.layer_norm.weight", shape=(D,), stack=N),
            *(Entry(f"layers/mlp/{name}", f"{ff}{name}.weight", LINEAR, (D, F), N) for name in up),
            Entry("layers/mlp/wo", f"{ff}wo.weight", LINEAR, (F, D), N)]


def t5_params_from_hf(state_dict: Mapping[str, Any], cfg: T5Config, prefix: str = "") -> dict:
    """transformers `T5EncoderModel` weights -> the `T5Encoder` param tree (nested dicts of float32 numpy).

    `state_dict` maps names to numpy arrays (or torch tensors); `prefix` selects a sub-tree, e.g. `"text_encoder."`
    in a MusicGen checkpoint.
    """
    extra = f"{prefix}encoder.block.{cfg.num_layers}.layer.0.layer_norm.weight"
    if extra in state_dict:
        raise ValueError(f"state dict has more T5 blocks than config.num_layers={cfg.num_layers} (found {extra!r})")
    return to_params(t5_entries(cfg), state_dict, prefix)


def t5_state_from_params(params: Mapping[str, Any], cfg: T5Config, prefix: str = "") -> dict[str, np.ndarray]:
    """The `T5Encoder` param tree -> a flat transformers `T5EncoderModel` state dict (contiguous float32 numpy),
    keys prefixed with `prefix` (e.g. `"text_encoder."` inside a MusicGen checkpoint)."""
    cfg.validate()
    return to_state(t5_entries(cfg), params, prefix)
