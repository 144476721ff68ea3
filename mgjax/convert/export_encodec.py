"""Our `CodecConfig` and EnCodec params -> transformers `EncodecConfig` kwargs and an `EncodecModel` state dict.

The inverse of `encodec_weights.codec_config_from_hf`; the weights go back through its weight map
(`codec_state_from_params`, weight norm re-split as `maps.weight_normed` says).
"""
from __future__ import annotations

import math

from mgjax.config import CodecConfig
from mgjax.convert.encodec_weights import codec_state_from_params, hf_num_quantizers
from mgjax.convert.io import ConversionError

__all__ = ["codec_config_to_hf", "codec_state_from_params"]


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
