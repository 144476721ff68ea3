"""Builders for the PyTorch oracle: small transformers MusicGen models with EVERY weight randomised.

Zero EnCodec codebooks and unit/zero norms hide conversion bugs, so all parameters and codebook buffers are drawn
at random; `target_bandwidths` is set so the codec really has `num_codebooks` quantizers.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import transformers

TEXT = dict(vocab_size=64, d_model=20, d_kv=6, num_heads=3, d_ff=24, num_layers=2, dropout_rate=0.0)


def codec_config(num_codebooks: int, card: int, **overrides) -> transformers.EncodecConfig:
    """A tiny EnCodec with the 32 kHz layout (ratios 8,5,4,4: 50 frames/s) and exactly `num_codebooks` quantizers."""
    kwargs = dict(sampling_rate=32000, upsampling_ratios=[8, 5, 4, 4], num_filters=4, hidden_size=8,
                  num_lstm_layers=1, use_causal_conv=False, pad_mode="reflect", use_conv_shortcut=False)
    kwargs.update(overrides)
    frame_rate = math.ceil(kwargs["sampling_rate"] / math.prod(kwargs["upsampling_ratios"]))
    bandwidth = num_codebooks * frame_rate * math.log2(card) / 1000
    config = transformers.EncodecConfig(codebook_size=card, target_bandwidths=[bandwidth], **kwargs)
    assert config.num_quantizers == num_codebooks
    return config


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter and every codebook buffer random; norms and weight-norm gains away from 1/0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if ("layer_norm" in name and name.endswith("weight")) or name.endswith("original0"):
                param.copy_(0.5 + torch.rand(param.shape, generator=generator))
            elif param.ndim == 2 and "embed" not in name and "shared" not in name:
                param.copy_(noise * param.shape[1] ** -0.5)
            else:
                param.copy_(noise * 0.5)
        for name, buffer in model.named_buffers():
            if name.endswith("codebook.embed"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.5)
    return model.eval()


def musicgen(decoder: dict, seed: int = 0, text: dict | None = None) -> transformers.MusicgenForConditionalGeneration:
    """A random `MusicgenForConditionalGeneration`; `decoder` holds hidden_size, num_hidden_layers,
    num_attention_heads, ffn_dim, num_codebooks, vocab_size (= codebook size, a power of 2)."""
    torch.manual_seed(seed)
    card = decoder["vocab_size"]
    config = transformers.MusicgenConfig(
        text_encoder=transformers.T5Config(**(text or TEXT)),
        audio_encoder=codec_config(decoder["num_codebooks"] // decoder.get("audio_channels", 1), card),
        decoder=transformers.MusicgenDecoderConfig(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                                                   max_position_embeddings=512, pad_token_id=card,
                                                   bos_token_id=card, **decoder))
    return randomise(transformers.MusicgenForConditionalGeneration(config), seed)


def reference_generate(model, input_ids, attention_mask, frames: int, **kwargs):
    """transformers `generate` for `frames` frames -> (audio [B, C, N] numpy, codes [B, K, T] numpy)."""
    return reference_generate_from(model, dict(input_ids=torch.as_tensor(input_ids),
                                               attention_mask=torch.as_tensor(attention_mask)), frames, **kwargs)


def reference_generate_from(model, inputs: dict, frames: int, **kwargs):
    """transformers `generate(**inputs)` for `frames` frames -> (audio [B, C, N] numpy, codes [B, K, T] numpy).
    Stereo models decode their left (even) and right (odd) codebooks apart: the codes come back interleaved."""
    captured = []
    decode = model.audio_encoder.decode

    def capture(audio_codes, *args, **kw):
        captured.append(audio_codes[0].numpy())
        return decode(audio_codes, *args, **kw)

    channels = model.decoder.config.audio_channels
    model.audio_encoder.decode = capture
    try:
        with torch.no_grad():
            audio = model.generate(**inputs, max_new_tokens=frames + model.decoder.num_codebooks // channels - 1,
                                   **kwargs)
    finally:
        model.audio_encoder.decode = decode
    assert len(captured) == channels
    codes = np.stack(captured, axis=2).reshape(captured[0].shape[0], -1, captured[0].shape[-1])
    return audio.numpy(), codes


def musicgen_melody(decoder: dict, seed: int = 0, text: dict | None = None, **config):
    """A random `MusicgenMelodyForConditionalGeneration` (chroma + text prepended); `decoder` as for `musicgen`,
    `config` e.g. num_chroma / chroma_length."""
    torch.manual_seed(seed)
    card = decoder["vocab_size"]
    melody_config = transformers.MusicgenMelodyConfig(
        text_encoder=transformers.T5Config(**(text or TEXT)),
        audio_encoder=codec_config(decoder["num_codebooks"] // decoder.get("audio_channels", 1), card),
        decoder=transformers.MusicgenMelodyDecoderConfig(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                                                         max_position_embeddings=512, pad_token_id=card,
                                                         bos_token_id=card, **decoder), **config)
    return randomise(transformers.MusicgenMelodyForConditionalGeneration(melody_config), seed)
