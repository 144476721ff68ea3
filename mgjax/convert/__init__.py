"""Converters from released PyTorch checkpoints to mgjax (Orbax) checkpoints.

`convert_checkpoint(src, dst)` auto-detects the source format:
- a transformers directory (`config.json` + `*.safetensors` / `*.bin`): `EncodecModel`,
  `MusicgenForConditionalGeneration` or `MusicgenMelodyForConditionalGeneration`;
- an audiocraft directory (`state_dict.bin` + `compression_state_dict.bin`).
"""
from __future__ import annotations

import os
from typing import Any

from mgjax import checkpoint
from mgjax.config import to_dict
from mgjax.convert.audiocraft import convert_audiocraft
from mgjax.convert.encodec_weights import codec_config_from_hf, codec_params
from mgjax.convert.hf import convert_musicgen
from mgjax.convert.io import (TOKENIZER_FILES, ConversionError, detect_format, load_transformers_state_dict, matching,
                              read_json, resolve_hub_cache, tokenizer_files)

__all__ = ["TOKENIZER_FILES", "ConversionError", "convert_checkpoint", "detect_format", "read_json",
           "read_transformers_musicgen", "resolve_hub_cache"]


def _convert_transformers(src_dir: str, dst_dir: str, overwrite: bool) -> str:
    config = read_json(os.path.join(src_dir, "config.json"))
    model_type = config.get("model_type")
    if model_type == "encodec":
        codec_config = codec_config_from_hf(config)
        params = {"codec": matching("the checkpoint does not match its config.json", codec_params,
                                    load_transformers_state_dict(src_dir), codec_config)}
        return checkpoint.save(dst_dir, "codec", {"codec": to_dict(codec_config)}, params,
                               source=f"transformers:{model_type}", overwrite=overwrite)
    if model_type in ("musicgen", "musicgen_melody"):
        model_config, params = convert_musicgen(config, load_transformers_state_dict(src_dir))
        return checkpoint.save(dst_dir, "musicgen", to_dict(model_config), params,
                               source=f"transformers:{model_type}", tokenizer_files=tokenizer_files(src_dir),
                               overwrite=overwrite)
    raise ConversionError(f"{src_dir}/config.json has model_type={model_type!r}; supported: 'encodec', "
                          f"'musicgen', 'musicgen_melody'")


def read_transformers_musicgen(src_dir: str) -> tuple[Any, dict, str]:
    """`(MusicGenConfig, numpy params, the directory read)` of a transformers MusicGen(-melody) directory (or hub
    cache folder: the directory read is its snapshot), converted in memory: what `convert_checkpoint` would write,
    without writing it."""
    src_dir = resolve_hub_cache(src_dir) if os.path.isdir(src_dir) else src_dir
    if detect_format(src_dir) != "transformers":
        raise ConversionError(f"{src_dir} is an audiocraft checkpoint: convert it once with `python -m mgjax.convert "
                              f"{src_dir} DST --t5 T5_DIR` (its T5 weights live elsewhere)")
    config = read_json(os.path.join(src_dir, "config.json"))
    if config.get("model_type") not in ("musicgen", "musicgen_melody"):
        raise ConversionError(f"{src_dir}/config.json has model_type={config.get('model_type')!r}, not a MusicGen")
    model_config, params = convert_musicgen(config, load_transformers_state_dict(src_dir))
    return model_config, params, src_dir


def convert_checkpoint(src_dir: str, dst_dir: str, *, t5_dir: str | None = None, overwrite: bool = False) -> str:
    """Converts a PyTorch checkpoint directory into an mgjax checkpoint at `dst_dir`; returns its absolute path.

    The output is written to a temporary directory and renamed, so a failed conversion leaves nothing behind. A
    Hugging Face hub cache folder (`models--org--name`) stands for its one snapshot.
    `t5_dir`: a transformers T5 directory, needed for audiocraft checkpoints (they do not hold the T5 weights).
    """
    if os.path.isdir(src_dir):
        src_dir = resolve_hub_cache(src_dir)
    fmt = detect_format(src_dir)
    if os.path.abspath(src_dir) == os.path.abspath(dst_dir):
        raise ConversionError("the output directory must differ from the source directory")
    if fmt == "transformers":
        return _convert_transformers(src_dir, dst_dir, overwrite)
    return convert_audiocraft(src_dir, dst_dir, t5_dir=t5_dir, overwrite=overwrite)
