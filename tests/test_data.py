"""Data pipeline: captions (sidecars, manifest), resampling, the code cache, bad files, host shards, batches."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import soundfile

from mgjax import audio, data
from mgjax.audio import load_audio
from mgjax.codec.encodec import Codec, init_codec_params
from mgjax.config import load_config

CONFIG = load_config("train-tiny", ["train.batch_size=4", "train.segment_duration=0.5", "train.max_text_tokens=6"])
FRAMES = 25  # 0.5 s at 50 frames/s


def sine(seconds: float, rate: int, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wav = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([wav] * channels, axis=1)  # [N, C] as soundfile writes it


class FakeCodec:
    """Stands in for EnCodec (whose init compiles for seconds): codes from each frame's mean level."""

    config = CONFIG.codec
    params = {"w": np.ones(3, np.float32)}

    def encode(self, wav_BxCxN):
        hop = self.config.hop_length
        frames = np.abs(np.asarray(wav_BxCxN)).reshape(wav_BxCxN.shape[0], -1, hop).mean(-1)  # [B, T]
        levels = (frames * 997).astype(np.int32)
        return np.stack([(levels + 7 * k) % self.config.codebook_size for k in range(self.config.n_q)], axis=1)


@pytest.fixture()
def codec():
    return FakeCodec()


@pytest.fixture()
def folder(tmp_path):
    """a.wav (stereo 16 kHz, 1 s) + a.txt; b.flac (0.3 s) + b.json with ids; sub/c.wav (no caption); bad.wav."""
    soundfile.write(tmp_path / "a.wav", sine(1.0, 16000, channels=2), 16000)
    (tmp_path / "a.txt").write_text("happy rock with drums\n")
    soundfile.write(tmp_path / "b.flac", sine(0.3, 32000, 220.0), 32000)
    (tmp_path / "b.json").write_text(json.dumps({"description": "calm piano", "input_ids": [5, 6, 7]}))
    os.makedirs(tmp_path / "sub")
    soundfile.write(tmp_path / "sub" / "c.wav", sine(0.8, 32000, 330.0), 32000)
    (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x00not really a wav file")
    return tmp_path


def cache_for(tmp_path, codec):
    return data.CodeCache(str(tmp_path / "cache"), codec, chunk_seconds=1.0)


def test_scan_reads_sidecars_and_sorts(folder):
    entries = data.scan_entries(str(folder))
    assert [os.path.relpath(e.path, folder) for e in entries] == ["a.wav", "b.flac", "bad.wav", "sub/c.wav"]
    by_name = {os.path.basename(e.path): e for e in entries}
    assert by_name["a.wav"].description == "happy rock with drums" and by_name["a.wav"].input_ids is None
    assert by_name["b.flac"].input_ids == (5, 6, 7) and by_name["c.wav"].description == ""


def test_manifest_with_relative_paths(folder):
    manifest = folder / "train.jsonl"
    manifest.write_text(json.dumps({"path": "b.flac", "description": "calm", "duration": 0.3}) + "\n\n"
                        + json.dumps({"path": str(folder / "a.wav"), "input_ids": [3, 4]}) + "\n")
    entries = data.scan_entries(str(manifest))
    assert [os.path.basename(e.path) for e in entries] == ["a.wav", "b.flac"]
    assert entries[1].duration == 0.3 and entries[0].input_ids == (3, 4)


def test_several_sources_joined_by_commas(folder, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    soundfile.write(other / "d.wav", sine(0.5, 32000), 32000)
    manifest = other / "m.jsonl"
    manifest.write_text(json.dumps({"path": "d.wav", "description": "long clip"}) + "\n")
    entries = data.scan_entries(f"{manifest}, {folder}")
    assert sorted(e.path for e in entries) == [e.path for e in entries]
    assert {os.path.basename(e.path) for e in entries} == {"a.wav", "b.flac", "bad.wav", "c.wav", "d.wav"}
    assert next(e for e in entries if e.path.endswith("d.wav")).description == "long clip"
    assert len(data.scan_entries(f"{manifest},{folder},{folder / 'sub'}")) == len(entries)  # c.wav once
    with pytest.raises(data.DataError, match="empty source"):
        data.scan_entries(f"{manifest},,{folder}")
    with pytest.raises(data.DataError, match="does not exist"):
        data.scan_entries(f"{manifest},/no/such/dir")


@pytest.mark.parametrize("source, message", [("", "set train.data_dir"), ("/no/such/dir", "does not exist")])
def test_missing_data_is_a_clear_error(source, message):
    with pytest.raises(data.DataError, match=message):
        data.scan_entries(source)


def test_empty_folder_and_bad_manifest_lines(tmp_path):
    with pytest.raises(data.DataError, match="no audio files"):
        data.scan_entries(str(tmp_path))
    (tmp_path / "m.jsonl").write_text('{"description": "no path"}\n')
    with pytest.raises(data.DataError, match="'path' key"):
        data.scan_entries(str(tmp_path / "m.jsonl"))


def test_load_audio_mixes_to_mono_and_resamples(folder):
    wav = load_audio(str(folder / "a.wav"), 32000, channels=1)
    assert wav.shape == (1, 32000) and wav.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(wav[0]))
    assert abs(np.argmax(spectrum) * 32000 / wav.shape[1] - 440.0) < 2.0  # pitch kept


def test_dataset_skips_bad_files_and_caches_codes(folder, codec, tmp_path):
    entries = [e for e in data.scan_entries(str(folder)) if e.description != "happy rock with drums"]
    cache = cache_for(tmp_path, codec)
    with pytest.warns(UserWarning, match="skipping .*bad.wav"):
        dataset = data.AudioDataset(entries, cache, CONFIG.train, process_index=0, process_count=1)
    assert len(dataset) == 2  # b.flac, sub/c.wav
    assert len([f for f in os.listdir(tmp_path / "cache") if f.endswith(".npz")]) == 2
    codes = {os.path.basename(e.path): cache.codes(e) for e in entries if "bad" not in os.path.basename(e.path)}
    assert codes["b.flac"].shape == (4, 15) and codes["c.wav"].shape == (4, 40)  # ceil(N / 640)
    assert codes["b.flac"].max() < CONFIG.lm.card

    class Exploding:  # a cache hit must not touch the codec
        config, params = codec.config, codec.params

        def encode(self, wav):
            raise AssertionError("re-encoded a cached file")

    warm = data.CodeCache(str(tmp_path / "cache"), Exploding(), chunk_seconds=1.0)
    again = data.AudioDataset(entries[:2], warm, CONFIG.train, process_index=0, process_count=1)
    np.testing.assert_array_equal(again.items[0][0]["codes"], codes["b.flac"])

    path = str(folder / "b.flac")
    key = data.cache_key(path, codec.config, "x")
    os.utime(path, ns=(1, 1))  # a touched file is encoded anew
    assert data.cache_key(path, codec.config, "x") != key


def test_batches_are_deterministic_and_padded(folder, codec, tmp_path):
    entries = [e for e in data.scan_entries(str(folder)) if e.input_ids or not e.description]
    entries = [e for e in entries if "bad" not in os.path.basename(e.path)]
    dataset = data.AudioDataset(entries, cache_for(tmp_path, codec), CONFIG.train, process_index=0, process_count=1)
    batch = dataset.batch(7)
    assert batch["codes"].shape == (4, 4, FRAMES) and batch["codes"].dtype == np.int32
    assert batch["mask"].shape == (4, FRAMES) and batch["text_ids"].shape == (4, 6)
    for key in batch:
        np.testing.assert_array_equal(batch[key], dataset.batch(7)[key])
    assert any(not np.array_equal(dataset.batch(7)["codes"], dataset.batch(s)["codes"]) for s in range(8, 12))
    rows = [dataset.batch(s) for s in range(20)]
    short = [r["mask"][i] for r in rows for i in range(4) if r["text_ids"][i][0] == 5]  # b.flac: 15 frames
    assert short and all(m.sum() == 15 and m[:15].all() for m in short)
    captionless = [r["text_mask"][i] for r in rows for i in range(4) if r["text_ids"][i][0] == 0]
    assert captionless and not np.any(captionless)  # empty caption: the null condition


def test_captions_through_a_tokenizer(folder, codec, tmp_path):
    from helpers_tokenizer import build_test_tokenizer
    from mgjax.text.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(build_test_tokenizer(str(tmp_path / "tok")))
    entry = data.Entry(str(folder / "a.wav"), "happy rock with drums")
    ids, mask = data.caption_tokens(entry, tokenizer, 8)
    assert mask.tolist() == [1, 1, 1, 1, 1, 0, 0, 0] and ids[4] == 1  # four words + </s>
    assert data.caption_tokens(data.Entry("x", "", None, (9, 8)), tokenizer, 3)[0].tolist() == [9, 8, 0]
    with pytest.raises(data.DataError, match="need a tokenizer"):
        data.AudioDataset([entry], cache_for(tmp_path, codec), CONFIG.train, process_index=0, process_count=1)


def test_each_host_reads_only_its_shard(folder, codec, tmp_path):
    entries = [e for e in data.scan_entries(str(folder))
               if "bad" not in os.path.basename(e.path) and e.description != "happy rock with drums"]
    shards = [data.shard_entries(entries, i, 2) for i in range(2)]
    assert sorted(e.path for s in shards for e in s) == sorted(e.path for e in entries)
    assert not set(e.path for e in shards[0]) & set(e.path for e in shards[1])
    host1 = data.AudioDataset(entries, cache_for(tmp_path, codec), CONFIG.train, process_index=1, process_count=2)
    assert len(host1) == len(shards[1]) and host1.batch(0)["codes"].shape[0] == 2  # half of the global batch


def test_synthetic_global_batch_does_not_depend_on_host_count():
    make = lambda i, n: data.SyntheticDataset(CONFIG.train, 4, 64, 50.0, 99, process_index=i, process_count=n)
    whole = make(0, 1).batch(3)
    halves = [make(i, 2).batch(3) for i in range(2)]
    for key in whole:
        np.testing.assert_array_equal(whole[key], np.concatenate([h[key] for h in halves]))
    assert not np.array_equal(whole["codes"], make(0, 1).batch(4)["codes"])
    assert whole["codes"].max() < 64 and (~whole["mask"]).any() or whole["mask"].all()


def test_valid_split_is_stable(folder):
    entries = data.scan_entries(str(folder))
    train, valid = data.split_valid(entries, 0.5)
    assert sorted(train + valid, key=lambda e: e.path) == entries
    assert data.split_valid(entries, 0.5) == (train, valid)
    assert data.split_valid(entries, 0.0) == (entries, [])
    assert 0 < len(valid) < len(entries)


def test_valid_split_does_not_depend_on_where_the_corpus_lies(folder, tmp_path_factory):
    """The same corpus copied elsewhere splits the same files out (a reproduced run validates on the same clips)."""
    import shutil

    copy = shutil.copytree(str(folder), str(tmp_path_factory.mktemp("elsewhere") / "corpus"))
    names = lambda split: [os.path.relpath(e.path, root) for e in split]
    splits = {}
    for root in (str(folder), copy):
        train, valid = data.split_valid(data.scan_entries(root), 0.5)
        splits[root] = (names(train), names(valid))
    assert splits[str(folder)] == splits[copy] and splits[copy][1]


def test_real_codec_end_to_end(folder, tmp_path):
    """The tiny EnCodec encodes each file in fixed chunks (one compiled shape), cached as npz."""
    # Random weights from the param shapes: the codec's own init takes seconds to compile.
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: init_codec_params(CONFIG.codec))
    codec = Codec(CONFIG.codec, jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), shapes))
    cache = data.CodeCache(str(tmp_path / "cache"), codec, chunk_seconds=0.4)
    entry = data.Entry(str(folder / "sub" / "c.wav"))
    codes = cache.codes(entry)
    assert codes.shape == (4, 40) and codes.dtype == np.int32 and codes.max() < CONFIG.lm.card
    first_chunk = np.asarray(codec.encode(load_audio(entry.path, 32000, 1)[None, :, :12800]))[0]
    np.testing.assert_array_equal(codes[:, :20], first_chunk)
    np.testing.assert_array_equal(cache.codes(entry), codes)  # from the cache file


def test_melody_chroma_is_cached_and_cut_per_segment(folder, codec, tmp_path):
    """Melody models get the one-hot chroma of each segment: a 330 Hz sine is an E (bin 4), 220 Hz an A (bin 9)."""
    cache = data.CodeCache(str(tmp_path / "cache"), codec, chunk_seconds=1.0, chroma=True)
    assert cache.path_for(str(folder / "b.flac")) != cache_for(tmp_path, codec).path_for(str(folder / "b.flac"))
    entries = [data.Entry(str(folder / "sub" / "c.wav"), "", None, (3,)), data.Entry(str(folder / "b.flac"), "",
                                                                                     None, (5,))]
    features = cache.features(entries[0])
    assert features["chroma"].shape == (7, 12)  # 1 + 25600 // 4096 frames
    assert np.all(features["chroma"].sum(-1) == 1) and np.argmax(features["chroma"][2]) == 4
    dataset = data.AudioDataset(entries, cache, CONFIG.train, process_index=0, process_count=1)
    batch = dataset.batch(0)
    assert batch["chroma"].shape == (4, 5, 12)  # 1 + max(16000, n_fft=16384) // 4096 frames for 0.5 s
    for row in range(4):
        expected = 4 if batch["text_ids"][row, 0] == 3 else 9
        assert np.argmax(batch["chroma"][row, 1]) == expected
    assert data.crop_chroma(features["chroma"], 32000 * 10, 16000)[:, 0].all()  # past the end: null melody


def test_stereo_codes_interleave_the_channels(codec, tmp_path):
    """Stereo LMs (`CodeCache(stereo=True)`): each channel coded on its own, codebooks interleaved left/right
    `[L0, R0, L1, R1, ...]`; a mono file is duplicated to both; the cache key tells stereo from mono."""
    left, right = sine(0.5, 32000, 330.0)[:, 0], 0.4 * sine(0.5, 32000, 220.0)[:, 0]
    soundfile.write(tmp_path / "lr.wav", np.stack([left, right], axis=1), 32000)
    cache = data.CodeCache(str(tmp_path / "cache"), codec, chunk_seconds=1.0, stereo=True)
    codes = cache.codes(data.Entry(str(tmp_path / "lr.wav")))
    mono_cache = cache_for(tmp_path, codec)
    assert cache.path_for(str(tmp_path / "lr.wav")) != mono_cache.path_for(str(tmp_path / "lr.wav"))
    hop, wav = CONFIG.codec.hop_length, load_audio(str(tmp_path / "lr.wav"), 32000, 2)
    for channel in range(2):
        alone = data.encode_in_chunks(codec.encode, wav[channel:channel + 1], cache.chunk, hop)
        np.testing.assert_array_equal(codes[channel::2], alone)
    assert codes.shape == (2 * CONFIG.codec.n_q, 25) and not np.array_equal(codes[0::2], codes[1::2])
    soundfile.write(tmp_path / "mono.wav", left, 32000)
    both = cache.codes(data.Entry(str(tmp_path / "mono.wav")))
    np.testing.assert_array_equal(both[0::2], both[1::2])


def test_cache_key_names_the_resampler(folder, codec, tmp_path, monkeypatch):
    """Cached codes depend on the resampler (files at another rate than the codec's): a changed
    `mgjax.audio.RESAMPLER` misses every cached file."""
    cache, path = cache_for(tmp_path, codec), str(folder / "a.wav")
    before = cache.path_for(path)
    monkeypatch.setattr(data, "RESAMPLER", audio.RESAMPLER + "-changed")
    assert cache.path_for(path) != before


def test_training_audio_goes_through_the_one_channel_rule(codec, tmp_path):
    """Training reads files as prompts are read: a 6-channel file is averaged for a mono codec, but is no stereo
    pair (skipped with the reason), where it used to be averaged and duplicated."""
    soundfile.write(tmp_path / "six.wav", np.repeat(sine(0.5, 32000), 6, axis=1), 32000)
    entry = data.Entry(str(tmp_path / "six.wav"))
    assert cache_for(tmp_path, codec).codes(entry).shape == (4, 25)
    stereo = data.CodeCache(str(tmp_path / "cache"), codec, chunk_seconds=1.0, stereo=True)
    with pytest.warns(UserWarning, match="cannot map 6 audio channels to 2"):
        assert stereo.codes(entry) is None
