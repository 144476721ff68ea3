"""Training data: audio files with captions -> codes cached on disk -> fixed-shape batches.

Sources (`train.data_dir`):
- a folder searched recursively for audio files (wav, flac, ogg, mp3, aiff), each with an optional sidecar caption:
  `song.json` (`{"description": ..., "input_ids": [...]}`, both optional) or `song.txt` (the description);
- a JSONL manifest, one `{"path": ..., "description": ..., "duration": ..., "input_ids": [...]}` per line (relative
  paths are relative to the manifest);
- several of these joined by commas (`a/manifest.jsonl,b/`): their files together, each file once.

Every file is read once by `mgjax.audio.load_audio` (the reader, channel rule and resampler that prompts and melodies
go through too), encoded and cached as `<cache_dir>/<sha1(path, mtime, size, codec config, codec weights, resampler,
...)>.npz` (see `cache_key`); a file that cannot be read or encoded is reported with a warning and skipped. Each
host keeps only its shard of the files (`process_index::process_count`).

Batches are a pure function of `(seed, step, global row)`: resuming at step s reproduces the data exactly, and the
global batch does not depend on the number of hosts. A batch (this host's rows, `Bl = B / num_hosts`) is
    codes      int32 [Bl, K, T]   a random segment of T = segment_duration * frame_rate frames, zero padded
    mask       bool  [Bl, T]      True on real frames (False on the padding of files shorter than a segment)
    text_ids   int32 [Bl, L]      caption tokens, L = train.max_text_tokens (padded / truncated)
    text_mask  int32 [Bl, L]      1 on tokens; all 0 for an empty caption (the null condition)
    chroma     float [Bl, F, 12]  melody models only (`CodeCache(chroma=True)`): one-hot chroma of the segment,
                                  cut from the whole file's chroma (no demucs stem separation, unlike audiocraft)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from typing import Any, Callable, Sequence

import numpy as np

from mgjax.audio import RESAMPLER, channels_to_batch, codes_from_batch, conform, load_audio
from mgjax.config import TrainConfig, to_dict

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")


class DataError(ValueError):
    """Training data that is missing or unusable as a whole (single bad files are skipped with a warning)."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One audio file and its caption (`input_ids`: caption tokens given directly, for runs without a tokenizer)."""

    path: str
    description: str = ""
    duration: float | None = None
    input_ids: tuple[int, ...] | None = None


# ----------------------------------------------------------------------------------------------- listing files

def _caption_fields(meta: dict, where: str) -> tuple[str, tuple[int, ...] | None]:
    description = meta.get("description", "") or ""
    if not isinstance(description, str):
        raise DataError(f"{where}: 'description' must be a string, got {type(description).__name__}")
    ids = meta.get("input_ids")
    return description.strip(), (tuple(int(i) for i in ids) if ids is not None else None)


def read_sidecar(audio_path: str) -> tuple[str, tuple[int, ...] | None]:
    """(description, input_ids or None) from `<stem>.json` or `<stem>.txt` beside the audio file; ("", None) if none."""
    stem = os.path.splitext(audio_path)[0]
    if os.path.isfile(stem + ".json"):
        with open(stem + ".json") as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise DataError(f"{stem}.json must hold an object with 'description', got {type(meta).__name__}")
        return _caption_fields(meta, stem + ".json")
    if os.path.isfile(stem + ".txt"):
        with open(stem + ".txt") as f:
            return f.read().strip(), None
    return "", None


def read_manifest(path: str) -> list[Entry]:
    """Entries of a JSONL manifest (`{path, description, duration, input_ids}` per line)."""
    base = os.path.dirname(os.path.abspath(path))
    entries = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number} is not valid JSON ({err})") from None
            if not isinstance(item, dict) or "path" not in item:
                raise DataError(f"{path}:{number} needs an object with a 'path' key, got {line.strip()[:80]!r}")
            description, ids = _caption_fields(item, f"{path}:{number}")
            audio = item["path"] if os.path.isabs(item["path"]) else os.path.join(base, item["path"])
            duration = item.get("duration")
            entries.append(Entry(audio, description, None if duration is None else float(duration), ids))
    return entries


def scan_entries(sources: str) -> list[Entry]:
    """Entries of a data folder (audio files + sidecars), a `.jsonl` manifest, or several of them joined by commas,
    sorted by path."""
    if not sources.strip():
        raise DataError("no training data: set train.data_dir to a folder of audio files or a .jsonl manifest "
                        "(or pass --synthetic)")
    parts = [part.strip() for part in sources.split(",")]
    if not all(parts):
        raise DataError(f"train.data_dir {sources!r} has an empty source between its commas")
    if len(parts) == 1:  # keeps a folder's walk order, which the batches of existing runs depend on
        return _source_entries(parts[0])
    unique = {}  # a file that two sources list is read once, with the caption of the first source naming it
    for part in parts:
        for entry in _source_entries(part):
            unique.setdefault(os.path.abspath(entry.path), entry)
    return sorted(unique.values(), key=lambda e: e.path)


def _source_entries(source: str) -> list[Entry]:
    """Entries of one data folder or `.jsonl` manifest, sorted by path."""
    if os.path.isfile(source):
        if not source.endswith((".jsonl", ".json")):
            raise DataError(f"{source} is a file but not a .jsonl manifest")
        return sorted(read_manifest(source), key=lambda e: e.path)
    if not os.path.isdir(source):
        raise DataError(f"training data {source!r} does not exist (expected a folder of audio files or a .jsonl "
                        f"manifest)")
    entries = []
    for root, dirs, files in os.walk(source):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(AUDIO_EXTENSIONS):
                path = os.path.join(root, name)
                try:
                    description, ids = read_sidecar(path)
                except (OSError, ValueError) as err:
                    warnings.warn(f"skipping {path}: unreadable caption ({err})")
                    continue
                entries.append(Entry(path, description, None, ids))
    if not entries:
        raise DataError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) under {source}")
    return entries


def shard_entries(entries: Sequence[Entry], process_index: int, process_count: int) -> list[Entry]:
    """This host's files: every `process_count`-th entry starting at `process_index`."""
    return list(entries[process_index::process_count])


def split_valid(entries: Sequence[Entry], fraction: float) -> tuple[list[Entry], list[Entry]]:
    """(train, valid): a file is held out when a hash of its path falls below `fraction`. The path is taken relative
    to the folder that holds every entry, so the split is the same on every host and wherever the corpus lies."""
    if not entries:
        return [], []
    paths = [os.path.abspath(e.path) for e in entries]
    root = os.path.commonpath([os.path.dirname(p) for p in paths])

    def held_out(path: str) -> bool:
        digest = hashlib.sha1(os.path.relpath(path, root).replace(os.sep, "/").encode()).digest()
        return int.from_bytes(digest[:4], "big") / 2 ** 32 < fraction
    flags = [held_out(p) for p in paths]
    return ([e for e, out in zip(entries, flags) if not out], [e for e, out in zip(entries, flags) if out])


# ----------------------------------------------------------------------------------------------- audio -> codes

def encode_in_chunks(encode: Callable[[np.ndarray], Any], wav: np.ndarray, chunk: int, hop: int) -> np.ndarray:
    """`[C, N]` -> codes `[K, ceil(N / hop)]`, encoding fixed-size chunks of `chunk` samples (bounded memory); the
    last chunk is zero padded. A file shorter than `chunk` is encoded as one chunk of its length rounded up to a
    power of two frames, so short clips do not pay for a whole chunk of padding while compiles stay few (one per
    power of two). `encode`: `[1, C, L]` -> `[1, K, L / hop]`."""
    frames = -(-wav.shape[-1] // hop)
    chunk = min(chunk, hop * (1 << max(0, frames - 1).bit_length()))
    pieces = []
    for start in range(0, wav.shape[-1], chunk):
        piece = wav[:, start:start + chunk]
        piece = np.pad(piece, ((0, 0), (0, chunk - piece.shape[-1])))
        pieces.append(np.asarray(encode(piece[None]))[0])
    return np.concatenate(pieces, axis=-1)[:, :frames].astype(np.int32)


def params_fingerprint(params: Any) -> str:
    """A short hash of a param tree's values (so caches of different codec weights never mix)."""
    import jax

    digest = hashlib.sha1()
    for leaf in jax.tree.leaves(params):
        leaf = np.asarray(leaf, np.float64)
        digest.update(np.array([leaf.size, leaf.sum(), np.abs(leaf).sum()]).tobytes())
    return digest.hexdigest()[:16]


# Bumped when the way files are encoded changes (2: short files as one power-of-two chunk; 3: audio read, channel
# matched and resampled by `mgjax.audio`, the key naming its resampler), so old caches miss.
CACHE_VERSION = 3


def cache_key(path: str, codec_config: Any, codec_fingerprint: str = "", chunk: int = 0) -> str:
    """sha1 of (absolute path, mtime, size, codec config, codec weights, chunk size, resampler, cache version): a
    changed file, codec, resampler (`mgjax.audio.RESAMPLER`) or encoding misses."""
    stat = os.stat(path)
    payload = json.dumps([os.path.abspath(path), stat.st_mtime_ns, stat.st_size, to_dict(codec_config),
                          codec_fingerprint, chunk, RESAMPLER, CACHE_VERSION], sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()


def melody_chroma(wav: np.ndarray, sample_rate: int, bucket: int) -> np.ndarray:
    """`[C, N]` -> one-hot chroma `[F, 12]` of the whole file (mgjax.conditioning.chroma, 32 kHz, hop 4096).

    The audio is zero padded to a multiple of `bucket` samples (one compiled STFT per bucket count, not per file
    length) and the frames of the padding dropped; only the last frame or two see the padding.
    """
    from mgjax.conditioning import chroma as chroma_lib

    mono = conform(wav, sample_rate, chroma_lib.SAMPLE_RATE, 1)[0]
    frames = chroma_lib.num_frames(mono.size)
    padded = np.pad(mono, (0, -mono.size % bucket))
    return np.asarray(chroma_lib.chroma_features(padded[None]))[0, :frames].astype(np.float32)


class CodeCache:
    """Codes of audio files (and, with `chroma=True`, their melody chroma), computed once with `codec` and stored
    as npz files in `directory`. `stereo=True` (stereo LMs over a mono codec): each file is read as two channels,
    each coded on its own, and the codebooks interleaved left/right, `[2K, T]` as `MusicGen.encode` gives them."""

    def __init__(self, directory: str, codec: Any, chunk_seconds: float = 30.0, chroma: bool = False,
                 stereo: bool = False):
        if stereo and codec.config.channels != 1:
            raise ValueError(f"stereo codes come from a mono codec; this codec has {codec.config.channels} channels")
        self.directory = directory
        self.codec = codec
        self.chroma = chroma
        self.stereo = stereo
        hop = codec.config.hop_length
        self.chunk = max(1, int(round(chunk_seconds * codec.config.sample_rate / hop))) * hop
        self.fingerprint = (params_fingerprint(codec.params) + ("+chroma" if chroma else "")
                            + ("+stereo" if stereo else ""))
        os.makedirs(directory, exist_ok=True)

    def path_for(self, audio_path: str) -> str:
        key = cache_key(audio_path, self.codec.config, self.fingerprint, self.chunk)
        return os.path.join(self.directory, key + ".npz")

    def features(self, entry: Entry) -> dict[str, np.ndarray] | None:
        """`{'codes': int32 [K, T], ['chroma': float32 [F, 12]]}` of `entry`, or None (with a warning) if the file
        cannot be read or encoded."""
        try:
            cached = self.path_for(entry.path)
            if os.path.isfile(cached):
                try:
                    with np.load(cached) as stored:
                        return {key: stored[key] for key in stored.files}
                except (OSError, ValueError, KeyError):
                    pass  # a torn cache file: encode again
            config = self.codec.config
            wav = load_audio(entry.path, config.sample_rate, 2 if self.stereo else config.channels)
            rows = channels_to_batch(wav[None]) if self.stereo else wav[None]  # [2, 1, N] (left, right) or [1, C, N]
            codes = np.stack([encode_in_chunks(self.codec.encode, row, self.chunk, config.hop_length) for row in rows])
            out = {"codes": codes_from_batch(codes, 1)[0]}  # [K, T], or [2K, T] interleaved left/right
            if self.chroma:
                out["chroma"] = melody_chroma(wav, config.sample_rate, self.chunk)
            tmp = cached + f".tmp-{os.getpid()}.npz"
            np.savez(tmp, **out)
            os.replace(tmp, cached)  # atomic: concurrent hosts never read half a file
            return out
        except Exception as err:  # any unreadable/corrupt file is skipped, never fatal
            warnings.warn(f"skipping {entry.path}: {type(err).__name__}: {err}")
            return None

    def codes(self, entry: Entry) -> np.ndarray | None:
        """int32 `[K, T]` codes of `entry`, or None (see `features`)."""
        features = self.features(entry)
        return None if features is None else features["codes"]


# ----------------------------------------------------------------------------------------------- text

def fit_tokens(ids: Sequence[int], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids -> (ids `[length]` int32, mask `[length]` int32), truncated or zero padded."""
    ids = np.asarray(list(ids)[:length], np.int32)
    out = np.zeros(length, np.int32)
    out[:ids.size] = ids
    mask = np.zeros(length, np.int32)
    mask[:ids.size] = 1
    return out, mask


def caption_tokens(entry: Entry, tokenizer: Any, length: int) -> tuple[np.ndarray, np.ndarray]:
    """An entry's caption -> (ids `[length]`, mask `[length]`); an empty caption is the null condition."""
    if entry.input_ids is not None and (tokenizer is None or not entry.description):
        return fit_tokens(entry.input_ids, length)
    if not entry.description:
        return fit_tokens((), length)
    from mgjax.text.tokenizer import tokenize

    ids, mask = tokenize(tokenizer, [entry.description])
    return fit_tokens(ids[0][mask[0] > 0], length)


# ----------------------------------------------------------------------------------------------- batches

def row_rng(seed: int, step: int, row: int, stream: int = 0) -> np.random.Generator:
    """The generator of one global batch row: the data is a pure function of (seed, step, row)."""
    return np.random.default_rng([seed, stream, step, row])


def crop(codes: np.ndarray, frames: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """codes `[K, T]` -> (a random window `[K, frames]` zero padded, mask `[frames]` bool, its first frame)."""
    start = int(rng.integers(0, max(codes.shape[-1] - frames, 0) + 1))
    window = codes[:, start:start + frames]
    mask = np.arange(frames) < window.shape[-1]
    return np.pad(window, ((0, 0), (0, frames - window.shape[-1]))), mask, start


def crop_chroma(chroma: np.ndarray, start_sample: int, num_samples: int) -> np.ndarray:
    """The chroma frames `[F_seg, 12]` of a segment cut from a file's chroma `[F, 12]` (hop 4096 at 32 kHz); frames
    past the end are the null melody (one-hot on bin 0, the chroma of silence)."""
    from mgjax.conditioning import chroma as chroma_lib

    count = chroma_lib.num_frames(num_samples)
    first = int(round(start_sample / chroma_lib.HOP_LENGTH))
    window = chroma[first:first + count]
    pad = np.zeros((count - window.shape[0], chroma.shape[1]), np.float32)
    pad[:, 0] = 1.0
    return np.concatenate([window, pad])


def local_rows(batch_size: int, process_index: int, process_count: int) -> range:
    """The global rows of a batch that this host produces."""
    if batch_size % process_count:
        raise DataError(f"train.batch_size={batch_size} is not divisible by the {process_count} hosts")
    per_host = batch_size // process_count
    return range(process_index * per_host, (process_index + 1) * per_host)


def _host(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax
        return jax.process_index(), jax.process_count()
    return process_index, process_count


class AudioDataset:
    """Cached codes of this host's files, and their batches (see the module docstring)."""

    def __init__(self, entries: Sequence[Entry], cache: CodeCache, train: TrainConfig, *, tokenizer: Any = None,
                 process_index: int | None = None, process_count: int | None = None, stream: int = 0,
                 shard_files: bool = True):
        """`shard_files=False`: every host reads every file (small sets, e.g. validation); rows stay per host."""
        self.train, self.tokenizer, self.stream = train, tokenizer, stream
        self.process_index, self.process_count = _host(process_index, process_count)
        self.frames = int(round(train.segment_duration * cache.codec.config.frame_rate))
        mine = shard_entries(entries, self.process_index, self.process_count) if shard_files else list(entries)
        if tokenizer is None:
            missing = [e.path for e in mine if e.description and e.input_ids is None]
            if missing:
                raise DataError(f"{len(missing)} captions need a tokenizer (e.g. {missing[0]}): set train.pretrained "
                                f"or train.tokenizer_dir, or give 'input_ids' in the sidecar/manifest")
        self.chroma = cache.chroma
        self.hop = cache.codec.config.hop_length * (32000 / cache.codec.config.sample_rate)  # in 32 kHz samples
        self.items: list[tuple[dict, np.ndarray, np.ndarray]] = []
        for entry in mine:
            features = cache.features(entry)
            if features is not None:
                self.items.append((features,) + caption_tokens(entry, tokenizer, train.max_text_tokens))
        if not self.items:
            raise DataError(f"host {self.process_index}: none of its {len(mine)} audio files could be used "
                            f"(see the warnings above)")

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This host's rows of the batch of `step`."""
        out: dict[str, list] = {"codes": [], "mask": [], "text_ids": [], "text_mask": []}
        for row in local_rows(self.train.batch_size, self.process_index, self.process_count):
            rng = row_rng(self.train.seed, step, row, self.stream)
            features, ids, ids_mask = self.items[int(rng.integers(len(self.items)))]
            codes, mask, start = crop(features["codes"], self.frames, rng)
            for key, value in zip(out, (codes, mask, ids, ids_mask)):
                out[key].append(value)
            if self.chroma:
                out.setdefault("chroma", []).append(
                    crop_chroma(features["chroma"], int(start * self.hop), int(self.frames * self.hop)))
        return {key: np.stack(values) for key, values in out.items()}


class SyntheticDataset:
    """Structured random codes without audio: learnable, so loss curves mean something.

    Each row draws one of `num_classes` classes; a class fixes a caption (token ids) and, per codebook, a motif of
    `motif` distinct tokens repeated over time from a random phase. A quarter of the rows are shorter than the
    segment (padding mask exercised). The best achievable loss is far below log(card).
    """

    def __init__(self, train: TrainConfig, num_codebooks: int, card: int, frame_rate: float, text_vocab: int, *,
                 num_classes: int = 8, motif: int = 4, process_index: int | None = None,
                 process_count: int | None = None, stream: int = 0):
        self.train, self.stream, self.card = train, stream, card
        self.process_index, self.process_count = _host(process_index, process_count)
        self.frames = max(1, int(round(train.segment_duration * frame_rate)))
        classes = np.random.default_rng([train.seed, 12345])
        self.motifs = np.stack([np.stack([classes.choice(card, size=min(motif, card), replace=False)
                                          for _ in range(num_codebooks)]) for _ in range(num_classes)])
        caption_len = min(4, train.max_text_tokens)
        self.captions = [fit_tokens(1 + classes.integers(0, max(text_vocab - 1, 1), caption_len),
                                    train.max_text_tokens) for _ in range(num_classes)]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        codes, masks, ids, ids_mask = [], [], [], []
        for row in local_rows(self.train.batch_size, self.process_index, self.process_count):
            rng = row_rng(self.train.seed, step, row, self.stream)
            cls = int(rng.integers(len(self.motifs)))
            motif = self.motifs[cls]
            phase = int(rng.integers(motif.shape[1]))
            codes.append(motif[:, (np.arange(self.frames) + phase) % motif.shape[1]].astype(np.int32))
            length = self.frames if rng.random() >= 0.25 else int(rng.integers(self.frames // 2 + 1, self.frames + 1))
            mask = np.arange(self.frames) < length
            codes[-1] = np.where(mask, codes[-1], 0)
            masks.append(mask)
            ids.append(self.captions[cls][0])
            ids_mask.append(self.captions[cls][1])
        return {"codes": np.stack(codes), "mask": np.stack(masks), "text_ids": np.stack(ids),
                "text_mask": np.stack(ids_mask)}
