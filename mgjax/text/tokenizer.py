"""Text prompts -> padded T5 token ids, through a transformers tokenizer stored next to the checkpoint."""
from __future__ import annotations

import os
import warnings
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
    unknown = unknown_words(prompts, input_ids, getattr(tokenizer, "unk_token_id", None),
                            getattr(encoded, "encodings", None))
    if unknown:
        shown = ", ".join(repr(word) for word in unknown[:20]) + (", ..." if len(unknown) > 20 else "")
        warnings.warn(f"{len(unknown)} prompt word(s) unknown to the checkpoint's tokenizer are read as <unk>, which "
                      f"means nothing to the model: {shown}; rephrase with words it knows (the tokenizer knows "
                      f"{len(tokenizer.get_vocab())} tokens: tokenizer.get_vocab())", UnknownWordsWarning, stacklevel=2)
    return input_ids, attention_mask


class UnknownWordsWarning(UserWarning):
    """Prompt words the tokenizer has no token for (they become its unknown token)."""


def unknown_words(prompts: Sequence[str], input_ids_BxL: np.ndarray, unk_id: int | None,
                  encodings: Sequence[Any] | None = None) -> list[str]:
    """The distinct words of `prompts` that became the unknown token `unk_id` in `input_ids_BxL`, in order of
    appearance, cut out of the prompts by the fast tokenizer's `encodings[i].offsets` ('<unk>' per token without
    them). Empty when `unk_id` is None."""
    if unk_id is None:
        return []
    words: list[str] = []
    for row, prompt in enumerate(prompts):
        for position in np.nonzero(np.asarray(input_ids_BxL[row]) == unk_id)[0]:
            if encodings is not None:
                start, end = encodings[row].offsets[int(position)]
                word = prompt[start:end] or "<unk>"
            else:
                word = "<unk>"
            if word not in words:
                words.append(word)
    return words


SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5
# How a musical key ("F# minor") becomes words: "split" into tonic and mode words ("f", "#", "minor"); "word": one
# word "f# minor"; "both": the split words followed by the one word "f#minor" (tonic and mode words shared across
# keys, plus a key embedding that needs no binding of mode to tonic in the encoder).
KEY_STYLES = ("split", "word", "both")
_TONIC_NAMES = tuple(t + accidental for t in "abcdefg" for accidental in ("", "#", "b"))


def _key_rules(keys: str) -> tuple[list, str]:
    """(normalizers after lower-casing, regex alternative that keeps a key as one pre-token) for a `KEY_STYLES`."""
    from tokenizers import Regex, normalizers

    if keys not in KEY_STYLES:
        raise ValueError(f"keys={keys!r}: choose one of {', '.join(KEY_STYLES)}")
    if keys == "split":
        return [], ""
    if keys == "word":
        return [], r"\b[a-g][#b]? (?:major|minor)\b|"
    rules = [normalizers.Replace(Regex(rf"\b{tonic} {mode}\b"), f"{tonic} {mode} {tonic}{mode}")
             for tonic in _TONIC_NAMES for mode in ("major", "minor")]  # tokenizers' Replace has no backreferences
    return rules, r"\b[a-g][#b]?(?:major|minor)\b|"


def train_word_tokenizer(texts: Sequence[str], directory: str, min_frequency: int = 1, keys: str = "split") -> str:
    """Trains a word-level tokenizer on `texts` and saves it as a transformers tokenizer in `directory` -> path.

    T5's conventions: pad id 0, `</s>` (id 1) appended to every prompt, unknown words map to `<unk>` (id 2), right
    padding. Text is lower-cased (a prompt's capitals do not matter), and words and punctuation are split as
    `\\w+|[^\\w\\s]+`; `keys` (one of `KEY_STYLES`) says how a key name ("F# minor") becomes words.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("no texts to train a tokenizer on")
    key_normalizers, key_pattern = _key_rules(keys)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), *key_normalizers])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(key_pattern + r"\w+|[^\w\s]+"), behavior="removed",
                                             invert=True)  # the matches are the words
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=min_frequency)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   padding_side="right")
    os.makedirs(directory, exist_ok=True)
    fast.save_pretrained(directory)
    return directory


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mgjax.text.tokenizer MANIFEST.jsonl OUT_DIR`: a word-level tokenizer of the manifest's captions."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Train a word-level tokenizer on the captions of a JSONL manifest")
    parser.add_argument("manifest", help="JSONL with a 'description' per line (e.g. a synth corpus manifest)")
    parser.add_argument("out", help="output directory (transformers tokenizer files)")
    parser.add_argument("--min-frequency", type=int, default=1)
    parser.add_argument("--keys", choices=KEY_STYLES, default="split",
                        help='how a key name ("F# minor") becomes words: "f" "#" "minor" (split, the demo model), '
                             'one word (word), or both (both)')
    args = parser.parse_args(argv)
    try:
        with open(args.manifest) as f:
            texts = [json.loads(line).get("description", "") for line in f if line.strip()]
    except FileNotFoundError:
        parser.error(f"manifest {args.manifest} does not exist (make one with python -m mgjax.synth OUT_DIR)")
    except (json.JSONDecodeError, AttributeError) as err:
        parser.error(f"{args.manifest} is not a JSONL manifest with one object per line: {err}")
    if not any(texts):
        parser.error(f"{args.manifest} has no 'description' to learn words from")
    train_word_tokenizer(texts, args.out, args.min_frequency, keys=args.keys)
    size = len(load_tokenizer(args.out))
    print(f"tokenizer with {size} tokens written to {args.out} (set text.vocab_size >= {size})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
