"""Text prompts -> padded T5 token ids, through a transformers tokenizer stored next to the checkpoint."""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

# Files any transformers tokenizer directory holds at least one of (fast, sentencepiece, or just its config).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "tokenizer.model")


def load_tokenizer(directory: str) -> Any:
    """`AutoTokenizer.from_pretrained(directory)` from local files only; FileNotFoundError if none is there."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"tokenizer directory {directory!r} does not exist")
    if not any(os.path.isfile(os.path.join(directory, name)) for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer in {directory!r} (expected one of {', '.join(_TOKENIZER_FILES)}); "
                                "pass token ids instead, or copy the tokenizer files of the checkpoint there")
    from transformers import AutoTokenizer  # heavy import, only when a tokenizer is actually needed

    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"could not load the tokenizer in {directory!r}: {err}") from err


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """B prompts -> (input_ids [B, L] int32, attention_mask [B, L] int32), padded to the longest prompt."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a single string")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: give at least one text prompt")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {i} is a {type(prompt).__name__}, expected str")
        if not prompt.strip():
            raise ValueError(f"prompt {i} is empty; use a non-empty description (the unconditional case is CFG's job)")
    encoded = tokenizer(prompts, padding="longest", return_tensors="np")
    input_ids = np.asarray(encoded["input_ids"], dtype=np.int32)
    attention_mask = np.asarray(encoded["attention_mask"], dtype=np.int32)
    return input_ids, attention_mask
