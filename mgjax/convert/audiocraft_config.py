"""audiocraft `xp.cfg` (the hydra config saved in its checkpoints) -> mgjax `LMConfig` / `CodecConfig`.

The config is a YAML string (released exports) or a dict, with `${...}` references left in; settings this port does
not implement are refused by name.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import yaml

from mgjax.conditioning.fuser import FUSERS
from mgjax.config import CodecConfig, ConfigError, LMConfig
from mgjax.convert.io import ConversionError
from mgjax.lm.patterns import pattern_from_config

_REQUIRED = object()
_INTERPOLATION = re.compile(r"\$\{([^${}]+)\}")


def parse_xp_cfg(raw: Any, path: str) -> dict:
    """`xp.cfg` as stored (YAML string or dict; pickled omegaconf objects are refused unread, see
    `io.load_torch_file`) -> plain dict."""
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


def _audio_channels(cfg: Mapping) -> int:
    """2 for a stereo LM (`interleave_stereo_codebooks.use`: a mono codec codes each channel, codebooks interleaved
    left/right), else 1; refuses the layouts mgjax does not decode."""
    stereo = bool(cfg_get(cfg, "interleave_stereo_codebooks.use", False))
    channels = int(cfg_get(cfg, "channels", 1))
    if stereo and cfg_get(cfg, "interleave_stereo_codebooks.per_timestep", False):
        raise ConversionError("unsupported audiocraft setting interleave_stereo_codebooks.per_timestep=True: only "
                              "codebook interleaving (the released stereo models') is implemented")
    if channels != (2 if stereo else 1):
        raise ConversionError(f"unsupported audiocraft setting channels={channels} with interleave_stereo_codebooks."
                              f"use={stereo}: stereo MusicGen is 2 channels through interleaved codebooks")
    return 2 if stereo else 1


def _pattern(cfg: Mapping, n_q: int, audio_channels: int = 1) -> dict:
    """`LMConfig` pattern fields from `codebooks_pattern` (only the sub-config of the chosen pattern counts)."""
    name = cfg_get(cfg, "codebooks_pattern.modeling", None) or cfg_get(cfg, "transformer_lm.q_modeling", None)
    if name is None:
        raise ConversionError("xp.cfg sets neither codebooks_pattern.modeling nor transformer_lm.q_modeling")
    sub = cfg_get(cfg, f"codebooks_pattern.{name}", None) or {}
    # sequences equal to the pattern's default are stored empty, as the transformers converter does
    if name in ("delay", "parallel"):  # lm.pattern_empty_initial=-1 (MAGNeT's) is refused by LMConfig, by name
        extra = dict(pattern_empty_initial=int(sub.get("empty_initial", 0)))
        if name == "parallel":
            return dict(pattern="parallel", **extra)
        default = [k // audio_channels for k in range(n_q)]  # stereo: both channels' codebook k delayed by k
        return dict(pattern="delay", pattern_delays=_unless(sub.get("delays"), default),
                    pattern_flatten_first=int(sub.get("flatten_first", 0)), **extra)
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
    audio_channels = _audio_channels(cfg)
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
    fuser = FUSERS[conditioning]
    if not fuser.cross_attention and cfg_get(cfg, f"{lm}.cross_attention", False):
        raise ConversionError("unsupported audiocraft setting transformer_lm.cross_attention=True with a "
                              "prepend-only fuser")
    dim, n_q = int(cfg_get(cfg, f"{lm}.dim")), int(cfg_get(cfg, f"{lm}.n_q"))
    extra = _chroma_settings(cfg) if fuser.takes_melody else {}
    try:
        config = LMConfig(dim=dim, num_layers=int(cfg_get(cfg, f"{lm}.num_layers")),
                          num_heads=int(cfg_get(cfg, f"{lm}.num_heads")),
                          ffn_dim=int(float(cfg_get(cfg, f"{lm}.hidden_scale", 4)) * dim), num_codebooks=n_q,
                          card=int(cfg_get(cfg, f"{lm}.card")), conditioning=conditioning, layer_norm_eps=1e-5,
                          audio_channels=audio_channels, **_pattern(cfg, n_q, audio_channels), **extra)
        config.validate()
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
