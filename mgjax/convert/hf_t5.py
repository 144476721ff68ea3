"""transformers T5 (encoder) config and weights -> `T5Config` and the `mgjax.text.t5.T5Encoder` param tree.

Torch `nn.Linear` stores `[out, in]`; our kernels are `[in, ...]`, so every projection is transposed, and the
attention projections are split into heads: q/k/v `[H*K, D]` -> `[D, H, K]`, o `[D, H*K]` -> `[H, K, D]`.
Per-layer weights are stacked on a leading `layers` axis to match the `nn.scan` params.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from mgjax.config import ConfigError, T5Config, dataclass_from_dict

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


def _get(state_dict: Mapping[str, Any], *keys: str) -> np.ndarray:
    """The first of `keys` present in `state_dict`, as float32 numpy; KeyError naming them otherwise."""
    for key in keys:
        if key in state_dict:
            value = state_dict[key]
            if hasattr(value, "detach"):  # a torch tensor
                value = value.detach().float().cpu().numpy()
            return np.asarray(value, dtype=np.float32)
    raise KeyError(f"T5 weight {' or '.join(repr(k) for k in keys)} missing from the state dict")


def _layer_params(state_dict: Mapping[str, Any], cfg: T5Config, block: str) -> dict:
    """One `encoder.block.N.` sub-tree -> the unstacked params of one `T5Layer`."""
    heads, d_kv, d_model = cfg.num_heads, cfg.d_kv, cfg.d_model
    attn = f"{block}layer.0.SelfAttention."
    ff = f"{block}layer.1.DenseReluDense."

    def in_proj(name):  # [H*K, D] -> [D, H, K]
        return _get(state_dict, attn + name + ".weight").T.reshape(d_model, heads, d_kv)

    def dense(name):  # [out, in] -> [in, out]
        return _get(state_dict, ff + name + ".weight").T

    if cfg.feed_forward_proj == "relu":
        mlp = {"wi": dense("wi")}
    else:
        mlp = {"wi_0": dense("wi_0"), "wi_1": dense("wi_1")}
    mlp["wo"] = dense("wo")
    return {
        "attention_norm": {"scale": _get(state_dict, f"{block}layer.0.layer_norm.weight")},
        "attention": {
            "query": in_proj("q"), "key": in_proj("k"), "value": in_proj("v"),
            "out": _get(state_dict, attn + "o.weight").T.reshape(heads, d_kv, d_model),
        },
        "mlp_norm": {"scale": _get(state_dict, f"{block}layer.1.layer_norm.weight")},
        "mlp": mlp,
    }


def _stack(trees: list[dict]) -> dict:
    """A list of identically structured nested dicts of arrays -> one dict of arrays with a leading axis."""
    first = trees[0]
    if isinstance(first, dict):
        return {key: _stack([tree[key] for tree in trees]) for key in first}
    return np.stack(trees, axis=0)


def t5_params_from_hf(state_dict: Mapping[str, Any], cfg: T5Config, prefix: str = "") -> dict:
    """transformers `T5EncoderModel` weights -> the `T5Encoder` param tree (nested dicts of float32 numpy).

    `state_dict` maps names to numpy arrays (or torch tensors); `prefix` selects a sub-tree, e.g. `"text_encoder."`
    in a MusicGen checkpoint. The token embedding is read from `shared.weight` or, if that tied copy was dropped on
    save, `encoder.embed_tokens.weight`.
    """
    p = prefix
    embedding = _get(state_dict, p + "shared.weight", p + "encoder.embed_tokens.weight")
    if embedding.shape != (cfg.vocab_size, cfg.d_model):
        raise ValueError(f"T5 embedding has shape {embedding.shape}, config expects {(cfg.vocab_size, cfg.d_model)}")
    params = {
        "embedding": embedding,
        "relative_attention_bias": _get(state_dict, p + "encoder.block.0.layer.0.SelfAttention."
                                        "relative_attention_bias.weight"),
        "layers": _stack([_layer_params(state_dict, cfg, f"{p}encoder.block.{i}.") for i in range(cfg.num_layers)]),
        "final_norm": {"scale": _get(state_dict, p + "encoder.final_layer_norm.weight")},
    }
    extra = f"{p}encoder.block.{cfg.num_layers}.layer.0.layer_norm.weight"
    if extra in state_dict:
        raise ValueError(f"state dict has more T5 blocks than config.num_layers={cfg.num_layers} (found {extra!r})")
    return params
