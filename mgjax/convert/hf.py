"""transformers `MusicgenForConditionalGeneration` / `MusicgenMelodyForConditionalGeneration` -> mgjax params."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from mgjax.config import ConfigError, MusicGenConfig
from mgjax.convert.encodec_weights import codec_config_from_hf, codec_params
from mgjax.convert.hf_lm import lm_config_from_hf, lm_params_from_hf
from mgjax.convert.hf_t5 import t5_config_from_hf, t5_params_from_hf
from mgjax.convert.io import ConversionError, matching


def musicgen_config_from_hf(config: Mapping[str, Any]) -> MusicGenConfig:
    """A transformers MusicGen(-melody) config.json dict -> validated `MusicGenConfig`."""
    for part in ("text_encoder", "audio_encoder", "decoder"):
        if not isinstance(config.get(part), Mapping):
            raise ConversionError(f"the MusicGen config.json has no '{part}' sub-config; the checkpoint is incomplete")
    try:
        return MusicGenConfig(codec=codec_config_from_hf(config["audio_encoder"]),
                              text=t5_config_from_hf(config["text_encoder"]),
                              lm=lm_config_from_hf(config)).validate()
    except ConfigError as err:
        raise ConversionError(f"unsupported MusicGen config: {err}") from None


def with_identity_text_projection(state: Mapping[str, np.ndarray], config: MusicGenConfig) -> Mapping:
    """transformers leaves out `enc_to_dec_proj` when the text width equals the decoder width (identity)."""
    if "enc_to_dec_proj.weight" in state or config.text.d_model != config.lm.dim:
        return state
    return dict(state, **{"enc_to_dec_proj.weight": np.eye(config.lm.dim, dtype=np.float32),
                          "enc_to_dec_proj.bias": np.zeros(config.lm.dim, np.float32)})


def convert_musicgen(config: Mapping[str, Any], state: Mapping[str, np.ndarray]) -> tuple[MusicGenConfig, dict]:
    """`(MusicGenConfig, {'codec': ..., 'text': ..., 'lm': ...})` from a full transformers MusicGen state dict."""
    model_config = musicgen_config_from_hf(config)
    state = with_identity_text_projection(state, model_config)
    return model_config, matching("the checkpoint does not match its config.json", _params, state, model_config)


def _params(state: Mapping[str, np.ndarray], config: MusicGenConfig) -> dict:
    return {"codec": codec_params(state, config.codec, prefix="audio_encoder."),
            "text": t5_params_from_hf(state, config.text, prefix="text_encoder."),
            "lm": lm_params_from_hf(state, config.lm)}
