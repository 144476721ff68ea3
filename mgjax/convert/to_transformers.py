"""An mgjax MusicGen checkpoint -> a transformers `save_pretrained` directory, the way back to PyTorch.

    python -m mgjax.convert.to_transformers ckpt/my-finetune hf/my-finetune

writes `config.json`, `generation_config.json`, `model.safetensors` and the tokenizer files, which
`MusicgenForConditionalGeneration` / `MusicgenMelodyForConditionalGeneration.from_pretrained` load (and which
`python -m mgjax.convert` reads back to the same params). The key map is `hf_lm.py`'s, inverted; the text encoder
and the codec go through `export_t5.py` and `export_encodec.py`. Only what transformers can express is exported:
the delay pattern with its default delays, transformers' LayerNorm epsilon, and an identity text projection when
the text and decoder widths are equal (transformers has no projection then).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from typing import Any, Mapping

import jax
import numpy as np

from mgjax import checkpoint
from mgjax.config import LMConfig, MusicGenConfig
from mgjax.convert.export_encodec import codec_config_to_hf, codec_state_from_params
from mgjax.convert.export_t5 import t5_config_to_hf, t5_state_from_params
from mgjax.convert.hf_lm import ATTENTIONS, DECODER, LAYER_NORMS
from mgjax.convert.io import ConversionError

# transformers' MusicGen decoder defaults for what mgjax does not model (dropout only matters to torch training).
DECODER_DEFAULTS = dict(max_position_embeddings=2048, dropout=0.1, attention_dropout=0.0, activation_dropout=0.0,
                        layerdrop=0.0, activation_function="gelu", initializer_factor=0.02, scale_embedding=False,
                        tie_word_embeddings=False)


def _torch_linear(kernel: np.ndarray) -> np.ndarray:
    """kernel `[in, out]` -> torch Linear weight `[out, in]`."""
    return np.ascontiguousarray(np.asarray(kernel, np.float32).T)


def _layer_state(layer: Mapping[str, Any], cfg: LMConfig, n: int) -> dict[str, np.ndarray]:
    """One decoder layer's params (slices of the stacked tree) -> its transformers keys."""
    D = cfg.dim
    prefix = f"{DECODER}layers.{n}."
    state = {}
    attentions = ATTENTIONS if cfg.conditioning == "cross" else {"self_attn": "self_attn"}
    for ours, theirs in attentions.items():
        for x in "qkv":
            state[f"{prefix}{theirs}.{x}_proj.weight"] = _torch_linear(np.reshape(layer[ours][f"{x}_proj"], (D, D)))
        state[f"{prefix}{theirs}.out_proj.weight"] = _torch_linear(np.reshape(layer[ours]["out_proj"], (D, D)))
    for ours, theirs in LAYER_NORMS.items():
        if ours == "cross_attn_norm" and cfg.conditioning != "cross":
            continue
        state[f"{prefix}{theirs}.weight"] = np.asarray(layer[ours]["scale"], np.float32)
        state[f"{prefix}{theirs}.bias"] = np.asarray(layer[ours]["bias"], np.float32)
    state[f"{prefix}fc1.weight"] = _torch_linear(layer["ffn"]["fc1"])
    state[f"{prefix}fc2.weight"] = _torch_linear(layer["ffn"]["fc2"])
    return state


def lm_state_from_params(params: Mapping[str, Any], cfg: LMConfig, *, with_text_projection: bool = True
                         ) -> dict[str, np.ndarray]:
    """`MusicGenLM(cfg)` params -> the decoder part of a transformers MusicGen state dict (the inverse of
    `hf_lm.lm_params_from_hf`). `with_text_projection=False` leaves out `enc_to_dec_proj` (equal widths)."""
    params = jax.tree.map(np.asarray, params)  # to the host once, not once per layer
    state = {f"{DECODER}embed_tokens.{k}.weight": params["embed"]["embedding"][k] for k in range(cfg.num_codebooks)}
    for n in range(cfg.num_layers):
        layer = jax.tree.map(lambda stacked: stacked[n], params["layers"])
        state.update(_layer_state(layer, cfg, n))
    state[f"{DECODER}layer_norm.weight"] = params["final_norm"]["scale"]
    state[f"{DECODER}layer_norm.bias"] = params["final_norm"]["bias"]
    for k in range(cfg.num_codebooks):
        state[f"decoder.lm_heads.{k}.weight"] = _torch_linear(params["heads"]["kernel"][k])
    if with_text_projection:
        state["enc_to_dec_proj.weight"] = _torch_linear(params["enc_to_dec_proj"]["kernel"])
        state["enc_to_dec_proj.bias"] = params["enc_to_dec_proj"]["bias"]
    if cfg.conditioning == "prepend":
        state["audio_enc_to_dec_proj.weight"] = _torch_linear(params["audio_enc_to_dec_proj"]["kernel"])
        state["audio_enc_to_dec_proj.bias"] = params["audio_enc_to_dec_proj"]["bias"]
    return {key: np.ascontiguousarray(value, np.float32) for key, value in state.items()}


def check_exportable(config: MusicGenConfig, lm_params: Mapping[str, Any]) -> None:
    """Refuses, by name, what a transformers MusicGen cannot hold."""
    lm = config.lm
    from mgjax.lm.patterns import pattern_from_config

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
    if lm.conditioning == "prepend":
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
    from safetensors.numpy import save_file

    import mgjax

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
