"""EnCodec config from transformers, and weights from transformers (`encoder.layers.N.conv`) or audiocraft
(`encoder.model.N.conv.conv`) keys, back to transformers' keys; both ways through one weight map, `codec_entries`."""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import numpy as np

from mgjax.codec.seanet import decoder_plan, encoder_plan
from mgjax.config import CodecConfig
from mgjax.convert.io import ConversionError
from mgjax.convert.maps import LINEAR, Entry, Layout, tensor, to_params, to_state, weight_normed


@dataclasses.dataclass(frozen=True)
class CodecKeyStyle:
    """How one checkpoint family names the codec's tensors (`{part}` is encoder/decoder, `{i}` the layer index)."""

    layer: str  # prefix of layer i of a SEANet part
    conv: str  # suffix of the conv inside a conv layer
    convtr: str  # suffix of the transposed conv inside an upsampling layer
    block_conv: str  # suffix of conv j inside a residual block
    shortcut: str
    codebook: str  # key of codebook i


TRANSFORMERS = CodecKeyStyle(layer="{part}.layers.{i}", conv=".conv", convtr=".conv",
                             block_conv=".block.{j}.conv",
                             shortcut=".shortcut.conv", codebook="quantizer.layers.{i}.codebook.embed")
AUDIOCRAFT = CodecKeyStyle(layer="{part}.model.{i}", conv=".conv.conv", convtr=".convtr.convtr",
                           block_conv=".block.{j}.conv.conv",
                           shortcut=".shortcut.conv.conv", codebook="quantizer.vq.layers.{i}._codebook.embed")


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


# torch Conv1d weight [out, in, k] <-> our kernel [k, in, out]; ConvTranspose1d [in, out, k] <-> [k, in, out], the
# latter flipped in time.
CONV = weight_normed(lambda w: np.transpose(w, (2, 1, 0)), lambda kernel: np.transpose(kernel, (2, 1, 0)))
CONV_TRANSPOSE = weight_normed(lambda w: np.transpose(w, (2, 0, 1))[::-1],
                               lambda kernel: np.transpose(kernel[::-1], (1, 2, 0)))
def _ih_hh(key: str) -> tuple[str, str]:
    return key.replace("*", "ih"), key.replace("*", "hh")


def _codebook_keys(key: str) -> tuple[str, ...]:
    base = key.removesuffix("embed")
    return key, base + "inited", base + "cluster_size", base + "embed_avg"


# torch LSTM `bias_ih` + `bias_hh` (the key's '*') <-> our one summed bias; written back with bias_hh zero.
SUMMED_BIAS = Layout(read=lambda state, key, shape: np.add(*(tensor(state, k) for k in _ih_hh(key))),
                     write=lambda bias: (bias, np.zeros_like(bias)), keys=_ih_hh)
# A codebook's `embed` <-> ours; written with the EMA buffers transformers keeps, filled as for a trained,
# initialised codebook (they are unused at inference).
CODEBOOK = Layout(read=tensor, write=lambda embed: (embed, np.ones(1), np.ones(len(embed)), embed),
                  keys=_codebook_keys)


def _conv(ours: str, theirs: str, layout: Layout = CONV) -> list[Entry]:
    return [Entry(f"{ours}/kernel", theirs, layout), Entry(f"{ours}/bias", f"{theirs}.bias")]


def codec_entries(cfg: CodecConfig, style: CodecKeyStyle = TRANSFORMERS) -> list[Entry]:
    """The codec's weight map, layer by layer along the SEANet plans (our `layers_{index}` is torch's `{index}`)."""
    entries = [Entry("quantizer/codebooks", style.codebook, CODEBOOK, stack=cfg.n_q)]
    for part, plan in (("encoder", encoder_plan(cfg)), ("decoder", decoder_plan(cfg))):
        for index, kind, kwargs in plan:
            ours, theirs = f"{part}/layers_{index}", style.layer.format(part=part, i=index)
            if kind == "conv":
                entries += _conv(ours, theirs + style.conv)
            elif kind == "convtr":
                entries += _conv(ours, theirs + style.convtr, CONV_TRANSPOSE)
            elif kind == "lstm":
                for n in range(kwargs["num_layers"]):
                    entries += [Entry(f"{ours}/w_ih_{n}", f"{theirs}.lstm.weight_ih_l{n}", LINEAR),
                                Entry(f"{ours}/w_hh_{n}", f"{theirs}.lstm.weight_hh_l{n}", LINEAR),
                                Entry(f"{ours}/bias_{n}", f"{theirs}.lstm.bias_*_l{n}", SUMMED_BIAS)]
            else:
                entries += _conv(f"{ours}/block_1", theirs + style.block_conv.format(j=1))
                entries += _conv(f"{ours}/block_3", theirs + style.block_conv.format(j=3))
                if not cfg.true_skip:
                    entries += _conv(f"{ours}/shortcut", theirs + style.shortcut)
    return entries


def codec_params(state: Mapping[str, np.ndarray], cfg: CodecConfig, style: CodecKeyStyle = TRANSFORMERS,
                 prefix: str = "") -> dict:
    """Flax codec params (`EncodecModel` tree) from a flat PyTorch state dict; `prefix` e.g. 'audio_encoder.'."""
    return to_params(codec_entries(cfg, style), state, prefix)


def codec_state_from_params(params: Mapping, cfg: CodecConfig, prefix: str = "") -> dict[str, np.ndarray]:
    """Flax codec params (unboxed `EncodecModel` tree) -> a flat transformers `EncodecModel` state dict of float32
    numpy arrays that loads with `strict=True`; `prefix` e.g. 'audio_encoder.' inside a MusicGen."""
    return to_state(codec_entries(cfg), params, prefix)
