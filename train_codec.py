"""Train a small EnCodec (the demo codec) on a synthetic corpus:

    python train_codec.py --config configs/demo-codec.yaml --corpus runs/synth-corpus --out runs/demo-codec \
        [--steps N] [--minutes M] [--make-corpus N] [section.key=value ...]

A missing corpus is generated first (`mgjax.synth.generate_corpus`, `--make-corpus` clips of 4 s plus
`--heldout` clips of held-out instrument/key combinations). Training draws random segments of the training clips
(a pure function of the seed and the step), logs losses to stdout and <out>/log.jsonl, evaluates on held-out clips
every `codec_train.eval_every` steps, writes training checkpoints to <out>/checkpoints (a rerun resumes from the
latest; `--fresh` starts over) and, at the end, the codec itself to <out>/codec (`mgjax.Codec.load(<out>/codec)`),
its held-out quality to <out>/quality.json and a few reconstructions to <out>/samples/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML with `codec` and `codec_train` sections")
    parser.add_argument("--corpus", required=True, help="synth corpus directory (manifest.jsonl [+ heldout.jsonl])")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. codec_train.batch_size=8")
    parser.add_argument("--steps", type=int, default=None, help="stop at this step (default codec_train.total_steps)")
    parser.add_argument("--minutes", type=float, default=None, help="also stop after this much wall time")
    parser.add_argument("--make-corpus", type=int, default=1000, metavar="N",
                        help="clips to generate when --corpus has no manifest (default 1000)")
    parser.add_argument("--heldout", type=int, default=64, help="held-out clips to generate with a new corpus")
    parser.add_argument("--corpus-seed", type=int, default=0, help="seed of a generated corpus")
    parser.add_argument("--eval-clips", type=int, default=None,
                        help="held-out clips of the final evaluation (default: all)")
    parser.add_argument("--no-attributes", action="store_true",
                        help="skip the attribute estimates of the final evaluation")
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")
    parser.add_argument("--quiet", action="store_true", help="no per-step logs")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------- data

def read_manifest(corpus: str, name: str) -> list[dict]:
    path = os.path.join(corpus, name)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_clips(corpus: str, entries: list[dict], sample_rate: int, channels: int) -> list:
    """`[C, N]` float32 arrays of the manifest entries (resampled / channel-matched to the codec)."""
    from mgjax.audio import load_audio

    return [load_audio(os.path.join(corpus, e["path"]), sample_rate, channels) for e in entries]


def ensure_corpus(args: argparse.Namespace, sample_rate: int) -> None:
    if os.path.isfile(os.path.join(args.corpus, "manifest.jsonl")):
        return
    from mgjax import synth

    print(f"generating a synth corpus in {args.corpus}: {args.make_corpus} clips + {args.heldout} held out, "
          f"seed {args.corpus_seed}", flush=True)
    synth.generate_corpus(args.corpus, args.make_corpus, seed=args.corpus_seed, sample_rate=sample_rate,
                          holdout=True, n_heldout=args.heldout)


def sample_batch(clips: list, seed: int, step: int, batch_size: int, length: int, stream: int = 0):
    """`[B, length, C]` float32 random segments; a pure function of (seed, stream, step), so resuming repeats the
    data (stream 0: training steps, 1: the batches the codebooks are initialised from)."""
    import numpy as np

    rng = np.random.default_rng([seed, stream, step])
    out = np.zeros((batch_size, length, clips[0].shape[0]), np.float32)
    for b in range(batch_size):
        clip = clips[rng.integers(len(clips))]
        start = rng.integers(0, max(1, clip.shape[1] - length + 1))
        piece = clip[:, start:start + length].T
        out[b, :len(piece)] = piece
    return out


# ----------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mgjax.runtime import keep_host_memory

    keep_host_memory()  # before JAX starts its threads: no page faults on each step's temp buffer
    from mgjax.checkpoint import CheckpointError

    try:
        return train(args)
    except CheckpointError as err:  # a failed write (full disk): the newest complete checkpoint still resumes
        print(f"error: {err}", file=sys.stderr)
        return 2


def train(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from mgjax import checkpoint
    from mgjax.audio import write_wav
    from mgjax.codec import training as ct
    from mgjax.config import to_dict

    codec_cfg, train_cfg = ct.load_codec_train_config(args.config, args.overrides)
    os.makedirs(args.out, exist_ok=True)
    ensure_corpus(args, codec_cfg.sample_rate)
    train_entries = read_manifest(args.corpus, "manifest.jsonl")
    held_entries = read_manifest(args.corpus, "heldout.jsonl")
    if not train_entries:
        raise SystemExit(f"{args.corpus}/manifest.jsonl lists no clips")
    if not held_entries:  # no held-out split: keep the last clips of the manifest out of training
        count = min(train_cfg.eval_clips, len(train_entries) // 10)
        train_entries, held_entries = train_entries[:len(train_entries) - count], train_entries[-count:]
    print(f"codec: {ct.describe(codec_cfg)}", flush=True)
    t0 = time.time()
    clips = load_clips(args.corpus, train_entries, codec_cfg.sample_rate, codec_cfg.channels)
    held = load_clips(args.corpus, held_entries, codec_cfg.sample_rate, codec_cfg.channels)
    held_len = min(c.shape[1] for c in held)
    held_np = np.stack([c[:, :held_len] for c in held])
    print(f"data: {len(clips)} training clips, {len(held)} held-out clips ({time.time() - t0:.0f} s to load)",
          flush=True)

    length = ct.segment_samples(codec_cfg, train_cfg)
    until = train_cfg.total_steps if args.steps is None else args.steps
    meta = {"codec": to_dict(codec_cfg), "codec_train": to_dict(train_cfg), "corpus": os.path.abspath(args.corpus)}
    ckpt = checkpoint.TrainCheckpointer(os.path.join(args.out, "checkpoints"), save_every=train_cfg.checkpoint_every,
                                        keep=train_cfg.keep_checkpoints, async_save=False)
    if ckpt.latest_step() is not None and not args.fresh:
        state, saved = ckpt.restore(ct.abstract_state(codec_cfg, train_cfg))
        if saved.get("codec") != meta["codec"]:
            raise SystemExit(f"{args.out}/checkpoints holds a codec of another config; use --fresh or another --out")
        print(f"resumed from step {int(state.step)}", flush=True)
    else:
        init_wav = np.concatenate([sample_batch(clips, train_cfg.seed, i, train_cfg.batch_size, length, stream=1)
                                   for i in range(max(1, train_cfg.init_batches))])
        state = ct.init_state(codec_cfg, train_cfg, jax.numpy.asarray(init_wav))
    with open(os.path.join(args.out, "run.json"), "w") as f:
        json.dump({"argv": sys.argv, "seed": train_cfg.seed, "corpus_seed": args.corpus_seed, **meta}, f, indent=1)

    with open(os.path.join(args.out, "log.jsonl"), "a") as log, ckpt:
        eval_np = held_np[:train_cfg.eval_clips]
        start_time, step = time.time(), int(state.step)
        while step < until:
            if args.minutes is not None and time.time() - start_time > 60 * args.minutes:
                print(f"stopping at step {step}: --minutes {args.minutes} reached", flush=True)
                break
            batch = jax.numpy.asarray(sample_batch(clips, train_cfg.seed, step, train_cfg.batch_size, length))
            state, metrics = ct.train_step(codec_cfg, train_cfg, state, batch)
            step += 1
            record = None
            if step % train_cfg.log_every == 0 or step == until:
                record = {"step": step, "time_s": round(time.time() - start_time, 1), **ct.metrics_to_host(metrics)}
            if train_cfg.eval_every and (step % train_cfg.eval_every == 0 or step == until):
                result = ct.evaluate(codec_cfg, train_cfg, ct.codec_params(state), eval_np)
                record = {**(record or {"step": step}), "eval_si_snr_db": result["si_snr_db"],
                          "eval_mel_distance": result["mel_distance"],
                          "eval_mel_distance_60db": result["mel_distance_60db"],
                          "eval_perplexity": result["perplexity"],
                          "eval_used": result["used"]}
            if record is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
                if not args.quiet:
                    print(format_record(record), flush=True)
            ckpt.save(step, state, {**meta, "step": step})
        ckpt.save(step, state, {**meta, "step": step}, force=True)
    trained_s = time.time() - start_time

    params = jax.tree.map(np.asarray, ct.codec_params(state))
    checkpoint.save(os.path.join(args.out, "codec"), "codec", {"codec": to_dict(codec_cfg)}, {"codec": params},
                    source=f"train_codec.py step {step}", overwrite=True)
    final = final_evaluation(args, codec_cfg, train_cfg, params, held_np, held_entries)
    final.update(step=step, session_train_seconds=round(trained_s, 1), codec=ct.describe(codec_cfg))
    samples = os.path.join(args.out, "samples")
    for i in range(min(4, len(held_np))):
        write_wav(os.path.join(samples, f"{i:02d}_original.wav"), held_np[i], codec_cfg.sample_rate)
        write_wav(os.path.join(samples, f"{i:02d}_codec.wav"), final["wav"][i], codec_cfg.sample_rate)
    del final["wav"]
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump(final, f, indent=1)
    print(f"step {step}: held-out SI-SNR {final['si_snr_db']:.2f} dB, mel distance {final['mel_distance']:.4f} "
          f"(-60 dB floor {final['mel_distance_60db']:.4f}), "
          f"perplexity {fmt(final['perplexity'], 1)} / {codec_cfg.codebook_size}, used {fmt(final['used'], 2)}"
          + (f", attributes kept {final['attributes_kept']}" if "attributes_kept" in final else ""), flush=True)
    print(f"codec saved to {os.path.join(args.out, 'codec')}", flush=True)
    return 0


def fmt(values, digits: int) -> str:
    return "[" + " ".join(f"{v:.{digits}f}" for v in values) + "]"


def format_record(record: dict) -> str:
    line = f"step {record['step']}"
    if "loss" in record:
        line += (f" loss {record['loss']:.4f} (l1 {record['l1']:.4f} spec {record['spec']:.4f} commit "
                 f"{record['commit']:.4f}) grad_norm {record['grad_norm']:.2f} lr {record['lr']:.2e} perplexity "
                 f"{fmt(record['perplexity'], 0)} replaced {fmt(record['replaced'], 0)} t {record['time_s']:.0f}s")
    if "eval_si_snr_db" in record:
        line += (f" | held-out SI-SNR {record['eval_si_snr_db']:.2f} dB mel {record['eval_mel_distance']:.4f} "
                 f"(-60 dB floor {record['eval_mel_distance_60db']:.4f}) used {fmt(record['eval_used'], 2)}")
    return line


def final_evaluation(args, codec_cfg, train_cfg, params, held_np, held_entries) -> dict:
    """Quality of the saved codec on the held-out clips, plus (unless --no-attributes) how often the attribute
    estimators of `mgjax.eval.attributes` give the same answer on the reconstruction as on the original."""
    import numpy as np

    from mgjax.codec import training as ct

    count = len(held_np) if args.eval_clips is None else min(args.eval_clips, len(held_np))
    result = ct.evaluate(codec_cfg, train_cfg, params, held_np[:count])
    result["clips"] = count
    if not args.no_attributes:
        from mgjax.eval import attributes

        names = ("key", "tempo", "instrument", "drums")
        original = [attributes.estimate_attributes(w, codec_cfg.sample_rate) for w in held_np[:count]]
        recon = [attributes.estimate_attributes(w, codec_cfg.sample_rate) for w in result["wav"]]
        truth = [e.get("attributes", {}) for e in held_entries[:count]]
        result["attributes_kept"] = {n: float(np.mean([o[n] == r[n] for o, r in zip(original, recon)]))
                                     for n in names}
        if all(all(n in t for n in names) for t in truth):
            result["attribute_accuracy_original"] = {n: float(np.mean([o[n] == t[n] for o, t in zip(original, truth)]))
                                                     for n in names}
            result["attribute_accuracy_codec"] = {n: float(np.mean([r[n] == t[n] for r, t in zip(recon, truth)]))
                                                  for n in names}
    return result


if __name__ == "__main__":
    sys.exit(main())
