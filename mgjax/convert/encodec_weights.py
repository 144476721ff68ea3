"""EnCodec weights from transformers (`encoder.layers.N.conv`) or audiocraft (`encoder.model.N.conv.conv`) keys."""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import numpy as np

from mgjax.codec.seanet import decoder_plan, encoder_plan
from mgjax.config import CodecConfig
from mgjax.convert.io import ConversionError, get, weight_normed


@dataclasses.dataclass(frozen=True)
class CodecKeyStyle:
    """How one checkpoint family names the codec's tensors (`{part}` is encoder/decoder, `{i}` the layer index)."""

    layer: str  # prefix of layer i of a SEANet part
    conv: str  # suffix of the conv inside a conv layer
    convtr: str  # suffix of the transposed conv inside an upsampling layer
    block_conv: str  # suffix of conv j inside a residual block
    shortcut: str
    codebook: str  # key of codebook q


TRANSFORMERS = CodecKeyStyle(layer="{part}.layers.{i}", conv=".conv", convtr=".conv",
                             block_conv=".block.{j}.conv",
                             shortcut=".shortcut.conv", codebook="quantizer.layers.{q}.codebook.embed")
AUDIOCRAFT = CodecKeyStyle(layer="{part}.model.{i}", conv=".conv.conv", convtr=".convtr.convtr",
                           block_conv=".block.{j}.conv.conv",
                           shortcut=".shortcut.conv.conv", codebook="quantizer.vq.layers.{q}._codebook.embed")


def hf_num_quantizers(bandwidth_kbps: float, frame_rate: int, codebook_size: int) -> int:
    """transformers' `EncodecConfig.num_quantizers`: as many as the largest target bandwidth allows."""
    return int(1000 * bandwidth_kbps // (frame_rate * math.ceil(math.log2(codebook_size))))


def codec_config_from_hf(cfg: Mapping) -> CodecConfig:
    """A transformers `EncodecConfig` dict -> `CodecConfig`; refuses settings this port does not implement."""
    if cfg.get("norm_type", "weight_norm") != "weight_norm":
        raise ConversionError(f"EnCodec norm_type={cfg['norm_type']!r} is not supported (MusicGen's codec uses "
                              f"weight_norm)")
    if cfg.get("normalize"):
        raise ConversionError("EnCodec with normalize=True (the 24/48 kHz codecs) is not supported; MusicGen's "
                              "32 kHz codec has normalize=False")
    if cfg.get("chunk_length_s"):
        raise ConversionError("chunked EnCodec (chunk_length_s set, the 48 kHz codec) is not supported")
    ratios = tuple(int(r) for r in cfg.get("upsampling_ratios", (8, 5, 4, 2)))
    sample_rate = int(cfg.get("sampling_rate", 24000))
    codebook_size = int(cfg.get("codebook_size", 1024))
    frame_rate = math.ceil(sample_rate / math.prod(ratios))
    bandwidths = cfg.get("target_bandwidths") or (1.5, 3.0, 6.0, 12.0, 24.0)
    # transformers decodes with every quantizer it has, and has as many as the largest bandwidth allows.
    n_q = hf_num_quantizers(bandwidths[-1], frame_rate, codebook_size)
    hidden = int(cfg.get("hidden_size", 128))
    codebook_dim = int(cfg.get("codebook_dim") or hidden)
    return CodecConfig(
        sample_rate=sample_rate, channels=int(cfg.get("audio_channels", 1)), dimension=hidden,
        n_filters=int(cfg.get("num_filters", 32)), ratios=ratios,
        n_residual_layers=int(cfg.get("num_residual_layers", 1)),
        residual_kernel_size=int(cfg.get("residual_kernel_size", 3)),
        dilation_base=int(cfg.get("dilation_growth_rate", 2)), kernel_size=int(cfg.get("kernel_size", 7)),
        last_kernel_size=int(cfg.get("last_kernel_size", 7)), compress=int(cfg.get("compress", 2)),
        lstm_layers=int(cfg.get("num_lstm_layers", 2)), causal=bool(cfg.get("use_causal_conv", True)),
        pad_mode=str(cfg.get("pad_mode", "reflect")), true_skip=not cfg.get("use_conv_shortcut", True),
        trim_right_ratio=float(cfg.get("trim_right_ratio", 1.0)), n_q=n_q, codebook_size=codebook_size,
        codebook_dim=0 if codebook_dim == hidden else codebook_dim,
        normalize=False)


def _conv(state, key: str, transpose: bool) -> dict:
    weight = weight_normed(state, key)
    if transpose:  # torch ConvTranspose1d [in, out, k] -> flipped [k, in, out]
        kernel = np.transpose(weight, (2, 0, 1))[::-1]
    else:  # torch Conv1d [out, in, k] -> [k, in, out]
        kernel = np.transpose(weight, (2, 1, 0))
    return {"kernel": np.ascontiguousarray(kernel, np.float32), "bias": get(state, f"{key}.bias").astype(np.float32)}


def _lstm(state, key: str, num_layers: int) -> dict:
    out = {}
    for n in range(num_layers):
        out[f"w_ih_{n}"] = get(state, f"{key}.lstm.weight_ih_l{n}").T.astype(np.float32)
        out[f"w_hh_{n}"] = get(state, f"{key}.lstm.weight_hh_l{n}").T.astype(np.float32)
        out[f"bias_{n}"] = (get(state, f"{key}.lstm.bias_ih_l{n}") + get(state, f"{key}.lstm.bias_hh_l{n}")
                            ).astype(np.float32)
    return out


def _part(state, cfg: CodecConfig, part: str, plan, style: CodecKeyStyle, prefix: str) -> dict:
    out = {}
    for index, kind, kwargs in plan:
        key = prefix + style.layer.format(part=part, i=index)
        if kind in ("conv", "convtr"):
            transpose = kind == "convtr"
            out[f"layers_{index}"] = _conv(state, key + (style.convtr if transpose else style.conv), transpose)
        elif kind == "lstm":
            out[f"layers_{index}"] = _lstm(state, key, kwargs["num_layers"])
        else:
            block = {"block_1": _conv(state, key + style.block_conv.format(j=1), False),
                     "block_3": _conv(state, key + style.block_conv.format(j=3), False)}
            if not cfg.true_skip:
                block["shortcut"] = _conv(state, key + style.shortcut, False)
            out[f"layers_{index}"] = block
    return out


def codec_params(state: Mapping[str, np.ndarray], cfg: CodecConfig, style: CodecKeyStyle = TRANSFORMERS,
                 prefix: str = "") -> dict:
    """Flax codec params (`EncodecModel` tree) from a flat PyTorch state dict; `prefix` e.g. 'audio_encoder.'."""
    codebooks = np.stack([get(state, prefix + style.codebook.format(q=q)) for q in range(cfg.n_q)])
    return {"encoder": _part(state, cfg, "encoder", encoder_plan(cfg), style, prefix),
            "decoder": _part(state, cfg, "decoder", decoder_plan(cfg), style, prefix),
            "quantizer": {"codebooks": codebooks.astype(np.float32)}}
