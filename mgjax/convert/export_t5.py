"""`T5Config` and the `mgjax.text.t5.T5Encoder` param tree -> transformers T5 (encoder) config kwargs and weights.

The inverse of `mgjax.convert.hf_t5`: kernels `[in, ...]` go back to torch `nn.Linear`'s `[out, in]`, the attention
heads are merged again (q/k/v `[D, H, K]` -> `[H*K, D]`, o `[H, K, D]` -> `[D, H*K]`), and the stacked `layers`
axis is unstacked into `encoder.block.N.` entries.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from mgjax.config import T5Config


def t5_config_to_hf(cfg: T5Config) -> dict[str, Any]:
    """`T5Config` -> kwargs for `transformers.T5Config(**kwargs)` describing the same encoder.

    `dense_act_fn` and `is_gated_act` are not passed: transformers derives them from `feed_forward_proj`.
    """
    cfg.validate()
    return {
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.d_kv,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "feed_forward_proj": cfg.feed_forward_proj,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "pad_token_id": cfg.pad_token_id,
    }


def _array(value: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    """`value` (numpy or jax) as float32 numpy, checked against `shape`; ValueError naming the param otherwise."""
    array = np.asarray(value, dtype=np.float32)
    if array.shape != shape:
        raise ValueError(f"T5 param {name!r} has shape {array.shape}, config expects {shape}")
    return array


def _torch_layout(array: np.ndarray) -> np.ndarray:
    """A contiguous float32 copy, so no exported tensor aliases another or the caller's params."""
    return np.array(array, dtype=np.float32, order="C", copy=True)


def _stacked_layers(layers: Mapping[str, Any], cfg: T5Config) -> dict[str, np.ndarray]:
    """The stacked `layers` sub-tree -> {'attention/query': [N, D, H, K], ...} as checked float32 numpy.

    Converted once up front, so jax arrays are copied to host once rather than once per layer.
    """
    n, heads, d_kv, d_model, d_ff = cfg.num_layers, cfg.num_heads, cfg.d_kv, cfg.d_model, cfg.d_ff
    shapes = {
        "attention_norm/scale": (n, d_model),
        "attention/query": (n, d_model, heads, d_kv),
        "attention/key": (n, d_model, heads, d_kv),
        "attention/value": (n, d_model, heads, d_kv),
        "attention/out": (n, heads, d_kv, d_model),
        "mlp_norm/scale": (n, d_model),
        "mlp/wo": (n, d_ff, d_model),
    }
    up_names = ("wi",) if cfg.feed_forward_proj == "relu" else ("wi_0", "wi_1")
    shapes.update({f"mlp/{name}": (n, d_model, d_ff) for name in up_names})
    out = {}
    for path, shape in shapes.items():
        module, name = path.split("/")
        out[path] = _array(layers[module][name], shape, f"layers/{path}")
    return out


def _layer_state(layers: Mapping[str, np.ndarray], cfg: T5Config, index: int, block: str) -> dict[str, np.ndarray]:
    """Layer `index` of `_stacked_layers` output -> the `encoder.block.N.` entries (`block` ends with '.')."""
    heads, d_kv, d_model = cfg.num_heads, cfg.d_kv, cfg.d_model
    attn = f"{block}layer.0.SelfAttention."
    ff = f"{block}layer.1.DenseReluDense."
    state = {f"{block}layer.0.layer_norm.weight": layers["attention_norm/scale"][index]}
    for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v")):  # [D, H, K] -> [H*K, D]
        state[f"{attn}{theirs}.weight"] = layers[f"attention/{ours}"][index].reshape(d_model, heads * d_kv).T
    # [H, K, D] -> [D, H*K]
    state[f"{attn}o.weight"] = layers["attention/out"][index].reshape(heads * d_kv, d_model).T
    state[f"{block}layer.1.layer_norm.weight"] = layers["mlp_norm/scale"][index]
    up_names = ("wi",) if cfg.feed_forward_proj == "relu" else ("wi_0", "wi_1")
    for name in up_names:  # [D, F] -> [F, D]
        state[f"{ff}{name}.weight"] = layers[f"mlp/{name}"][index].T
    state[f"{ff}wo.weight"] = layers["mlp/wo"][index].T  # [F, D] -> [D, F]
    return state


def t5_state_from_params(params: Mapping[str, Any], cfg: T5Config, prefix: str = "") -> dict[str, np.ndarray]:
    """The `T5Encoder` param tree -> a flat transformers `T5EncoderModel` state dict (contiguous float32 numpy).

    Keys are transformers' own with `prefix` prepended (e.g. `"text_encoder."` inside a MusicGen checkpoint).
    The embedding `[V, D]` is written both as `shared.weight` and as its tied copy `encoder.embed_tokens.weight`,
    since `T5EncoderModel.state_dict()` lists both; the relative attention bias `[R, H]` goes to block 0 only,
    where transformers keeps the table shared by all layers.
    """
    cfg.validate()
    p = prefix
    embedding = _array(params["embedding"], (cfg.vocab_size, cfg.d_model), "embedding")
    state = {
        f"{p}shared.weight": embedding,
        f"{p}encoder.embed_tokens.weight": embedding,
        f"{p}encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": _array(
            params["relative_attention_bias"], (cfg.relative_attention_num_buckets, cfg.num_heads),
            "relative_attention_bias"),
    }
    layers = _stacked_layers(params["layers"], cfg)
    for i in range(cfg.num_layers):
        state.update(_layer_state(layers, cfg, i, f"{p}encoder.block.{i}."))
    state[f"{p}encoder.final_layer_norm.weight"] = _array(params["final_norm"]["scale"], (cfg.d_model,),
                                                          "final_norm/scale")
    return {key: _torch_layout(value) for key, value in state.items()}
