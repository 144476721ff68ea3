"""`T5Config` and the `mgjax.text.t5.T5Encoder` param tree -> transformers T5 (encoder) config kwargs and weights.

The inverse of `mgjax.convert.hf_t5`; the weights go back through its weight map (`t5_state_from_params`).
"""
from __future__ import annotations

from typing import Any

from mgjax.config import T5Config
from mgjax.convert.hf_t5 import t5_state_from_params

__all__ = ["t5_config_to_hf", "t5_state_from_params"]


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
