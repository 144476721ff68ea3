"""audiocraft MusicGen directories (`state_dict.bin` + `compression_state_dict.bin`) -> mgjax checkpoints.

Both files are `torch.save` packages `{'best_state': state dict (or {'model': state dict}), 'xp.cfg': the hydra
config (a YAML string in released exports, or a dict), ...}`: `state_dict.bin` holds the LM and the condition
projections, `compression_state_dict.bin` the EnCodec. The T5 weights are not in them (audiocraft downloads
`conditioners.description.t5.name` at load time), so a transformers T5 directory is needed (`t5_dir`, CLI `--t5`).
The hyperparameters are read from `xp.cfg`; settings this port does not implement are refused by name.

LM key map (audiocraft -> transformers keys, then `hf_lm.lm_params_from_hf` does the rest; `L` = transformer.layers.n):
    emb.{k}.weight                               [card+1, D] -> decoder.model.decoder.embed_tokens.{k}.weight
    L.self_attn[.mha].in_proj_weight             [3D, D]     -> L.self_attn.{q,k,v}_proj.weight (rows q; k; v)
    L.self_attn[.mha].out_proj.weight            [D, D]      -> L.self_attn.out_proj.weight
    L.cross_attention.{in_proj_weight, out_proj.weight}      -> L.encoder_attn.*   (text models)
    L.{norm1, norm_cross, norm2}.{weight, bias}  [D]         -> L.{self_attn, encoder_attn, final}_layer_norm.*
    L.linear1.weight [F, D], L.linear2.weight [D, F]         -> L.fc1.weight, L.fc2.weight
    out_norm.{weight, bias}                                  -> decoder.model.decoder.layer_norm.*
    linears.{k}.weight                           [card, D]   -> decoder.lm_heads.{k}.weight
    condition_provider.conditioners.description.output_proj.* [D, 768] -> enc_to_dec_proj.*
    condition_provider.conditioners.self_wav.output_proj.*    [D, 12]  -> audio_enc_to_dec_proj.*   (melody)
Codec keys (`encoder.model.{i}.conv.conv.weight_g/_v`, `quantizer.vq.layers.{q}._codebook.embed`, ...) are read by
`encodec_weights.codec_params` with its AUDIOCRAFT key style.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

from mgjax import checkpoint
from mgjax.conditioning.fuser import takes_melody
from mgjax.config import ConfigError, MusicGenConfig, to_dict
from mgjax.convert.audiocraft_config import (cfg_get, codec_config_from_audiocraft, lm_config_from_audiocraft,
                                             parse_xp_cfg)
from mgjax.convert.encodec_weights import AUDIOCRAFT, codec_params
from mgjax.convert.hf_lm import DECODER, lm_params_from_hf
from mgjax.convert.hf_t5 import t5_config_from_hf, t5_params_from_hf
from mgjax.convert.io import (ConversionError, UnsafePickleError, load_torch_file, load_transformers_state_dict,
                              matching, read_json, tokenizer_files)

LM_FILE = "state_dict.bin"
CODEC_FILE = "compression_state_dict.bin"


# --- packages and configs ---------------------------------------------------------------------------------------

def read_package(path: str) -> tuple[dict, dict]:
    """One audiocraft package -> `(state dict of torch tensors, xp.cfg as a plain dict)`."""
    try:
        package = load_torch_file(path)
    except UnsafePickleError as err:
        if "omegaconf" in str(err):  # the config audiocraft's training checkpoints pickle
            raise UnsafePickleError(f"{path} stores xp.cfg as a pickled omegaconf object; mgjax reads tensors and "
                                    f"plain values only, because unpickling objects can run any code. Where you "
                                    f"trust the file, re-save it with pkg['xp.cfg'] = OmegaConf.to_yaml(pkg['xp.cfg']) "
                                    f"(audiocraft's exported checkpoints already store it so)") from None
        raise
    if not isinstance(package, Mapping):
        raise ConversionError(f"{path} holds a {type(package).__name__}, not an audiocraft package "
                              f"(a dict with 'best_state' and 'xp.cfg')")
    if "pretrained" in package and "best_state" not in package:
        raise ConversionError(f"{path} only names the pretrained codec {package['pretrained']!r} instead of holding "
                              f"its weights; this converter cannot download it. Convert the transformers release of "
                              f"the same MusicGen instead, or export the codec weights into {CODEC_FILE}")
    missing = [key for key in ("best_state", "xp.cfg") if key not in package]
    if missing:
        raise ConversionError(f"{path} is not an audiocraft package: it has no {' or '.join(map(repr, missing))} "
                              f"(keys: {', '.join(map(str, list(package)[:8]))})")
    state = package["best_state"]
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]  # training checkpoints nest the weights one level deeper
    if not isinstance(state, Mapping) or not state:
        raise ConversionError(f"{path}: 'best_state' holds no state dict")
    return dict(state), parse_xp_cfg(package["xp.cfg"], path)


# --- weights ------------------------------------------------------------------------------------------------------

_LAYER_RENAMES = {"norm1": "self_attn_layer_norm", "norm_cross": "encoder_attn_layer_norm",
                  "norm2": "final_layer_norm", "linear1": "fc1", "linear2": "fc2"}
_ATTENTIONS = {"self_attn": "self_attn", "cross_attention": "encoder_attn"}
_PROJECTIONS = {"condition_provider.conditioners.description.output_proj": "enc_to_dec_proj",
                "condition_provider.conditioners.self_wav.output_proj": "audio_enc_to_dec_proj"}
_IGNORED = ("condition_provider.conditioners.self_wav.chroma.",)  # chroma filterbank / STFT window buffers
_LAYER_KEY = re.compile(r"transformer\.layers\.(\d+)\.(.+)")
_INDEXED_KEY = re.compile(r"(emb|linears)\.(\d+)\.weight")


def _rename_layer_key(n: str, rest: str, value: Any, out: dict) -> bool:
    """One `transformer.layers.{n}.{rest}` tensor into `out` under transformers keys; False if unknown."""
    prefix = f"{DECODER}layers.{n}."
    head, _, tail = rest.partition(".")
    if head in _LAYER_RENAMES and tail in ("weight", "bias"):
        out[f"{prefix}{_LAYER_RENAMES[head]}.{tail}"] = value
        return True
    if head not in _ATTENTIONS:
        return False
    theirs = f"{prefix}{_ATTENTIONS[head]}."
    tail = tail[len("mha."):] if tail.startswith("mha.") else tail  # torch nn.MultiheadAttention (custom=False)
    if tail == "in_proj_weight":
        if value.ndim != 2 or value.shape[0] % 3:
            raise ConversionError(f"transformer.layers.{n}.{rest} has shape {tuple(value.shape)}, expected "
                                  f"[3 * dim, dim] (packed q, k, v)")
        for i, name in enumerate("qkv"):
            rows = value.shape[0] // 3
            out[f"{theirs}{name}_proj.weight"] = value[i * rows:(i + 1) * rows]
        return True
    if tail == "out_proj.weight":
        out[f"{theirs}out_proj.weight"] = value
        return True
    return False


def lm_state_to_transformers(state: Mapping[str, Any]) -> dict:
    """audiocraft LM state dict -> the transformers MusicGen key layout (values untouched, q/k/v split as views).

    Raises `ConversionError` naming the first tensor it does not know (a bias, LayerScale, ...): such a checkpoint
    does not match the settings this port implements.
    """
    out: dict = {}
    for key, value in state.items():
        if key.startswith(_IGNORED):
            continue
        if (m := _INDEXED_KEY.fullmatch(key)):
            out[f"{DECODER}embed_tokens.{m[2]}.weight" if m[1] == "emb" else f"decoder.lm_heads.{m[2]}.weight"] = value
            continue
        if key.startswith("out_norm.") and key[len("out_norm."):] in ("weight", "bias"):
            out[f"{DECODER}layer_norm.{key[len('out_norm.'):]}"] = value
            continue
        module, _, param = key.rpartition(".")
        if module in _PROJECTIONS and param in ("weight", "bias"):
            out[f"{_PROJECTIONS[module]}.{param}"] = value
            continue
        m = _LAYER_KEY.fullmatch(key)
        if m and _rename_layer_key(m[1], m[2], value, out):
            continue
        raise ConversionError(f"unexpected tensor '{key}' in {LM_FILE}: the weights do not match the supported "
                              f"MusicGen layout (no biases, no LayerScale) or their xp.cfg")
    return out


# --- T5 -----------------------------------------------------------------------------------------------------------

def load_t5(t5_dir: str, width: int, name: str) -> tuple[Any, dict, dict]:
    """`(T5Config, params, tokenizer files)` from a transformers T5 (or MusicGen) directory; `width` is the input
    width of the checkpoint's text projection, which the T5 must produce."""
    config_path = os.path.join(t5_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ConversionError(f"--t5 {t5_dir} is not a transformers T5 directory (no config.json); it must hold "
                              f"the {name!r} text encoder (config.json + weights)")
    config = read_json(config_path)
    prefix = ""
    if str(config.get("model_type", "")).startswith("musicgen"):  # a transformers MusicGen: its text_encoder
        config, prefix = config.get("text_encoder") or {}, "text_encoder."
    try:
        t5_config = t5_config_from_hf(config)
    except ConfigError as err:
        raise ConversionError(f"--t5 {t5_dir}: {err}") from None
    if t5_config.d_model != width:
        raise ConversionError(f"--t5 {t5_dir} has d_model={t5_config.d_model} but the checkpoint's text projection "
                              f"expects {width} ({name!r}); pass the matching T5")
    params = matching(f"the T5 weights in {t5_dir} do not match their config.json", t5_params_from_hf,
                      load_transformers_state_dict(t5_dir), t5_config, prefix)
    return t5_config, params, tokenizer_files(t5_dir)


# --- entry point --------------------------------------------------------------------------------------------------

def convert_audiocraft(src_dir: str, dst_dir: str, *, t5_dir: str | None = None, overwrite: bool = False) -> str:
    """Converts an audiocraft MusicGen(-melody) directory into an mgjax checkpoint at `dst_dir` (atomically).

    `t5_dir`: a transformers T5 directory (config.json + weights, tokenizer files copied when present).
    Returns the checkpoint's absolute path; every failure is a `ConversionError` and leaves no output behind.
    """
    for name in (LM_FILE, CODEC_FILE):
        if not os.path.isfile(os.path.join(src_dir, name)):
            raise ConversionError(f"{src_dir} has no {name}; an audiocraft MusicGen directory holds both {LM_FILE} "
                                  f"(the LM) and {CODEC_FILE} (the EnCodec)")
    if t5_dir is None:
        raise ConversionError("audiocraft checkpoints do not include the T5 text encoder: pass a transformers T5 "
                              "directory (e.g. t5-base saved with save_pretrained) with --t5 DIR (t5_dir=...)")
    lm_state, lm_cfg = read_package(os.path.join(src_dir, LM_FILE))
    codec_state, codec_cfg = read_package(os.path.join(src_dir, CODEC_FILE))
    lm_config = lm_config_from_audiocraft(lm_cfg)
    codec_config = codec_config_from_audiocraft(codec_cfg, lm_config.num_codebooks // lm_config.audio_channels)
    if codec_config.sample_rate != int(cfg_get(lm_cfg, "sample_rate", codec_config.sample_rate)):
        raise ConversionError(f"the LM was trained at sample_rate={cfg_get(lm_cfg, 'sample_rate')} but the codec "
                              f"runs at {codec_config.sample_rate}")

    hf_state = lm_state_to_transformers(lm_state)
    proj = hf_state.get("enc_to_dec_proj.weight")
    if proj is None:
        raise ConversionError(f"{LM_FILE} has no condition_provider.conditioners.description.output_proj.weight "
                              f"(the text projection)")
    t5_name = str(cfg_get(lm_cfg, "conditioners.description.t5.name", "t5-base"))
    text_config, text_params, tokenizer = load_t5(t5_dir, int(proj.shape[1]), t5_name)
    try:
        model_config = MusicGenConfig(codec=codec_config, text=text_config, lm=lm_config).validate()
    except ConfigError as err:
        raise ConversionError(f"the LM and codec configs disagree: {err}") from None
    params = {"codec": matching(f"the weights in {CODEC_FILE} do not match their xp.cfg", codec_params, codec_state,
                                codec_config, AUDIOCRAFT),
              "text": text_params,
              "lm": matching(f"the weights in {LM_FILE} do not match their xp.cfg", lm_params_from_hf, hf_state,
                             lm_config)}
    kind = "musicgen_melody" if takes_melody(lm_config) else "musicgen"
    return checkpoint.save(dst_dir, "musicgen", to_dict(model_config), params, source=f"audiocraft:{kind}",
                           tokenizer_files=tokenizer, overwrite=overwrite)
