"""Prompt adherence of a MusicGen checkpoint (default: the shipped demo model) on held-out attribute combinations.

The captions are those of the synth corpus's held-out clips: (instrument, key) pairs that training never saw
(`mgjax.synth.held_out_combinations(corpus_seed)`), every word of them seen in other combinations. For each caption
the model generates a clip; the estimators of `mgjax.eval.attributes` (key by chroma templates, tempo by onset
autocorrelation, instrument by harmonic levels, drums by kick-band energy) read the attributes back, and their
accuracy is printed next to chance and next to the same estimators on the real held-out clips (the ceiling) and on
those clips passed through the model's codec (what the codec keeps). Also prints the sampling speed, and the LM's
teacher-forced loss on the real clips with each caption as written and edited (mode swapped, tonic moved, another
clip's caption): an edit that leaves the loss unchanged names an attribute the model does not read. Clips longer
than the model's window (`--seconds 8` for the demo model's 4 s) are also scored window by window, and their loss is
taken window by window as generation writes them, each window's new frames after its prompt also on their own.

    python bench/eval_adherence.py [--checkpoint mgjax/assets/demo] [--clips 64] [--batch 16] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ATTRIBUTES = ("key", "tonic", "mode", "tempo", "instrument", "drums")
# The floors for the demo model on held-out combinations.
TARGETS = {"key": 0.50, "tempo": 0.60, "instrument": 0.70}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=os.path.join(ROOT, "mgjax", "assets", "demo"))
    parser.add_argument("--clips", type=int, default=64, help="held-out captions to generate")
    parser.add_argument("--batch", type=int, default=16, help="captions generated together")
    parser.add_argument("--corpus-seed", type=int, default=0, help="seed of the corpus the model was trained on")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of the generated and real clips")
    parser.add_argument("--open-on-third", action="store_true",
                        help="the real clips open on their tonic's third: for a model trained on a corpus made with "
                             "`python -m mgjax.synth --open-on-third` (the shipped one was not)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--top-k", type=int, default=250)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--save-wavs", default=None, metavar="DIR", help="write the generated clips here")
    return parser.parse_args(argv)


def held_out_examples(corpus_seed: int, count: int, seconds: float, sample_rate: int, open_on_third: bool
                      ) -> list[tuple]:
    """`(wav [N], caption, attributes)` of the corpus's first `count` held-out clips (as `generate_corpus` draws
    them: index 1_000_000 + i, (instrument, key) only from the held-out pairs)."""
    from mgjax import synth

    pairs = synth.held_out_combinations(corpus_seed)
    return [synth.clip_example(corpus_seed, 1_000_000 + i, seconds, sample_rate, only=pairs,
                               open_on_third=open_on_third) for i in range(count)]


def generate_all(mg, captions: list[str], args) -> tuple[np.ndarray, dict]:
    """Generated wavs `[count, C, N]` in batches, and the speed (the first batch, which compiles, timed apart)."""
    wavs, timings = [], []
    for start in range(0, len(captions), args.batch):
        chunk = captions[start:start + args.batch]
        chunk = chunk + [chunk[-1]] * (args.batch - len(chunk))  # one static batch shape: compiled once
        began = time.perf_counter()
        out = mg.generate(chunk, duration=args.seconds, top_k=args.top_k, temperature=args.temperature,
                          cfg_coef=args.cfg, seed=args.seed + start)
        timings.append(time.perf_counter() - began)
        wavs.append(out.wav[:len(captions) - start])
    steady = timings[1:] or timings
    audio_per_batch = args.batch * args.seconds
    speed = {"first_batch_s": timings[0], "steady_batch_s": float(np.mean(steady)),
             "audio_seconds_per_second": audio_per_batch / float(np.mean(steady)), "batch": args.batch}
    return np.concatenate(wavs)[:len(captions)], speed


def window_segments(wavs: np.ndarray, sample_rate: int, window_seconds: float) -> dict[str, np.ndarray]:
    """Generated clips `[count, C, N]` longer than the model's window, cut into whole windows, each scored on its
    own: `{"generated, s 0-4": [count, C, n], "generated, s 4-8": ...}`. A trailing part shorter than half a
    window is left out (too short for the tempo estimator); nothing when the clips fit in one window."""
    n = int(round(window_seconds * sample_rate))
    if wavs.shape[-1] <= n:
        return {}
    segments = {}
    for start in range(0, wavs.shape[-1], n):
        piece = wavs[..., start:start + n]
        if piece.shape[-1] < n // 2:
            break
        segments[f"generated, s {start / sample_rate:g}-{(start + piece.shape[-1]) / sample_rate:g}"] = piece
    return segments


def edited_captions(captions: list[str], truths: list[dict]) -> dict[str, list[str]]:
    """The captions as written, with major/minor swapped, with the tonic moved up a fourth, and each with the next
    clip's caption: what the LM's loss should be sensitive to if it reads each attribute."""
    from mgjax import synth

    def replace_key(text, attrs, key):
        if attrs["key"] not in text:  # an edit that changes nothing would read as "the model ignores this word"
            raise ValueError(f"caption {text!r} does not name its key {attrs['key']!r}")
        return text.replace(attrs["key"], key)

    def swap_mode(text, attrs):
        other = "minor" if attrs["mode"] == "major" else "major"
        return replace_key(text, attrs, f"{attrs['tonic']} {other}")

    def move_tonic(text, attrs):
        tonic = synth.TONICS[(synth.TONICS.index(attrs["tonic"]) + 5) % 12]
        return replace_key(text, attrs, f"{tonic} {attrs['mode']}")

    return {"as written": captions,
            "major/minor swapped": [swap_mode(c, a) for c, a in zip(captions, truths)],
            "tonic moved a fourth": [move_tonic(c, a) for c, a in zip(captions, truths)],
            "another clip's caption": captions[1:] + captions[:1]}


def caption_sensitivity(mg, codes: np.ndarray, captions: list[str], truths: list[dict],
                        batch: int) -> tuple[dict, dict]:
    """Teacher-forced LM loss on the real clips' codes `[count, K, T]` under each edit of `edited_captions` (no
    dropout, no CFG). An attribute whose edit leaves the loss unchanged is one the model does not read. Clips past
    the model's window are read window by window as generation writes them (`mgjax.api.window_plan`), so every
    frame is scored once, with the context it is generated from. Returns ({edit: loss}, {"s a-b": loss as written} per
    window's scored frames)."""
    import jax
    import jax.numpy as jnp

    from mgjax import training
    from mgjax.api import window_plan

    params = {name: value for name, value in mg.params.items() if name != "codec"}
    step = jax.jit(lambda p, b: training.eval_step(mg.config, p, {}, b))
    window, stride = mg.window_frames()
    frames = codes.shape[-1]
    plans = [(start, min(start + window, frames), first_new)
             for start, first_new in window_plan(frames, window, stride)]  # (start, end, scored_from)
    losses, by_window = {}, {}
    for name, texts in edited_captions(captions, truths).items():
        sums = np.zeros(len(plans))
        tokens = np.zeros(len(plans))
        for i in range(0, len(texts), batch):
            ids, mask = mg.tokenize(texts[i:i + batch])
            for w, (start, end, scored_from) in enumerate(plans):
                chunk = codes[i:i + batch, :, start:end]
                scored = np.zeros((chunk.shape[0], end - start), np.int32)
                scored[:, scored_from - start:] = 1  # the window's prompt is context, not scored
                out = step(params, {"codes": jnp.asarray(chunk), "text_ids": jnp.asarray(ids),
                                    "text_mask": jnp.asarray(mask), "mask": jnp.asarray(scored)})
                sums[w] += float(out["loss"]) * float(out["tokens"])
                tokens[w] += float(out["tokens"])
        losses[name] = float(sums.sum() / tokens.sum())
        if name == "as written":
            rate = mg.frame_rate
            by_window = {f"s {scored_from / rate:g}-{end / rate:g}": float(sums[w] / tokens[w])
                         for w, (_, end, scored_from) in enumerate(plans)}
    return losses, by_window


def table(results: dict[str, dict], chance: dict) -> str:
    columns = list(results)
    lines = ["| attribute | " + " | ".join(columns) + " | chance | target |",
             "|---" * (len(columns) + 3) + "|"]
    for name in ATTRIBUTES:
        cells = [f"{results[c][name]:.1%}" for c in columns]
        target = f">= {TARGETS[name]:.0%}" if name in TARGETS else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {chance[name]:.1%} | {target} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import mgjax
    from mgjax.audio import write_wav
    from mgjax.eval import attributes

    mg = mgjax.MusicGen.load(args.checkpoint)
    sr = mg.sample_rate
    examples = held_out_examples(args.corpus_seed, args.clips, args.seconds, sr, args.open_on_third)
    real = np.stack([wav for wav, _, _ in examples])[:, None]  # [count, 1, N]
    captions = [text for _, text, _ in examples]
    truths = [attrs for _, _, attrs in examples]
    print(f"{args.checkpoint}: {len(captions)} held-out captions, e.g. {captions[0]!r}", flush=True)

    generated, speed = generate_all(mg, captions, args)
    real_codes = np.concatenate([np.asarray(mg.encode(real[i:i + args.batch]))
                                 for i in range(0, len(real), args.batch)])  # [count, K, T]
    reconstructed = np.concatenate([np.asarray(mg.decode(real_codes[i:i + args.batch]))
                                    for i in range(0, len(real), args.batch)])
    if args.save_wavs:
        for i, wav in enumerate(generated):
            write_wav(os.path.join(args.save_wavs, f"{i:03d}.wav"), wav, sr)

    def score(wavs):
        return attributes.accuracy([attributes.estimate_attributes(w, sr) for w in wavs], truths)

    results = {"generated": score(generated)}
    # Past the window, generation goes window by window: each window is scored too (drift shows there).
    results.update({name: score(part) for name, part in
                    window_segments(generated, sr, mg.config.lm.max_duration).items()})
    results.update({"real clips (ceiling)": score(real), "real through the codec": score(reconstructed)})
    print(table(results, attributes.CHANCE))
    sensitivity, by_window = caption_sensitivity(mg, real_codes, captions, truths, args.batch)
    print("teacher-forced loss on the real clips by caption: " + ", ".join(
        f"{name} {loss:.4f}" + ("" if name == "as written" else f" ({loss - sensitivity['as written']:+.4f})")
        for name, loss in sensitivity.items()))
    if len(by_window) > 1:
        print("  as written, by the frames each window generates: " + ", ".join(
            f"{name} {loss:.4f}" for name, loss in by_window.items()))
    print(f"sampling: {speed['audio_seconds_per_second']:.2f} s of audio per s (batch {args.batch}, CFG "
          f"{args.cfg}, {args.seconds:g} s clips; first batch with compilation {speed['first_batch_s']:.1f} s, "
          f"then {speed['steady_batch_s']:.1f} s per batch)")
    met = {name: results["generated"][name] >= floor for name, floor in TARGETS.items()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "chance": attributes.CHANCE, "speed": speed, "targets_met": met,
                       "caption_sensitivity": sensitivity, "loss_by_window": by_window, "args": vars(args)},
                      f, indent=1)
    print("targets met: " + ", ".join(f"{n} {'yes' if ok else 'NO'}" for n, ok in met.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
