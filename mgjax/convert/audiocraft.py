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

import numpy as np
import yaml

from mgjax import checkpoint
from mgjax.config import CodecConfig, ConfigError, LMConfig, MusicGenConfig, to_dict
from mgjax.convert.encodec_weights import AUDIOCRAFT, codec_params
from mgjax.convert.hf_lm import DECODER, lm_params_from_hf
from mgjax.convert.hf_t5 import t5_config_from_hf, t5_params_from_hf
from mgjax.convert.io import ConversionError, load_torch_file, load_transformers_state_dict

LM_FILE = "state_dict.bin"
CODEC_FILE = "compression_state_dict.bin"
_REQUIRED = object()
_INTERPOLATION = re.compile(r"\$\{([^${}]+)\}")


# --- packages and configs ---------------------------------------------------------------------------------------

def read_package(path: str) -> tuple[dict, dict]:
    """One audiocraft package -> `(state dict of torch tensors, xp.cfg as a plain dict)`."""
    try:
        package = load_torch_file(path)
    except ConversionError as err:
        if "omegaconf" in str(err):
            raise ConversionError(f"{path} stores xp.cfg as an omegaconf object, which needs omegaconf to read: "
                                  f"pip install omegaconf (or re-save it with pkg['xp.cfg'] = "
                                  f"OmegaConf.to_yaml(pkg['xp.cfg']))") from None
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


def parse_xp_cfg(raw: Any, path: str) -> dict:
    """`xp.cfg` as stored (YAML string, dict, or omegaconf object when omegaconf is installed) -> plain dict."""
    if type(raw).__module__.split(".")[0] == "omegaconf":
        try:
            from omegaconf import OmegaConf
        except ImportError:
            raise ConversionError(f"{path}: xp.cfg is an omegaconf {type(raw).__name__}; pip install omegaconf to "
                                  f"read it") from None
        raw = OmegaConf.to_container(raw, resolve=True)
    if isinstance(raw, (str, bytes)):
        try:
            raw = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConversionError(f"{path}: xp.cfg is not valid YAML ({err})") from None
    if not isinstance(raw, Mapping):
        raise ConversionError(f"{path}: xp.cfg must be a mapping (YAML string or dict), got {type(raw).__name__}")
    return dict(raw)


def _lookup(root: Mapping, dotted: str):
    node: Any = root
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _REQUIRED
        node = node[part]
    return node


def _resolve(root: Mapping, value: Any, where: str, depth: int = 0) -> Any:
    """Resolves omegaconf-style absolute interpolations (`${sample_rate}`) inside `value`, recursively."""
    if depth > 20:
        raise ConversionError(f"xp.cfg: interpolation loop while resolving '{where}'")
    if isinstance(value, Mapping):
        return {k: _resolve(root, v, f"{where}.{k}", depth) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_resolve(root, v, where, depth) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value

    def target(match: re.Match) -> Any:
        ref = match.group(1).strip()
        found = _REQUIRED if (":" in ref or ref.startswith(".")) else _lookup(root, ref)
        if found is _REQUIRED:
            raise ConversionError(f"xp.cfg: cannot resolve the interpolation ${{{ref}}} in '{where}'")
        return _resolve(root, found, ref, depth + 1)

    whole = _INTERPOLATION.fullmatch(value)
    if whole:
        return target(whole)
    return _INTERPOLATION.sub(lambda m: str(target(m)), value)


def cfg_get(cfg: Mapping, dotted: str, default: Any = _REQUIRED) -> Any:
    """`cfg['a']['b']` for 'a.b' with interpolations resolved; a missing key without default names the key."""
    value = _lookup(cfg, dotted)
    if value is _REQUIRED:
        if default is _REQUIRED:
            raise ConversionError(f"xp.cfg has no '{dotted}'; the checkpoint is incomplete or not a MusicGen")
        return default
    return _resolve(cfg, value, dotted)


def _expect(cfg: Mapping, dotted: str, allowed: tuple, default: Any, why: str) -> Any:
    value = cfg_get(cfg, dotted, default)
    if value not in allowed:
        raise ConversionError(f"unsupported audiocraft setting {dotted}={value!r}: {why}")
    return value


# --- LM config ----------------------------------------------------------------------------------------------------

def _conditioning(cfg: Mapping) -> str:
    """'cross' (text via cross-attention) or 'prepend' (melody: chroma + text prepended), from the fuser."""
    conditioners = cfg_get(cfg, "conditioners", {}) or {}
    known = {"description": "t5", "self_wav": "chroma_stem"}
    for name, sub in conditioners.items():
        if name == "args":
            continue
        model = sub.get("model") if isinstance(sub, Mapping) else None
        if known.get(name) != model:
            raise ConversionError(f"unsupported audiocraft conditioner conditioners.{name} (model {model!r}); "
                                  f"supported: description (t5) and, for melody models, self_wav (chroma_stem)")
    if "description" not in conditioners:
        raise ConversionError("xp.cfg has no conditioners.description (T5 text conditioner); only text(+melody) "
                              "MusicGen models are supported")
    if cfg_get(cfg, "conditioners.description.t5.normalize_text", False):
        raise ConversionError("unsupported audiocraft setting conditioners.description.t5.normalize_text=True "
                              "(mgjax does not normalise prompts)")
    fuse = {m: sorted(cfg_get(cfg, f"fuser.{m}", []) or []) for m in ("cross", "prepend", "sum", "input_interpolate")}
    if cfg_get(cfg, "fuser.cross_attention_pos_emb", False):
        raise ConversionError("unsupported audiocraft setting fuser.cross_attention_pos_emb=True")
    if fuse == {"cross": ["description"], "prepend": [], "sum": [], "input_interpolate": []} \
            and "self_wav" not in conditioners:
        return "cross"
    if fuse == {"cross": [], "prepend": ["description", "self_wav"], "sum": [], "input_interpolate": []}:
        return "prepend"
    raise ConversionError(f"unsupported audiocraft fuser {fuse}: supported are cross=[description] (text models) "
                          f"and prepend=[self_wav, description] (melody models)")


def _chroma_settings(cfg: Mapping) -> dict:
    """num_chroma and chroma_length (frames of chroma over the training segment) of a melody model."""
    stem = "conditioners.self_wav.chroma_stem"
    n_fft = cfg_get(cfg, f"{stem}.nfft", None) or 2 ** int(cfg_get(cfg, f"{stem}.radix2_exp", 12))
    hop = cfg_get(cfg, f"{stem}.winhop", None) or (cfg_get(cfg, f"{stem}.winlen", None) or n_fft) // 4
    samples = int(float(cfg_get(cfg, "sample_rate")) * float(cfg_get(cfg, "dataset.segment_duration")))
    return dict(num_chroma=int(cfg_get(cfg, f"{stem}.n_chroma", 12)), chroma_length=1 + samples // int(hop))


def _unless(values, default) -> tuple[int, ...]:
    """`values` as a tuple of ints, or () when absent or equal to the pattern's `default`."""
    values = tuple(int(v) for v in values) if values is not None else ()
    return () if values == tuple(default) else values


def _pattern(cfg: Mapping, n_q: int) -> dict:
    """`LMConfig` pattern fields from `codebooks_pattern` (only the sub-config of the chosen pattern counts)."""
    name = cfg_get(cfg, "codebooks_pattern.modeling", None) or cfg_get(cfg, "transformer_lm.q_modeling", None)
    if name is None:
        raise ConversionError("xp.cfg sets neither codebooks_pattern.modeling nor transformer_lm.q_modeling")
    sub = cfg_get(cfg, f"codebooks_pattern.{name}", None) or {}
    # sequences equal to the pattern's default are stored empty, as the transformers converter does
    if name == "delay":
        if sub.get("flatten_first", 0) or sub.get("empty_initial", 0):
            raise ConversionError("unsupported audiocraft setting codebooks_pattern.delay.flatten_first/"
                                  "empty_initial != 0")
        return dict(pattern="delay", pattern_delays=_unless(sub.get("delays"), range(n_q)))
    if name == "parallel":
        if sub.get("empty_initial", 0):
            raise ConversionError("unsupported audiocraft setting codebooks_pattern.parallel.empty_initial != 0")
        return dict(pattern="parallel")
    if name == "unroll":
        return dict(pattern="unroll", pattern_flattening=_unless(sub.get("flattening"), range(n_q)),
                    pattern_delays=_unless(sub.get("delays"), [0] * n_q))
    if name == "coarse_first":
        return dict(pattern="coarse_first", pattern_delays=_unless(sub.get("delays"), [0] * (n_q - 1)))
    if name == "musiclm":
        return dict(pattern="musiclm", pattern_group_size=int(sub.get("group_by", 2)))
    raise ConversionError(f"unsupported audiocraft setting codebooks_pattern.modeling={name!r}")


def lm_config_from_audiocraft(cfg: Mapping) -> LMConfig:
    """The LM package's xp.cfg -> `LMConfig`; refuses settings mgjax's decoder does not implement, by name."""
    lm = "transformer_lm"
    _expect(cfg, "lm_model", ("transformer_lm",), "transformer_lm", "only MusicGen's transformer_lm is supported")
    if int(cfg_get(cfg, "channels", 1)) != 1 or cfg_get(cfg, "interleave_stereo_codebooks.use", False):
        raise ConversionError("unsupported audiocraft setting channels=2 / interleave_stereo_codebooks: stereo "
                              "MusicGen checkpoints are not supported")
    _expect(cfg, f"{lm}.norm_first", (True,), False, "mgjax implements the pre-norm transformer (norm_first=True)")
    for name in ("bias_attn", "bias_ff", "bias_proj"):
        _expect(cfg, f"{lm}.{name}", (False,), True, "mgjax's attention, feed-forward and output layers have no "
                                                     "biases")
    _expect(cfg, f"{lm}.positional_embedding", ("sin",), "sin", "only sinusoidal positions are implemented")
    _expect(cfg, f"{lm}.max_period", (10000,), 10000, "sinusoidal positions use max_period 10000")
    _expect(cfg, f"{lm}.positional_scale", (1,), 1, "sinusoidal positions are added unscaled")
    _expect(cfg, f"{lm}.activation", ("gelu",), "gelu", "the feed-forward uses exact GELU")
    _expect(cfg, f"{lm}.norm", ("layer_norm",), "layer_norm", "the transformer uses LayerNorm")
    _expect(cfg, f"{lm}.layer_scale", (None,), None, "LayerScale is not implemented")
    _expect(cfg, f"{lm}.qk_layer_norm", (False,), False, "query/key LayerNorm is not implemented")
    _expect(cfg, f"{lm}.qk_layer_norm_cross", (False,), False, "query/key LayerNorm is not implemented")
    _expect(cfg, f"{lm}.kv_repeat", (1,), 1, "grouped key/value heads are not implemented")
    _expect(cfg, f"{lm}.causal", (True,), True, "the decoder is causal")
    _expect(cfg, f"{lm}.past_context", (None,), None, "windowed attention is not implemented")
    conditioning = _conditioning(cfg)
    if conditioning == "prepend" and cfg_get(cfg, f"{lm}.cross_attention", False):
        raise ConversionError("unsupported audiocraft setting transformer_lm.cross_attention=True with a "
                              "prepend-only fuser")
    dim, n_q = int(cfg_get(cfg, f"{lm}.dim")), int(cfg_get(cfg, f"{lm}.n_q"))
    extra = _chroma_settings(cfg) if conditioning == "prepend" else {}
    try:
        config = LMConfig(dim=dim, num_layers=int(cfg_get(cfg, f"{lm}.num_layers")),
                          num_heads=int(cfg_get(cfg, f"{lm}.num_heads")),
                          ffn_dim=int(float(cfg_get(cfg, f"{lm}.hidden_scale", 4)) * dim), num_codebooks=n_q,
                          card=int(cfg_get(cfg, f"{lm}.card")), conditioning=conditioning, layer_norm_eps=1e-5,
                          **_pattern(cfg, n_q), **extra)
        config.validate()
        from mgjax.lm.patterns import pattern_from_config
        pattern_from_config(config)
    except (ConfigError, ValueError) as err:
        raise ConversionError(f"unsupported audiocraft LM config: {err}") from None
    return config


# --- codec config -------------------------------------------------------------------------------------------------

def _seanet(cfg: Mapping, part: str) -> dict:
    """SEANet kwargs of `part` ('encoder' or 'decoder'): the shared `seanet.*` keys overridden by `seanet.{part}`."""
    shared = dict(cfg_get(cfg, "seanet"))
    overrides = {"encoder": shared.pop("encoder", None) or {}, "decoder": shared.pop("decoder", None) or {}}
    return {**shared, **overrides[part]}


def codec_config_from_audiocraft(cfg: Mapping, n_q: int) -> CodecConfig:
    """The codec package's xp.cfg -> `CodecConfig` using the first `n_q` codebooks (the LM's count)."""
    if cfg_get(cfg, "compression_model") != "encodec":
        raise ConversionError(f"unsupported audiocraft setting compression_model={cfg_get(cfg, 'compression_model')!r}"
                              f": only EnCodec codecs are supported")
    _expect(cfg, "encodec.autoencoder", ("seanet",), "seanet", "only the SEANet autoencoder is supported")
    _expect(cfg, "encodec.quantizer", ("rvq",), "rvq", "only residual vector quantization is supported")
    if cfg_get(cfg, "encodec.renormalize", False) or cfg_get(cfg, "encodec.renorm", False):
        raise ConversionError("unsupported audiocraft setting encodec.renormalize=True")
    enc, dec = _seanet(cfg, "encoder"), _seanet(cfg, "decoder")
    keys = ("dimension", "n_filters", "n_residual_layers", "ratios", "kernel_size", "last_kernel_size",
            "residual_kernel_size", "dilation_base", "causal", "pad_mode", "true_skip", "compress", "lstm",
            "activation", "activation_params", "norm", "channels")
    differing = [k for k in keys if enc.get(k) != dec.get(k)]
    if differing:
        raise ConversionError(f"unsupported audiocraft codec: seanet.encoder and seanet.decoder differ in "
                              f"{', '.join(differing)}")
    if enc.get("activation", "ELU") != "ELU" or float((enc.get("activation_params") or {}).get("alpha", 1)) != 1:
        raise ConversionError(f"unsupported audiocraft setting seanet.activation={enc.get('activation')!r} "
                              f"{enc.get('activation_params')}: only ELU(alpha=1)")
    if enc.get("norm", "none") not in ("weight_norm", "none"):
        raise ConversionError(f"unsupported audiocraft setting seanet.norm={enc['norm']!r} (weight_norm or none)")
    if dec.get("final_activation"):
        raise ConversionError(f"unsupported audiocraft setting seanet.decoder.final_activation="
                              f"{dec['final_activation']!r}")
    bins, max_q = int(cfg_get(cfg, "rvq.bins")), int(cfg_get(cfg, "rvq.n_q"))
    if max_q < n_q:
        raise ConversionError(f"the codec has rvq.n_q={max_q} codebooks but the LM models {n_q}")
    channels = int(cfg_get(cfg, "encodec.channels", enc.get("channels", cfg_get(cfg, "channels", 1))))
    try:
        config = CodecConfig(
            sample_rate=int(cfg_get(cfg, "encodec.sample_rate", cfg_get(cfg, "sample_rate", 32000))),
            channels=channels, dimension=int(enc["dimension"]), n_filters=int(enc["n_filters"]),
            ratios=tuple(int(r) for r in enc["ratios"]), n_residual_layers=int(enc.get("n_residual_layers", 3)),
            residual_kernel_size=int(enc.get("residual_kernel_size", 3)),
            dilation_base=int(enc.get("dilation_base", 2)), kernel_size=int(enc.get("kernel_size", 7)),
            last_kernel_size=int(enc.get("last_kernel_size", 7)), compress=int(enc.get("compress", 2)),
            lstm_layers=int(enc.get("lstm", 0)), causal=bool(enc.get("causal", False)),
            pad_mode=str(enc.get("pad_mode", "reflect")), true_skip=bool(enc.get("true_skip", True)),
            trim_right_ratio=float(dec.get("trim_right_ratio", 1.0)), n_q=n_q, codebook_size=bins,
            codebook_dim=0, normalize=False)
        config.validate()
    except KeyError as err:
        raise ConversionError(f"xp.cfg has no 'seanet.{err.args[0]}'; the codec config is incomplete") from None
    except (ConfigError, ValueError, TypeError) as err:
        raise ConversionError(f"unsupported audiocraft codec config: {err}") from None
    return config


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


def _float32(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor (fp16 / bf16 have no direct numpy route)
        value = value.detach().cpu()
        return (value.float() if value.is_floating_point() else value).numpy()
    return np.asarray(value)


def codec_state(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """audiocraft codec state dict -> numpy (float32 for floating tensors)."""
    return {key: _float32(value) for key, value in state.items()}


def _params(what: str, fn, *args) -> dict:
    try:
        return fn(*args)
    except ConversionError:
        raise
    except (KeyError, ValueError) as err:
        raise ConversionError(f"{what} do not match their xp.cfg: {err.args[0] if err.args else err}") from None


# --- T5 -----------------------------------------------------------------------------------------------------------

def load_t5(t5_dir: str, width: int, name: str) -> tuple[Any, dict, dict]:
    """`(T5Config, params, tokenizer files)` from a transformers T5 (or MusicGen) directory; `width` is the input
    width of the checkpoint's text projection, which the T5 must produce."""
    from mgjax.convert import TOKENIZER_FILES, read_json

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
    params = _params(f"the T5 weights in {t5_dir}", t5_params_from_hf, load_transformers_state_dict(t5_dir),
                     t5_config, prefix)
    tokenizer = {n: os.path.join(t5_dir, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(t5_dir, n))}
    return t5_config, params, tokenizer


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
    codec_raw, codec_cfg = read_package(os.path.join(src_dir, CODEC_FILE))
    lm_config = lm_config_from_audiocraft(lm_cfg)
    codec_config = codec_config_from_audiocraft(codec_cfg, lm_config.num_codebooks)
    if codec_config.sample_rate != int(cfg_get(lm_cfg, "sample_rate", codec_config.sample_rate)):
        raise ConversionError(f"the LM was trained at sample_rate={cfg_get(lm_cfg, 'sample_rate')} but the codec "
                              f"runs at {codec_config.sample_rate}")

    hf_state = lm_state_to_transformers(lm_state)
    proj = hf_state.get("enc_to_dec_proj.weight")
    if proj is None:
        raise ConversionError(f"{LM_FILE} has no condition_provider.conditioners.description.output_proj.weight "
                              f"(the text projection)")
    t5_name = str(cfg_get(lm_cfg, "conditioners.description.t5.name", "t5-base"))
    text_config, text_params, tokenizer_files = load_t5(t5_dir, int(proj.shape[1]), t5_name)
    try:
        model_config = MusicGenConfig(codec=codec_config, text=text_config, lm=lm_config).validate()
    except ConfigError as err:
        raise ConversionError(f"the LM and codec configs disagree: {err}") from None
    params = {"codec": _params(f"the weights in {CODEC_FILE}", codec_params, codec_state(codec_raw), codec_config,
                               AUDIOCRAFT),
              "text": text_params,
              "lm": _params(f"the weights in {LM_FILE}", lm_params_from_hf, hf_state, lm_config)}
    kind = "musicgen_melody" if lm_config.conditioning == "prepend" else "musicgen"
    return checkpoint.save(dst_dir, "musicgen", to_dict(model_config), params, source=f"audiocraft:{kind}",
                           tokenizer_files=tokenizer_files, overwrite=overwrite)
