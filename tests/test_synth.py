"""Synthetic corpus: determinism, clip format, captions that state the attributes, held-out pairs, corpus files."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile

from mgjax import synth
from mgjax.data import read_manifest


def test_same_seed_same_clip_and_caption():
    wav, text, attrs = synth.clip_example(3, 5)
    wav2, text2, attrs2 = synth.clip_example(3, 5)
    np.testing.assert_array_equal(wav, wav2)
    assert (text, attrs) == (text2, attrs2)
    other = [synth.clip_example(4, 5), synth.clip_example(3, 6)]
    assert all(o[1] != text or not np.array_equal(o[0], wav) for o in other)


@pytest.mark.parametrize("seconds,rate", [(4.0, 32000), (1.3, 16000)])
def test_clip_length_rate_and_peak(seconds, rate):
    for instrument in synth.ATTRIBUTE_VALUES["instrument"]:
        attrs = synth.sample_attributes(np.random.default_rng(1))
        attrs.update(instrument=instrument, drums=instrument in ("sine", "saw"))
        wav = synth.render_clip(attrs, seconds, rate, np.random.default_rng(2))
        assert wav.shape == (round(seconds * rate),) and wav.dtype == np.float32
        assert np.all(np.isfinite(wav))
        assert np.max(np.abs(wav)) == pytest.approx(synth.PEAK, abs=1e-6)


def test_sampled_attributes_are_consistent_and_cover_every_value():
    rng = np.random.default_rng(0)
    draws = [synth.sample_attributes(rng) for _ in range(600)]
    for a in draws:
        lo, hi = synth.TEMPO_RANGES[a["tempo"]]
        assert lo <= a["bpm"] <= hi and synth.tempo_bucket(a["bpm"]) == a["tempo"]
        assert a["key"] == f"{a['tonic']} {a['mode']}" and a["key"] in synth.KEYS
        json.dumps(a)  # JSON-friendly: plain str / int / bool
    for name, values in synth.ATTRIBUTE_VALUES.items():
        assert {a[name] for a in draws} == set(values), name


def test_tempo_bucket():
    assert [synth.tempo_bucket(b) for b in (40, 70, 90, 94, 100, 120, 126, 130, 160, 200)] == \
        ["slow", "slow", "slow", "slow", "medium", "medium", "fast", "fast", "fast", "fast"]


def test_captions_state_the_attributes():
    rng = np.random.default_rng(7)
    texts = set()
    for _ in range(400):
        attrs = synth.sample_attributes(rng)
        text = synth.caption(attrs, rng)
        texts.add(text)
        parsed = synth.parse_caption(text)
        for name in ("instrument", "drums", "tonic", "mode", "key", "tempo", "figure"):
            assert parsed[name] == attrs[name], (name, text)
        assert parsed["bpm"] in (None, attrs["bpm"])
        assert attrs["key"] in text
    assert len(texts) == 400  # varied wording


def test_brief_style_captions_parse():
    assert synth.parse_caption("an upbeat chiptune melody in A minor with drums, 140 bpm") == {
        "instrument": "square", "drums": True, "tonic": "A", "mode": "minor", "key": "A minor", "bpm": 140,
        "tempo": "fast", "figure": None}
    parsed = synth.parse_caption("slow sine pad arpeggio in D major, no drums")
    assert (parsed["instrument"], parsed["drums"], parsed["key"], parsed["tempo"], parsed["figure"]) == \
        ("sine", False, "D major", "slow", "arpeggio")


def test_held_out_combinations():
    pairs = synth.held_out_combinations(0)
    assert pairs == synth.held_out_combinations(0) and pairs != synth.held_out_combinations(1)
    assert len(pairs) == 12 and len({k for _, k in pairs}) == 12  # no key held out twice
    kept = {(i, k) for i in synth.ATTRIBUTE_VALUES["instrument"] for k in synth.KEYS} - set(pairs)
    assert {i for i, _ in kept} == set(synth.ATTRIBUTE_VALUES["instrument"]) and {k for _, k in kept} == set(synth.KEYS)
    rng = np.random.default_rng(0)
    assert all((a["instrument"], a["key"]) not in pairs
               for a in (synth.sample_attributes(rng, exclude=pairs) for _ in range(300)))


def test_karplus_strong_is_in_tune():
    rate = 32000
    for midi in (47, 60, 71, 78):
        freq = float(synth.midi_to_hz(midi))
        wav = synth.karplus_strong(freq, rate, rate, np.random.default_rng(midi))
        spectrum = np.abs(np.fft.rfft(wav * np.hanning(rate), 8 * rate))  # 1/8 Hz bins
        peak = np.argmax(spectrum[: int(1.5 * freq * 8)]) / 8
        assert abs(1200 * np.log2(peak / freq)) < 10, midi  # cents


def test_generate_corpus_files(tmp_path):
    out = str(tmp_path / "corpus")
    manifest = synth.generate_corpus(out, 4, seed=5, seconds=1.0, holdout=True, n_heldout=3)
    lines = [json.loads(line) for line in open(manifest)]
    held = [json.loads(line) for line in open(os.path.join(out, "heldout.jsonl"))]
    info = json.load(open(os.path.join(out, "corpus.json")))
    pairs = {tuple(p) for p in info["held_out_combinations"]}
    assert info["open_on_third"] is False
    assert pairs == set(synth.held_out_combinations(5)) and len(lines) == 4 and len(held) == 3
    for item in lines + held:
        wav, rate = soundfile.read(os.path.join(out, item["path"]), dtype="float32")
        assert rate == 32000 and wav.shape == (32000,) and item["duration"] == 1.0
        assert json.load(open(os.path.join(out, item["path"][:-4] + ".json")))["description"] == item["description"]
        assert synth.parse_caption(item["description"])["key"] == item["attributes"]["key"]
    assert all((i["attributes"]["instrument"], i["attributes"]["key"]) not in pairs for i in lines)
    assert all((i["attributes"]["instrument"], i["attributes"]["key"]) in pairs for i in held)
    entries = read_manifest(manifest)  # what training reads
    assert [e.description for e in entries] == [i["description"] for i in lines]
    assert not [f for _, _, files in os.walk(out) for f in files if f.startswith(".tmp")]
    before = open(manifest).read(), open(os.path.join(out, "clips/00000.wav"), "rb").read()
    synth.generate_corpus(out, 4, seed=5, seconds=1.0, holdout=True, n_heldout=3)
    assert (open(manifest).read(), open(os.path.join(out, "clips/00000.wav"), "rb").read()) == before


def test_cli_holdout_seed_keeps_out_another_corpus_pairs(tmp_path):
    """A second corpus (new seed, longer clips) made to fine-tune on holds out the first corpus's combinations."""
    out = str(tmp_path / "long")
    assert synth.main([out, "--clips", "6", "--heldout", "0", "--seed", "1", "--seconds", "0.5",
                       "--holdout-seed", "0"]) == 0
    pairs = set(synth.held_out_combinations(0))
    assert pairs != set(synth.held_out_combinations(1))
    info = json.load(open(os.path.join(out, "corpus.json")))
    assert {tuple(p) for p in info["held_out_combinations"]} == pairs and info["seed"] == 1
    lines = [json.loads(line) for line in open(os.path.join(out, "manifest.jsonl"))]
    assert len(lines) == 6 and all(item["duration"] == 0.5 for item in lines)
    assert all((i["attributes"]["instrument"], i["attributes"]["key"]) not in pairs for i in lines)


def test_n_heldout_needs_pairs(tmp_path):
    with pytest.raises(ValueError, match="holdout"):
        synth.generate_corpus(str(tmp_path), 1, n_heldout=2)


def test_open_on_third_states_the_mode_in_the_first_half_beat():
    """With `open_on_third` the first half beat sounds the mode's third (E for C major, Eb for C minor) louder than
    the other mode's; without it (control) that half beat says nothing about the mode (about chance)."""
    from mgjax.eval import attributes

    def mode_heard(open_on_third: bool) -> float:
        right = []
        for i in range(32):
            attrs = synth.sample_attributes(np.random.default_rng([9, i]))
            attrs["drums"] = False
            wav = synth.render_clip(attrs, 4.0, 32000, np.random.default_rng(i), open_on_third=open_on_third)
            half_beat = wav[:int(0.5 * 60 / attrs["bpm"] * 32000)]
            profile = attributes.chroma(half_beat, 32000, n_fft=4096, hop=512)
            tonic = synth.TONICS.index(attrs["tonic"])
            right.append((profile[(tonic + 4) % 12] > profile[(tonic + 3) % 12]) == (attrs["mode"] == "major"))
        return float(np.mean(right))

    assert mode_heard(True) >= 0.95
    assert mode_heard(False) <= 0.7


def test_open_on_third_keeps_attributes_and_caption():
    plain, chord = synth.clip_example(2, 7), synth.clip_example(2, 7, open_on_third=True)
    assert plain[1:] == chord[1:] and not np.array_equal(plain[0], chord[0])
