"""A labelled synthetic music corpus: short mono clips with known attributes and captions built from them.

Every clip is a melodic figure over a chord progression (two beats per chord, a bar of tonic first; eighth notes,
sixteenths for scale runs; the notes on the beat accented) played by one instrument, optionally over a kick + snare
kit on the beat. The attributes are

    instrument  'sine' (soft pad), 'square' (chiptune lead), 'saw' (sawtooth bass), 'pluck' (Karplus-Strong string)
    drums       True / False (sine kick on every beat, noise snare on 2 and 4)
    tonic, mode 12 tonics x 'major' / 'minor'  (`key` = "A minor")
    bpm, tempo  bpm drawn from a bucket: slow 70-90, medium 100-120, fast 130-160
    figure      'arpeggio' (chord tones), 'scale' (stepwise runs), 'walk' (random walk on the scale)

Everything is numpy and a pure function of a `np.random.Generator`, so a corpus is a pure function of its seed.
Waveforms are band-limited (additive partials below `MAX_PARTIAL_HZ`), so nothing aliases. The musical choices
(tonic-first progressions, chord tones on the beats, accents, a kick on every beat) are there so that the
attributes are audible in 4 s, and `mgjax.eval.attributes` recovers them from the audio.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Iterable

import numpy as np

SAMPLE_RATE = 32000
TONICS = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
TEMPO_RANGES = {"slow": (70, 90), "medium": (100, 120), "fast": (130, 160)}
ATTRIBUTE_VALUES = {
    "instrument": ("sine", "square", "saw", "pluck"),
    "drums": (False, True),
    "tonic": TONICS,
    "mode": ("major", "minor"),
    "tempo": tuple(TEMPO_RANGES),
    "figure": ("arpeggio", "scale", "walk"),
}
KEYS = tuple(f"{t} {m}" for m in ATTRIBUTE_VALUES["mode"] for t in TONICS)
MAX_PARTIAL_HZ = 12000.0
PEAK = 0.8

# Scale steps (semitones) of degrees 0..6; minor melodies over the V chord use the raised 7th (harmonic minor).
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
# Chord roots as scale degrees, two beats each: a bar of tonic, then the subdominant (which holds the 4th degree)
# or a chord leading back, so even a slow 4 s clip (five beats) tells its key from its relatives'.
PROGRESSIONS = {
    "major": ((0, 0, 3, 4), (0, 0, 1, 4), (0, 0, 3, 0), (0, 0, 5, 4)),
    "minor": ((0, 0, 3, 4), (0, 0, 3, 0), (0, 0, 5, 4), (0, 0, 6, 4)),
}
# Chord tones (degrees above the chord root) of the arpeggio shapes: within a fifth keeps the range narrow.
ARPEGGIOS = ((0, 2, 4, 2), (0, 4, 2, 4), (0, 2, 0, 4), (0, 4, 0, 2))
# Scale runs in sixteenths (degrees above the chord root): up the octave, up and back, down and back from the fifth.
SCALE_RUNS = ((0, 1, 2, 3, 4, 5, 6, 7), (0, 1, 2, 3, 4, 3, 2, 1), (4, 3, 2, 1, 0, 1, 2, 3))
# Lowest MIDI tonic of each instrument (the tonic is the first note of its pitch class from there). Melodies span
# about -8 .. +12 semitones around the tonic (chords on degrees 4-6 sit below it), so a register spans
# REGISTER - 8 .. REGISTER + 23: saw 36-67 (65-392 Hz), sine 52-83, square 59-90, pluck 47-78.
REGISTER = {"sine": 60, "square": 67, "saw": 44, "pluck": 55}
LEVEL = {"sine": 1.0, "square": 0.55, "saw": 0.6, "pluck": 1.0}
DRUM_LEVEL = 0.8  # drum kit RMS / instrument RMS
KICK_BEATS, SNARE_BEATS, SNARE_LEVEL = (0, 1, 2, 3), (1, 3), 0.6  # four on the floor, backbeat snare
OFFBEAT = 0.4  # velocity of the notes between beats: the accents are what makes the beat audible


# ----------------------------------------------------------------------------------------------- attributes

def tempo_bucket(bpm: float) -> str:
    """'slow' / 'medium' / 'fast': the bucket whose range holds `bpm`, else the nearest one."""
    def distance(bucket: str) -> float:
        lo, hi = TEMPO_RANGES[bucket]
        return max(lo - bpm, 0.0, bpm - hi)
    return min(TEMPO_RANGES, key=distance)


def sample_attributes(rng: np.random.Generator, exclude: Iterable[tuple[str, str]] = ()) -> dict:
    """Uniformly drawn attributes (JSON-friendly dict); `exclude`: (instrument, key) pairs never drawn."""
    exclude = set(exclude)
    while True:
        pick = {name: values[rng.integers(len(values))] for name, values in ATTRIBUTE_VALUES.items()}
        lo, hi = TEMPO_RANGES[pick["tempo"]]
        attrs = {"instrument": str(pick["instrument"]), "drums": bool(pick["drums"]), "tonic": str(pick["tonic"]),
                 "mode": str(pick["mode"]), "key": f"{pick['tonic']} {pick['mode']}",
                 "bpm": int(rng.integers(lo, hi + 1)), "tempo": str(pick["tempo"]), "figure": str(pick["figure"])}
        if (attrs["instrument"], attrs["key"]) not in exclude:
            return attrs


def held_out_combinations(seed: int, per_instrument: int = 3) -> list[tuple[str, str]]:
    """(instrument, key) pairs kept out of training, a pure function of `seed`.

    Each instrument loses `per_instrument` keys and no key is lost by two instruments, so every instrument and every
    key still occurs in training: the held-out pairs test composition, not unseen words.
    """
    rng = np.random.default_rng([seed, 0x5EED])
    keys = [KEYS[i] for i in rng.permutation(len(KEYS))]
    pairs = []
    for i, instrument in enumerate(ATTRIBUTE_VALUES["instrument"]):
        pairs += [(instrument, key) for key in keys[i * per_instrument:(i + 1) * per_instrument]]
    return pairs


# ----------------------------------------------------------------------------------------------- the score

def midi_to_hz(midi: np.ndarray | float) -> np.ndarray:
    return 440.0 * 2.0 ** ((np.asarray(midi, np.float64) - 69.0) / 12.0)


def figure_degrees(figure: str, root: int, rng: np.random.Generator) -> list[int]:
    """Scale degrees (relative to the tonic) of one figure over the chord on degree `root`, played evenly over its
    two beats: 4 notes (eighths) for an arpeggio or a walk, 8 (sixteenths) for a scale run.

    The first note is the chord root and the notes on the beats (accented) are chord tones, so the harmony, and
    with it the key, is audible whatever the figure.
    """
    if figure == "arpeggio":
        return [root + d for d in ARPEGGIOS[rng.integers(len(ARPEGGIOS))]]
    if figure == "scale":
        return [root + d for d in SCALE_RUNS[rng.integers(len(SCALE_RUNS))]]
    if figure == "walk":
        degrees = [root]
        for i in range(1, 4):
            nxt = degrees[-1] + int(rng.choice([-2, -1, 1, 2]))
            if i == 2:  # on the beat: steered to the nearest chord tone
                nxt = min((root + t for t in (0, 2, 4)), key=lambda d: (abs(d - nxt), rng.random()))
            degrees.append(int(np.clip(nxt, root - 2, root + 4)))
        return degrees
    raise ValueError(f"unknown figure {figure!r}; choose one of {', '.join(ATTRIBUTE_VALUES['figure'])}")


def degree_to_midi(degree: int, mode: str, tonic_midi: int, chord_root: int) -> int:
    """MIDI note of a scale degree (octaves folded); minor over the V chord raises the 7th (harmonic minor)."""
    octave, step = divmod(degree, 7)
    semitone = SCALES[mode][step]
    if mode == "minor" and chord_root % 7 == 4 and step == 6:
        semitone += 1
    return tonic_midi + 12 * octave + semitone


def score(attrs: dict, seconds: float, rng: np.random.Generator, open_on_third: bool = False
          ) -> list[tuple[float, float, int, float]]:
    """The notes of a clip: `(onset s, duration s, midi, velocity)`; notes on a beat are accented.

    `open_on_third`: the clip's first note is the tonic's third instead of the figure's first note, so the first sound
    states the mode as well as the tonic (else the mode is first heard at the first third or sixth, a few notes in).
    A third under the tonic (a chord) does not do it: the demo codec's first codebook keeps the louder note.
    """
    beat = 60.0 / attrs["bpm"]
    mode = attrs["mode"]
    low = REGISTER[attrs["instrument"]]
    tonic_midi = low + (TONICS.index(attrs["tonic"]) - low) % 12
    progression = PROGRESSIONS[mode][rng.integers(len(PROGRESSIONS[mode]))]
    notes = []
    for chord in range(int(np.ceil(seconds / (2 * beat)))):
        root = progression[chord % len(progression)]
        placed = root if root <= 3 else root - 7  # IV is the highest chord root, V-VII sit below the tonic
        degrees = figure_degrees(attrs["figure"], placed, rng)
        slot = 2 * beat / len(degrees)
        per_beat = len(degrees) // 2
        for j, degree in enumerate(degrees):
            onset = 2 * beat * chord + j * slot
            if onset < seconds:
                velocity = 1.0 if j % per_beat == 0 else OFFBEAT
                if open_on_third and chord == 0 and j == 0:
                    degree = 2
                notes.append((onset, slot, degree_to_midi(degree, mode, tonic_midi, root), velocity))
    return notes


# ----------------------------------------------------------------------------------------------- instruments

def envelope(n: int, sample_rate: int, attack: float, release: float) -> np.ndarray:
    """[n] linear attack / release ramps around a flat sustain."""
    env = np.ones(n)
    a = min(int(attack * sample_rate), n // 2)
    r = min(int(release * sample_rate), n - a)
    if a:
        env[:a] = np.linspace(0.0, 1.0, a, endpoint=False)
    if r:
        env[n - r:] *= np.linspace(1.0, 0.0, r)
    return env


def additive(freq: float, n: int, sample_rate: int, harmonics: np.ndarray, amps: np.ndarray,
             phase: float = 0.0) -> np.ndarray:
    """[n] sum of `amps[h] * sin(2 pi harmonics[h] f t)` over the partials below MAX_PARTIAL_HZ."""
    keep = harmonics * freq < min(MAX_PARTIAL_HZ, 0.45 * sample_rate)
    t = np.arange(n) / sample_rate
    return amps[keep] @ np.sin(2 * np.pi * freq * harmonics[keep, None] * t[None] + phase)


def karplus_strong(freq: float, n: int, sample_rate: int, rng: np.random.Generator, t60: float = 0.6
                   ) -> np.ndarray:
    """[n] a plucked string: a noise burst circulating in a delay line whose loop filter damps the partials.

    Loop filter: [1/4, 1/2, 1/4] (delay 1) convolved with linear interpolation [1-f, f] (delay f), so the loop delay
    is `N + 1 + f = sample_rate / freq` exactly at low frequency. Every tap lies at least N samples back, so each
    block of N samples is computed at once from the previous ones. A loss per period makes the fundamental fall by
    60 dB in `t60` seconds whatever the pitch (a plain KS string would ring for seconds at low notes).
    """
    period = sample_rate / freq
    frac = period - np.floor(period)
    delay = int(np.floor(period)) - 1
    decay = 10.0 ** (-3.0 / (t60 * freq))
    taps = decay * np.convolve([0.25, 0.5, 0.25], [1.0 - frac, frac])  # [4] at lags delay .. delay+3
    y = np.zeros(n + 3)  # 3 leading zeros so lag delay+3 of the first block reads silence
    # Excitation: the string's initial shape, a triangle plucked at a random point (partials ~1/n^2, so the
    # fundamental leads as on a real string) plus a little noise for the attack.
    at = rng.uniform(0.15, 0.35)
    x = np.arange(delay) / delay
    burst = np.where(x < at, x / at, (1.0 - x) / (1.0 - at)) + 0.2 * rng.uniform(-1.0, 1.0, delay)
    y[3:3 + delay] = burst - burst.mean()
    for start in range(3 + delay, n + 3, delay):
        stop = min(start + delay, n + 3)
        y[start:stop] = sum(taps[k] * y[start - delay - k:stop - delay - k] for k in range(4))
    return y[3:]


def render_note(instrument: str, freq: float, n: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """[n] one note of `instrument` at `freq` Hz, unit-ish level, with its envelope."""
    harmonics = np.arange(1, 61, dtype=np.float64)
    if instrument == "sine":
        return additive(freq, n, sample_rate, harmonics[:1], np.ones(1)) * envelope(n, sample_rate, 0.01, 0.04)
    if instrument == "square":
        amps = np.where(harmonics % 2 == 1, 1.0 / harmonics, 0.0)
        return additive(freq, n, sample_rate, harmonics, amps) * envelope(n, sample_rate, 0.004, 0.02)
    if instrument == "saw":
        return additive(freq, n, sample_rate, harmonics, 1.0 / harmonics) * envelope(n, sample_rate, 0.004, 0.02)
    if instrument == "pluck":
        return karplus_strong(freq, n, sample_rate, rng) * envelope(n, sample_rate, 0.0, 0.01)
    raise ValueError(f"unknown instrument {instrument!r}; choose one of {', '.join(ATTRIBUTE_VALUES['instrument'])}")


def drum_track(bpm: float, n: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """[n] sine kick (pitch falling 150 -> 48 Hz, below every instrument's notes) on KICK_BEATS and noise snare on
    SNARE_BEATS of each 4-beat bar."""
    beat = 60.0 / bpm
    out = np.zeros(n)
    length = int(0.25 * sample_rate)
    t = np.arange(length) / sample_rate
    freq = 48.0 + 100.0 * np.exp(-t / 0.015)
    kick = np.sin(2 * np.pi * np.cumsum(freq) / sample_rate) * np.exp(-t / 0.12)
    for i in range(int(np.ceil(n / (beat * sample_rate)))):
        start = int(round(i * beat * sample_rate))
        stop = min(start + length, n)
        if start >= n:
            break
        if i % 4 in KICK_BEATS:
            out[start:stop] += kick[:stop - start]
        if i % 4 in SNARE_BEATS:
            noise = rng.standard_normal(length)
            hit = 0.5 * (noise - np.concatenate([[0.0], noise[:-1]])) * np.exp(-t / 0.06)  # first difference: brighter
            hit += 0.4 * np.sin(2 * np.pi * 190.0 * t) * np.exp(-t / 0.04)
            out[start:stop] += SNARE_LEVEL * hit[:stop - start]
    return out


def render_clip(attrs: dict, seconds: float = 4.0, sample_rate: int = SAMPLE_RATE,
                rng: np.random.Generator | None = None, open_on_third: bool = False) -> np.ndarray:
    """[N = round(seconds * sample_rate)] float32 mono clip of `attrs`, peak-normalised to PEAK (`open_on_third`:
    see `score`)."""
    rng = np.random.default_rng(0) if rng is None else rng
    n = int(round(seconds * sample_rate))
    out = np.zeros(n)
    instrument = attrs["instrument"]
    ring = {"sine": 1.0, "pluck": 1.6}.get(instrument, 0.85)  # note length / slot: pads legato, plucks ring on
    for onset, duration, midi, velocity in score(attrs, seconds, rng, open_on_third):
        start = int(round(onset * sample_rate))
        length = min(int(duration * ring * sample_rate), n - start)
        if length > 16:
            out[start:start + length] += velocity * LEVEL[instrument] * render_note(
                instrument, float(midi_to_hz(midi)), length, sample_rate, rng)
    if attrs["drums"]:
        drums = drum_track(attrs["bpm"], n, sample_rate, rng)
        out += DRUM_LEVEL * np.sqrt(np.mean(out ** 2) / max(np.mean(drums ** 2), 1e-12)) * drums
    return (PEAK * out / max(np.max(np.abs(out)), 1e-9)).astype(np.float32)


# ----------------------------------------------------------------------------------------------- captions

INSTRUMENT_WORDS = {
    "sine": ("sine pad", "soft sine pad", "warm synth pad", "mellow sine-wave pad", "ambient pad"),
    "square": ("chiptune lead", "square-wave lead", "8-bit lead", "retro chiptune synth", "chiptune melody"),
    "saw": ("sawtooth bass", "saw bass", "buzzy sawtooth bassline", "synth bass", "sawtooth bassline"),
    "pluck": ("plucked string", "pizzicato string", "plucked harp", "plucked guitar", "Karplus-Strong pluck"),
}
TEMPO_WORDS = {
    "slow": ("slow", "laid-back", "relaxed", "unhurried"),
    "medium": ("medium-tempo", "moderate", "mid-tempo", "steady"),
    "fast": ("fast", "upbeat", "energetic", "quick"),
}
FIGURE_WORDS = {
    "arpeggio": ("arpeggio", "arpeggiated melody", "broken-chord figure"),
    "scale": ("scale run", "running scale", "scale passage"),
    "walk": ("wandering melody", "meandering line", "random-walk melody"),
}
DRUM_WORDS = {
    True: ("with drums", "with a drum beat", "with kick and snare", "over a simple beat"),
    False: ("no drums", "without drums", "without percussion", "no percussion"),
}
# {a_tempo} / {a_instrument}: the article for the word that follows it.
TEMPLATES = (
    "{a_tempo} {tempo} {instrument} {figure} in {key}, {drums}, {bpm} bpm",
    "{tempo} {instrument} {figure} in {key}, {drums}",
    "{instrument} playing {a_tempo} {tempo} {figure} in the key of {key}, {drums}",
    "{key} {figure} on {a_instrument} {instrument}, {tempo}, {drums}, {bpm} bpm",
    "{drums_cap}: {a_tempo} {tempo} {figure} for {a_instrument} {instrument} in {key}",
    "{a_instrument} {instrument} {figure}, {key}, {bpm} bpm, {drums}",
    "{tempo} {key} {instrument} {figure} {drums}",
)


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou8" else "a"


def caption(attrs: dict, rng: np.random.Generator) -> str:
    """A caption naming every attribute (tempo as a word, a bpm or both), in one of several templates/synonyms."""
    def pick(options):
        return options[rng.integers(len(options))]
    template = pick(TEMPLATES)
    tempo, instrument = pick(TEMPO_WORDS[attrs["tempo"]]), pick(INSTRUMENT_WORDS[attrs["instrument"]])
    drums = pick(DRUM_WORDS[attrs["drums"]])
    text = template.format(
        tempo=tempo, a_tempo=_article(tempo), instrument=instrument, a_instrument=_article(instrument),
        figure=pick(FIGURE_WORDS[attrs["figure"]]), key=attrs["key"], drums=drums,
        drums_cap=drums[0].upper() + drums[1:], bpm=attrs["bpm"])
    return text[0].upper() + text[1:]


def _longest_match(text: str, words: dict) -> object:
    """The value whose synonym occurs in `text` (longest synonym wins, so 'saw bass' is not 'sawtooth'), or None."""
    hits = [(len(w), value) for value, options in words.items() for w in options
            if re.search(r"(?<![\w-])" + re.escape(w.lower()) + r"(?![\w-])", text)]
    return max(hits, key=lambda h: h[0])[1] if hits else None


def parse_caption(text: str) -> dict:
    """The attributes a caption states (inverse of `caption`); missing ones are None. bpm decides the tempo."""
    lower = text.lower()
    key = re.search(r"(?<![\w#])([a-g](?:#|b)?) (major|minor)\b", lower)
    bpm = re.search(r"(\d+) bpm", lower)
    tonic = None
    if key:
        tonic = next(t for t in TONICS if t.lower() == key.group(1))
    tempo = tempo_bucket(int(bpm.group(1))) if bpm else _longest_match(lower, TEMPO_WORDS)
    return {"instrument": _longest_match(lower, INSTRUMENT_WORDS), "drums": _longest_match(lower, DRUM_WORDS),
            "tonic": tonic, "mode": key.group(2) if key else None,
            "key": f"{tonic} {key.group(2)}" if key else None, "bpm": int(bpm.group(1)) if bpm else None,
            "tempo": tempo, "figure": _longest_match(lower, FIGURE_WORDS)}


# ----------------------------------------------------------------------------------------------- the corpus

def _write_text_atomic(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def clip_example(seed: int, index: int, seconds: float = 4.0, sample_rate: int = SAMPLE_RATE,
                 exclude: Iterable[tuple[str, str]] = (), only: Iterable[tuple[str, str]] | None = None,
                 open_on_third: bool = False) -> tuple[np.ndarray, str, dict]:
    """(wav [N] float32, caption, attributes) of clip `index` of corpus `seed`; a pure function of its arguments.

    `exclude`: (instrument, key) pairs never drawn; `only`: draw the (instrument, key) pair from this list instead;
    `open_on_third`: the clip's first note is the tonic's third (see `score`; the attributes and caption are the same).
    """
    attrs_rng, audio_rng, text_rng = (np.random.default_rng(s) for s in np.random.SeedSequence([seed, index]).spawn(3))
    attrs = sample_attributes(attrs_rng, exclude)
    if only is not None:
        only = list(only)
        attrs["instrument"], attrs["key"] = only[attrs_rng.integers(len(only))]
        attrs["tonic"], attrs["mode"] = attrs["key"].split(" ")
    return render_clip(attrs, seconds, sample_rate, audio_rng, open_on_third), caption(attrs, text_rng), attrs


def generate_corpus(out_dir: str, n_clips: int, seed: int = 0, seconds: float = 4.0,
                    sample_rate: int = SAMPLE_RATE, holdout: bool | Iterable[tuple[str, str]] = False,
                    n_heldout: int = 0, open_on_third: bool = False) -> str:
    """Writes `n_clips` clips and returns the path of their JSONL manifest (`<out_dir>/manifest.jsonl`).

    Files: `clips/00000.wav` (16-bit) + `clips/00000.json` (`{description, duration, attributes}`, the sidecar
    `mgjax.data` reads) per clip, and one manifest line `{path, description, duration, attributes}` per clip.
    `holdout`: True for `held_out_combinations(seed)`, or a list of (instrument, key) pairs: training clips never
    use them, and `n_heldout` clips made only of them go to `heldout/` + `<out_dir>/heldout.jsonl` (for the
    adherence evaluation). `open_on_third`: every clip's first note is its tonic's third (see `score`). Every file
    is written atomically; rerunning overwrites the same content.
    """
    from mgjax.audio import write_wav

    pairs = held_out_combinations(seed) if holdout is True else list(holdout or [])
    splits = [("manifest.jsonl", "clips", n_clips, {"exclude": pairs})]
    if n_heldout:
        if not pairs:
            raise ValueError("n_heldout > 0 needs held-out combinations: pass holdout=True or a list of pairs")
        splits.append(("heldout.jsonl", "heldout", n_heldout, {"only": pairs}))
    for manifest, folder, count, draw in splits:
        os.makedirs(os.path.join(out_dir, folder), exist_ok=True)
        lines = []
        for i in range(count):
            index = i if folder == "clips" else 1_000_000 + i  # held-out clips draw from their own streams
            wav, text, attrs = clip_example(seed, index, seconds, sample_rate, **draw, open_on_third=open_on_third)
            rel = f"{folder}/{i:05d}.wav"
            write_wav(os.path.join(out_dir, rel), wav[None], sample_rate)
            meta = {"description": text, "duration": len(wav) / sample_rate, "attributes": attrs}
            _write_text_atomic(os.path.join(out_dir, rel[:-4] + ".json"), json.dumps(meta) + "\n")
            lines.append(json.dumps({"path": rel, **meta}))
        _write_text_atomic(os.path.join(out_dir, manifest), "\n".join(lines) + "\n")
    info = {"seed": seed, "n_clips": n_clips, "n_heldout": n_heldout, "seconds": seconds, "sample_rate": sample_rate,
            "open_on_third": open_on_third, "held_out_combinations": [list(p) for p in pairs]}
    _write_text_atomic(os.path.join(out_dir, "corpus.json"), json.dumps(info, indent=1) + "\n")
    return os.path.join(out_dir, "manifest.jsonl")


def main(argv: Iterable[str] | None = None) -> int:
    """`python -m mgjax.synth OUT_DIR --clips N --heldout M --seed S [--holdout-seed H] [--open-on-third]`: writes a
    corpus (see `generate_corpus`)."""
    import argparse

    parser = argparse.ArgumentParser(description="Write a labelled synthetic music corpus")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--clips", type=int, default=1000, help="training clips (held-out combinations excluded)")
    parser.add_argument("--heldout", type=int, default=64, help="clips of the held-out (instrument, key) pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--holdout-seed", type=int, default=None,
                        help="keep out the held-out combinations of the corpus of this seed (default: --seed), so "
                             "a second corpus with new clips, e.g. longer ones to fine-tune on, holds out the same")
    parser.add_argument("--open-on-third", action="store_true",
                        help="every clip's first note is its tonic's third, so its first sound states the mode "
                             "(an experiment; the shipped demo model's corpus is made without it)")
    args = parser.parse_args(None if argv is None else list(argv))
    holdout = True if args.holdout_seed is None else held_out_combinations(args.holdout_seed)
    path = generate_corpus(args.out, args.clips, args.seed, args.seconds, holdout=holdout, n_heldout=args.heldout,
                           open_on_third=args.open_on_third)
    print(f"{args.clips} clips + {args.heldout} held out written; manifest {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
