"""transformers MusicGen / MusicGen-melody decoder <-> `LMConfig` and the `MusicGenLM` param tree.

The weight map is `lm_entries` (torch Linear weights `[out, in]` become kernels `[in, out]`, attention projections
split into heads, layers stacked on the leading axis); `lm_params_from_hf` and `lm_state_from_params` both read it.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from mgjax.conditioning.fuser import fuser_for
from mgjax.config import ConfigError, LMConfig
from mgjax.convert.maps import LINEAR, Entry, linear, to_params, to_state

DECODER = "decoder.model.decoder."


def is_melody_config(musicgen_config: Mapping[str, Any]) -> bool:
    return musicgen_config.get("model_type") == "musicgen_melody" or "num_chroma" in musicgen_config


def lm_config_from_hf(musicgen_config: Mapping[str, Any]) -> LMConfig:
    """A transformers MusicGen(-melody) `config.json` dict (or its `decoder` sub-dict alone) -> `LMConfig`."""
    top = musicgen_config
    dec = top.get("decoder", top)
    melody = is_melody_config(top)
    card = int(dec.get("vocab_size", 2048))
    activation = dec.get("activation_function", "gelu")
    if activation != "gelu":
        raise ConfigError(f"decoder.activation_function={activation!r}: only 'gelu' (exact erf GELU) is supported")
    for name in ("pad_token_id", "bos_token_id"):
        token = dec.get(name, card)
        if token is not None and token != card:
            raise ConfigError(f"decoder.{name}={token}: mgjax uses token id card={card} as the special token")
    num_codebooks = int(dec.get("num_codebooks", 4))
    audio_channels = int(dec.get("audio_channels", 1))  # 2: left/right codebooks interleaved, each pair one delay
    extra = {}
    if melody:
        extra = dict(num_chroma=int(top.get("num_chroma", 12)), chroma_length=int(top.get("chroma_length", 235)))
    cfg = LMConfig(
        dim=int(dec.get("hidden_size", 1024)),
        num_layers=int(dec.get("num_hidden_layers", 24)),
        num_heads=int(dec.get("num_attention_heads", 16)),
        ffn_dim=int(dec.get("ffn_dim", 4096)),
        num_codebooks=num_codebooks,
        card=card,
        pattern="delay",
        audio_channels=audio_channels,
        conditioning="prepend" if melody else "cross",
        layer_norm_eps=1e-5,  # transformers builds nn.LayerNorm with its default eps
        **extra,
    )
    cfg.validate()
    return cfg


def _layer_norm(ours: str, theirs: str, dim: int, stack: int = 0) -> list[Entry]:
    return [Entry(f"{ours}/scale", f"{theirs}.weight", shape=(dim,), stack=stack),
            Entry(f"{ours}/bias", f"{theirs}.bias", shape=(dim,), stack=stack)]


def _projection(name: str, in_dim: int | None, dim: int) -> list[Entry]:
    return [Entry(f"{name}/kernel", f"{name}.weight", LINEAR, (in_dim, dim)),
            Entry(f"{name}/bias", f"{name}.bias", shape=(dim,))]


def lm_entries(cfg: LMConfig, *, text_projection: bool = True) -> list[Entry]:
    """The decoder's weight map over a full `Musicgen[Melody]ForConditionalGeneration` state dict.

    `text_projection=False` leaves out `enc_to_dec_proj` (transformers has none when the text and decoder widths
    are equal); its input width is whatever the checkpoint holds. The condition projections and whether the layers
    cross-attend come from the condition fuser (`mgjax.conditioning.fuser`), under the same names in both trees.
    """
    fuser = fuser_for(cfg)
    D, H, Dh, F, L, K = cfg.dim, cfg.num_heads, cfg.head_dim, cfg.ffn_dim, cfg.num_layers, cfg.num_codebooks
    layer = f"{DECODER}layers.{{i}}."
    entries = [Entry("embed/embedding", f"{DECODER}embed_tokens.{{i}}.weight", shape=(cfg.card + 1, D), stack=K),
               Entry("heads/kernel", "decoder.lm_heads.{i}.weight", LINEAR, (D, cfg.card), K),
               *_layer_norm("final_norm", f"{DECODER}layer_norm", D),
               *_layer_norm("layers/self_attn_norm", f"{layer}self_attn_layer_norm", D, L),
               *_layer_norm("layers/ffn_norm", f"{layer}final_layer_norm", D, L),
               Entry("layers/ffn/fc1", f"{layer}fc1.weight", LINEAR, (D, F), L),
               Entry("layers/ffn/fc2", f"{layer}fc2.weight", LINEAR, (F, D), L)]
    attentions = {"self_attn": "self_attn"}
    if fuser.cross_attention:
        attentions["cross_attn"] = "encoder_attn"
        entries += _layer_norm("layers/cross_attn_norm", f"{layer}encoder_attn_layer_norm", D, L)
    for ours, theirs in attentions.items():
        entries += [Entry(f"layers/{ours}/{x}_proj", f"{layer}{theirs}.{x}_proj.weight", LINEAR, (D, H, Dh), L)
                    for x in "qkv"]
        entries.append(Entry(f"layers/{ours}/out_proj", f"{layer}{theirs}.out_proj.weight", linear(2), (H, Dh, D), L))
    for name, in_dim in fuser.projections(cfg).items():
        if text_projection or name != "enc_to_dec_proj":
            entries += _projection(name, in_dim, D)
    return entries


def lm_params_from_hf(state_dict: Mapping[str, Any], cfg: LMConfig) -> dict:
    """Full-model state dict (numpy arrays or torch tensors) -> `MusicGenLM(cfg)` params (float32 numpy).

    Same structure as `flax.linen.meta.unbox(MusicGenLM(cfg).init(...)['params'])`. A missing key raises a
    `KeyError` naming it; a shape that disagrees with `cfg` raises a `ValueError`.
    """
    return to_params(lm_entries(cfg), state_dict)


def lm_state_from_params(params: Mapping[str, Any], cfg: LMConfig, *, with_text_projection: bool = True
                         ) -> dict[str, np.ndarray]:
    """`MusicGenLM(cfg)` params -> the decoder part of a transformers MusicGen state dict (the inverse of
    `lm_params_from_hf`). `with_text_projection=False` leaves out `enc_to_dec_proj` (equal widths)."""
    return to_state(lm_entries(cfg, text_projection=with_text_projection), params)
