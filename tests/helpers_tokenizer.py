"""A small T5-like tokenizer built locally with `tokenizers` (no downloads), for tests that need text prompts."""
from __future__ import annotations

import os

SENTENCES = (
    "happy rock with electric guitar and drums",
    "calm piano melody in a minor key",
    "upbeat electronic dance music with a heavy bass",
    "slow jazz with saxophone and soft drums",
    "a cheerful folk song with acoustic guitar",
)
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5


def build_test_tokenizer(directory: str) -> str:
    """Trains a WordLevel tokenizer on `SENTENCES`, saves it as a transformers tokenizer in `directory` -> path.

    Like T5: pad id 0, `</s>` (id 1) appended to every prompt, unknown words map to `<unk>`, right padding.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS)))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   padding_side="right")
    os.makedirs(directory, exist_ok=True)
    fast.save_pretrained(directory)
    return directory
