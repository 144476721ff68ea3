"""Our Flax EnCodec params and `CodecConfig` -> a transformers `EncodecModel` state dict and `EncodecConfig` kwargs.

The inverse of `encodec_weights.codec_params` / `codec_config_from_hf` for the transformers key style. Weight norm
cannot be undone (our kernels store only g * v / ||v||), so each kernel w is written as g = ||w|| (over all axes but
torch's dim 0, as weight_norm does) and v = w; reading it back reproduces w to within one float32 ulp, because g is
rounded to float32 (bit-exact g and v do not exist in general).
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from mgjax.codec.seanet import decoder_plan, encoder_plan
from mgjax.config import CodecConfig
from mgjax.convert.encodec_weights import TRANSFORMERS, hf_num_quantizers
from mgjax.convert.io import ConversionError

# Names of torch.nn.utils.parametrizations.weight_norm, used by transformers 5.x (legacy weight_g/weight_v
# checkpoints are renamed to these by torch on load).
WEIGHT_G = ".parametrizations.weight.original0"
WEIGHT_V = ".parametrizations.weight.original1"


def codec_config_to_hf(cfg: CodecConfig) -> dict:
    """`CodecConfig` -> kwargs of `transformers.EncodecConfig`, with `target_bandwidths` giving exactly `cfg.n_q`
    quantizers, so that `codec_config_from_hf(EncodecConfig(**kwargs).to_dict()) == cfg`."""
    if cfg.normalize:
        raise ConversionError("EnCodec with normalize=True cannot be exported (codec_config_from_hf refuses it)")
    frame_rate = math.ceil(cfg.sample_rate / cfg.hop_length)
    nbits = math.ceil(math.log2(cfg.codebook_size))
    bandwidth = cfg.n_q * frame_rate * nbits / 1000
    while hf_num_quantizers(bandwidth, frame_rate, cfg.codebook_size) < cfg.n_q:  # float rounding of the kbps value
        bandwidth = math.nextafter(bandwidth, math.inf)
    return dict(
        target_bandwidths=[bandwidth], sampling_rate=cfg.sample_rate, audio_channels=cfg.channels,
        normalize=False, hidden_size=cfg.dimension, num_filters=cfg.n_filters,
        num_residual_layers=cfg.n_residual_layers, upsampling_ratios=list(cfg.ratios), norm_type="weight_norm",
        kernel_size=cfg.kernel_size, last_kernel_size=cfg.last_kernel_size,
        residual_kernel_size=cfg.residual_kernel_size, dilation_growth_rate=cfg.dilation_base,
        use_causal_conv=cfg.causal, pad_mode=cfg.pad_mode, compress=cfg.compress, num_lstm_layers=cfg.lstm_layers,
        trim_right_ratio=cfg.trim_right_ratio, codebook_size=cfg.codebook_size,
        codebook_dim=cfg.effective_codebook_dim, use_conv_shortcut=not cfg.true_skip)


def _f32(array) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(array, dtype=np.float32))


def _weight_norm_split(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A torch weight `[d0, ...]` -> (g `[d0, 1, ...]`, v = weight), g the norm over every axis but 0."""
    axes = tuple(range(1, weight.ndim))
    g = np.sqrt(np.sum(np.square(weight, dtype=np.float64), axis=axes, keepdims=True))
    # An all-zero channel has no direction: any nonzero v with g = 0 gives back the zeros (v = 0 would give NaN).
    v = np.where(g == 0, np.float32(1), weight)
    return _f32(g), _f32(v)


def _conv(params: Mapping, key: str, transpose: bool) -> dict[str, np.ndarray]:
    """Our `{kernel [k, in, out], bias [out]}` -> the weight-normed torch conv `key` (Conv1d weight `[out, in, k]`,
    ConvTranspose1d weight `[in, out, k]`, the latter's kernel un-flipped in time)."""
    kernel = np.asarray(params["kernel"])
    weight = np.transpose(kernel[::-1], (1, 2, 0)) if transpose else np.transpose(kernel, (2, 1, 0))
    g, v = _weight_norm_split(weight)
    return {key + WEIGHT_G: g, key + WEIGHT_V: v, key + ".bias": _f32(params["bias"])}


def _lstm(params: Mapping, key: str, num_layers: int) -> dict[str, np.ndarray]:
    """Our `w_ih_n`/`w_hh_n` `[H, 4H]` and summed `bias_n` `[4H]` -> torch LSTM `key.lstm.*_l{n}` (bias_hh zero)."""
    out = {}
    for n in range(num_layers):
        bias = _f32(params[f"bias_{n}"])
        out[f"{key}.lstm.weight_ih_l{n}"] = _f32(np.asarray(params[f"w_ih_{n}"]).T)
        out[f"{key}.lstm.weight_hh_l{n}"] = _f32(np.asarray(params[f"w_hh_{n}"]).T)
        out[f"{key}.lstm.bias_ih_l{n}"] = bias
        out[f"{key}.lstm.bias_hh_l{n}"] = np.zeros_like(bias)
    return out


def _part(params: Mapping, cfg: CodecConfig, part: str, plan, prefix: str) -> dict[str, np.ndarray]:
    """One SEANet part (`encoder`/`decoder`) -> its transformers keys, following the same plan as the reader."""
    style = TRANSFORMERS
    out = {}
    for index, kind, kwargs in plan:
        key = prefix + style.layer.format(part=part, i=index)
        layer = params[f"layers_{index}"]
        if kind in ("conv", "convtr"):
            transpose = kind == "convtr"
            out.update(_conv(layer, key + (style.convtr if transpose else style.conv), transpose))
        elif kind == "lstm":
            out.update(_lstm(layer, key, kwargs["num_layers"]))
        else:
            out.update(_conv(layer["block_1"], key + style.block_conv.format(j=1), False))
            out.update(_conv(layer["block_3"], key + style.block_conv.format(j=3), False))
            if not cfg.true_skip:
                out.update(_conv(layer["shortcut"], key + style.shortcut, False))
    return out


def _codebooks(codebooks: np.ndarray, prefix: str) -> dict[str, np.ndarray]:
    """`[n_q, card, dim]` codebooks -> each quantizer's `embed` plus the EMA buffers transformers keeps, filled as
    for a trained, initialised codebook (they are unused at inference)."""
    out = {}
    for q, embed in enumerate(np.asarray(codebooks)):
        key = f"{prefix}quantizer.layers.{q}.codebook"
        out[f"{key}.inited"] = np.ones((1,), np.float32)
        out[f"{key}.cluster_size"] = np.ones((embed.shape[0],), np.float32)
        out[f"{key}.embed"] = _f32(embed)
        out[f"{key}.embed_avg"] = _f32(embed).copy()
    return out


def codec_state_from_params(params: Mapping, cfg: CodecConfig, prefix: str = "") -> dict[str, np.ndarray]:
    """Flax codec params (unboxed `EncodecModel` tree) -> a flat transformers `EncodecModel` state dict of float32
    numpy arrays that loads with `strict=True`; `prefix` e.g. 'audio_encoder.' inside a MusicGen."""
    return {**_part(params["encoder"], cfg, "encoder", encoder_plan(cfg), prefix),
            **_part(params["decoder"], cfg, "decoder", decoder_plan(cfg), prefix),
            **_codebooks(params["quantizer"]["codebooks"], prefix)}
