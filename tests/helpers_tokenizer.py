"""A small T5-like tokenizer built locally with `tokenizers` (no downloads), for tests that need text prompts."""
from __future__ import annotations

from mgjax.text.tokenizer import train_word_tokenizer

SENTENCES = (
    "happy rock with electric guitar and drums",
    "calm piano melody in a minor key",
    "upbeat electronic dance music with a heavy bass",
    "slow jazz with saxophone and soft drums",
    "a cheerful folk song with acoustic guitar",
)


def build_test_tokenizer(directory: str) -> str:
    """A word-level tokenizer of `SENTENCES` saved as a transformers tokenizer in `directory` -> path."""
    return train_word_tokenizer(SENTENCES, directory)
