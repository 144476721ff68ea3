"""A trained run -> a MusicGen checkpoint that `MusicGen.load` and `sample.py --checkpoint` read.

Training keeps the LM (and a trainable T5) in a train state and the codec outside it; a sampling checkpoint needs
all three side by side, the model config without its `train` section, and the tokenizer files.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from mgjax import checkpoint
from mgjax.config import to_dict


def musicgen_params(trainer: Any, codec_params: Any, use_ema: bool = False) -> dict:
    """`{'codec', 'text', 'lm'}` numpy params of a `training.Trainer` (EMA params when asked and present)."""
    state = trainer.state
    params = state.ema if use_ema and state.ema is not None else state.params
    text = params["text"] if "text" in params else trainer.frozen["text"]
    return jax.tree.map(np.asarray, jax.device_get({"codec": codec_params, "text": text, "lm": params["lm"]}))


def tokenizer_files(directory: str) -> dict[str, str]:
    """`{file name: path}` of the files of a tokenizer directory ({} for '')."""
    if not directory:
        return {}
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"tokenizer directory {directory!r} does not exist")
    return {name: os.path.join(directory, name) for name in sorted(os.listdir(directory))
            if os.path.isfile(os.path.join(directory, name))}


def export_musicgen(trainer: Any, codec: Any, dst_dir: str, *, tokenizer_dir: str = "", use_ema: bool = False,
                    source: str = "") -> str:
    """Writes the run's model as a MusicGen checkpoint in `dst_dir` (atomically, replacing one there) -> its path.

    `codec`: the `mgjax.Codec` the training audio was encoded with (its config must be the run's `codec` section).
    """
    config = trainer.config
    if codec.config != config.codec:
        raise ValueError(f"the codec to export ({codec.config}) differs from the run's codec section "
                         f"({config.codec}); export with the codec the data was encoded with")
    config_dict = {name: section for name, section in to_dict(config).items() if name != "train"}
    params = musicgen_params(trainer, codec.params, use_ema)
    return checkpoint.save(dst_dir, "musicgen", config_dict, params, source=source,
                           tokenizer_files=tokenizer_files(tokenizer_dir), overwrite=True)
