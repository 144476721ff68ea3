"""transformers MusicGen / MusicGen-melody decoder -> `LMConfig` and the `MusicGenLM` param tree.

Key map (full `Musicgen[Melody]ForConditionalGeneration` state dict; torch Linear weights are `[out, in]`):

    decoder.model.decoder.embed_tokens.{k}.weight          [card+1, D]  -> embed/embedding[k]
    decoder.model.decoder.layers.{n}.self_attn.{q,k,v}_proj.weight  [D, D] -> layers/self_attn/{q,k,v}_proj[n] [D, H, Dh]
    decoder.model.decoder.layers.{n}.self_attn.out_proj.weight      [D, D] -> layers/self_attn/out_proj[n]  [H, Dh, D]
    decoder.model.decoder.layers.{n}.encoder_attn.*        (cross only)  -> layers/cross_attn/*
    decoder.model.decoder.layers.{n}.{self_attn,encoder_attn,final}_layer_norm.{weight,bias}
                                                           -> layers/{self_attn,cross_attn,ffn}_norm/{scale,bias}[n]
    decoder.model.decoder.layers.{n}.fc1.weight [F, D], fc2.weight [D, F] -> layers/ffn/fc1[n] [D, F], fc2[n] [F, D]
    decoder.model.decoder.layer_norm.{weight,bias}         -> final_norm/{scale,bias}
    decoder.lm_heads.{k}.weight                 [card, D]  -> heads/kernel[k] [D, card]
    enc_to_dec_proj.{weight,bias}               [D, Dc]    -> enc_to_dec_proj/{kernel [Dc, D], bias}
    audio_enc_to_dec_proj.{weight,bias}  (melody) [D, C]   -> audio_enc_to_dec_proj/{kernel [C, D], bias}
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from mgjax.config import ConfigError, LMConfig

DECODER = "decoder.model.decoder."
LAYER_NORMS = {"self_attn_norm": "self_attn_layer_norm", "cross_attn_norm": "encoder_attn_layer_norm",
               "ffn_norm": "final_layer_norm"}
ATTENTIONS = {"self_attn": "self_attn", "cross_attn": "encoder_attn"}


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


def _get(state_dict: Mapping[str, Any], key: str, shape: tuple[int, ...]) -> np.ndarray:
    if key not in state_dict:
        hint = ""
        if key.startswith("enc_to_dec_proj") or key.startswith("audio_enc_to_dec_proj"):
            hint = (" (transformers omits this projection when the condition width equals the decoder width;"
                    " mgjax always has one)")
        raise KeyError(f"missing key '{key}' in the MusicGen state dict{hint}")
    value = state_dict[key]
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().float().numpy()
    value = np.asarray(value, dtype=np.float32)
    if value.shape != shape:
        raise ValueError(f"'{key}' has shape {value.shape}, expected {shape} from the LMConfig")
    return value


def _linear(state_dict, key: str, out_dim: int, in_dim: int) -> np.ndarray:
    """torch Linear weight `[out, in]` -> kernel `[in, out]`."""
    return _get(state_dict, key, (out_dim, in_dim)).T


def _layer_params(state_dict, cfg: LMConfig, n: int) -> dict:
    D, H, Dh, F = cfg.dim, cfg.num_heads, cfg.head_dim, cfg.ffn_dim
    prefix = f"{DECODER}layers.{n}."
    out: dict = {}
    attentions = ATTENTIONS if cfg.conditioning == "cross" else {"self_attn": "self_attn"}
    for ours, theirs in attentions.items():
        p = f"{prefix}{theirs}."
        out[ours] = {f"{x}_proj": _linear(state_dict, f"{p}{x}_proj.weight", D, D).reshape(D, H, Dh)
                     for x in "qkv"}
        out[ours]["out_proj"] = _linear(state_dict, f"{p}out_proj.weight", D, D).reshape(H, Dh, D)
    for ours, theirs in LAYER_NORMS.items():
        if ours == "cross_attn_norm" and cfg.conditioning != "cross":
            continue
        out[ours] = {"scale": _get(state_dict, f"{prefix}{theirs}.weight", (D,)),
                     "bias": _get(state_dict, f"{prefix}{theirs}.bias", (D,))}
    out["ffn"] = {"fc1": _linear(state_dict, f"{prefix}fc1.weight", F, D),
                  "fc2": _linear(state_dict, f"{prefix}fc2.weight", D, F)}
    return out


def _projection(state_dict, name: str, dim: int) -> dict:
    if f"{name}.weight" not in state_dict:
        _get(state_dict, f"{name}.weight", ())  # raises, naming the key
    in_dim = np.shape(state_dict[f"{name}.weight"])[1]
    return {"kernel": _linear(state_dict, f"{name}.weight", dim, in_dim),
            "bias": _get(state_dict, f"{name}.bias", (dim,))}


def _stack(trees: list[dict]) -> dict:
    """Per-layer trees -> one tree with the layers on a leading axis."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: _stack([t[k] for t in trees]) for k in first}
    return np.stack(trees)


def lm_params_from_hf(state_dict: Mapping[str, Any], cfg: LMConfig) -> dict:
    """Full-model state dict (numpy arrays or torch tensors) -> `MusicGenLM(cfg)` params (float32 numpy).

    Same structure as `flax.linen.meta.unbox(MusicGenLM(cfg).init(...)['params'])`. A missing key raises a
    `KeyError` naming it; a shape that disagrees with `cfg` raises a `ValueError`.
    """
    D, K, card = cfg.dim, cfg.num_codebooks, cfg.card
    params = {
        "embed": {"embedding": np.stack([_get(state_dict, f"{DECODER}embed_tokens.{k}.weight", (card + 1, D))
                                         for k in range(K)])},
        "enc_to_dec_proj": _projection(state_dict, "enc_to_dec_proj", D),
        "layers": _stack([_layer_params(state_dict, cfg, n) for n in range(cfg.num_layers)]),
        "final_norm": {"scale": _get(state_dict, f"{DECODER}layer_norm.weight", (D,)),
                       "bias": _get(state_dict, f"{DECODER}layer_norm.bias", (D,))},
        "heads": {"kernel": np.stack([_linear(state_dict, f"decoder.lm_heads.{k}.weight", card, D)
                                      for k in range(K)])},
    }
    if cfg.conditioning == "prepend":
        proj = _projection(state_dict, "audio_enc_to_dec_proj", D)
        if proj["kernel"].shape[0] != cfg.num_chroma:
            raise ValueError(f"audio_enc_to_dec_proj takes {proj['kernel'].shape[0]} chroma bins, "
                             f"LMConfig.num_chroma={cfg.num_chroma}")
        params["audio_enc_to_dec_proj"] = proj
    return params
