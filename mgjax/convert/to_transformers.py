"""An mgjax MusicGen checkpoint -> a transformers `save_pretrained` directory, the way back to PyTorch.

    python -m mgjax.convert.to_transformers ckpt/my-finetune hf/my-finetune

writes `config.json`, `generation_config.json`, `model.safetensors` and the tokenizer files, which
`MusicgenForConditionalGeneration` / `MusicgenMelodyForConditionalGeneration.from_pretrained` load (and which
`python -m mgjax.convert` reads back to the same params). The weights go back through the weight maps that read
them (`hf_lm.lm_entries`, `hf_t5.t5_entries`, `encodec_weights.codec_entries`). Only what transformers can express
is exported: the delay pattern with its default delays, transformers' LayerNorm epsilon, and an identity text
projection when the text and decoder widths are equal (transformers has no projection then).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from typing import Any, Mapping

import numpy as np
from safetensors.numpy import save_file

import mgjax
from mgjax import checkpoint
from mgjax.conditioning.fuser import takes_melody
from mgjax.config import MusicGenConfig
from mgjax.convert.export_encodec import codec_config_to_hf, codec_state_from_params
from mgjax.convert.export_t5 import t5_config_to_hf, t5_state_from_params
from mgjax.convert.hf_lm import lm_state_from_params
from mgjax.convert.io import ConversionError
from mgjax.lm.patterns import pattern_from_config

# transformers' MusicGen decoder defaults for what mgjax does not model (dropout only matters to torch training).
DECODER_DEFAULTS = dict(max_position_embeddings=2048, dropout=0.1, attention_dropout=0.0, activation_dropout=0.0,
                        layerdrop=0.0, activation_function="gelu", initializer_factor=0.02, scale_embedding=False,
                        tie_word_embeddings=False)


def check_exportable(config: MusicGenConfig, lm_params: Mapping[str, Any]) -> None:
    """Refuses, by name, what a transformers MusicGen cannot hold."""
    lm = config.lm
    default_delays = tuple(k // lm.audio_channels for k in range(lm.num_codebooks))
    if lm.pattern != "delay" or pattern_from_config(lm).delays != default_delays:
        raise ConversionError(f"transformers MusicGen only knows the delay pattern with delays {default_delays}; "
                              f"this model uses lm.pattern={lm.pattern!r} {lm.pattern_delays or ''}")
    if lm.layer_norm_eps != 1e-5:
        raise ConversionError(f"transformers MusicGen uses LayerNorm eps 1e-5; lm.layer_norm_eps={lm.layer_norm_eps}")
    if config.codec.lstm_layers < 1:
        raise ConversionError("transformers' EnCodec always has an LSTM; this codec has codec.lstm_layers=0")
    if lm.weight_format != "float32":
        raise ConversionError("export the float32 model (int8 weights are an in-memory sampling format)")
    if config.text.d_model == lm.dim:
        projection = lm_params["enc_to_dec_proj"]
        identity = (np.array_equal(np.asarray(projection["kernel"]), np.eye(lm.dim))
                    and not np.any(np.asarray(projection["bias"])))
        if not identity:
            raise ConversionError("text and decoder widths are equal, where transformers has no text projection, "
                                  "but this model's enc_to_dec_proj is not the identity")


def musicgen_config_to_hf(config: MusicGenConfig) -> Any:
    """`MusicGenConfig` -> a transformers `MusicgenConfig` / `MusicgenMelodyConfig`."""
    import transformers

    lm = config.lm
    decoder = dict(DECODER_DEFAULTS, vocab_size=lm.card, num_hidden_layers=lm.num_layers, ffn_dim=lm.ffn_dim,
                   num_attention_heads=lm.num_heads, hidden_size=lm.dim, num_codebooks=lm.num_codebooks,
                   audio_channels=lm.audio_channels, pad_token_id=lm.card, bos_token_id=lm.card)
    parts = dict(text_encoder=transformers.T5Config(**t5_config_to_hf(config.text)),
                 audio_encoder=transformers.EncodecConfig(**codec_config_to_hf(config.codec)))
    if takes_melody(lm):
        return transformers.MusicgenMelodyConfig(decoder=transformers.MusicgenMelodyDecoderConfig(**decoder),
                                                 num_chroma=lm.num_chroma, chroma_length=lm.chroma_length, **parts)
    return transformers.MusicgenConfig(decoder=transformers.MusicgenDecoderConfig(**decoder), **parts)


def generation_config_to_hf(config: MusicGenConfig) -> Any:
    """MusicGen's released sampling defaults: top-k 250, guidance 3, 30 s (1500 tokens), the special token."""
    import transformers

    card = config.lm.card
    return transformers.GenerationConfig(do_sample=True, top_k=250, guidance_scale=3.0, max_length=1500,
                                         decoder_start_token_id=card, pad_token_id=card, bos_token_id=card)


def musicgen_state_from_params(config: MusicGenConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The whole transformers MusicGen state dict: decoder, text encoder, codec."""
    check_exportable(config, params["lm"])
    state = lm_state_from_params(params["lm"], config.lm, with_text_projection=config.text.d_model != config.lm.dim)
    state.update(t5_state_from_params(params["text"], config.text, prefix="text_encoder."))
    state.update(codec_state_from_params(params["codec"], config.codec, prefix="audio_encoder."))
    return state


def export_transformers(ckpt_dir: str, dst_dir: str, *, overwrite: bool = False) -> str:
    """Writes the mgjax MusicGen checkpoint `ckpt_dir` as a transformers directory `dst_dir` (through a temporary
    directory renamed at the end, so a failure leaves nothing behind); returns its absolute path."""
    dst_dir = os.path.abspath(dst_dir)
    if os.path.exists(dst_dir) and not overwrite:
        raise ConversionError(f"{dst_dir} already exists; choose another output or pass overwrite=True (--overwrite)")
    model = mgjax.MusicGen.load(ckpt_dir)
    state = musicgen_state_from_params(model.config, model.params)
    os.makedirs(os.path.dirname(dst_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-export-", dir=os.path.dirname(dst_dir))
    try:
        musicgen_config_to_hf(model.config).save_pretrained(tmp)
        generation_config_to_hf(model.config).save_pretrained(tmp)
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        tokenizer_dir = os.path.join(ckpt_dir, checkpoint.TOKENIZER_DIR)
        if os.path.isdir(tokenizer_dir):
            for name in sorted(os.listdir(tokenizer_dir)):
                shutil.copy2(os.path.join(tokenizer_dir, name), tmp)
        if os.path.exists(dst_dir):
            shutil.rmtree(dst_dir)
        os.replace(tmp, dst_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write an mgjax MusicGen checkpoint as a transformers directory.")
    parser.add_argument("checkpoint", help="mgjax MusicGen checkpoint (from python -m mgjax.convert or train.py "
                                           "--export)")
    parser.add_argument("output", help="transformers directory to write (from_pretrained reads it)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    try:
        path = export_transformers(args.checkpoint, args.output, overwrite=args.overwrite)
    except (ConversionError, checkpoint.CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
