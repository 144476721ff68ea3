"""The interleaving-pattern study (issue 26): one LM per codebook pattern, same data, seed, optimizer and training
tokens, each evaluated on held-out captions.

    python bench/pattern_study.py --config configs/sweeps/pattern-study.yaml [--out runs/pattern-study]
        [--budget-fraction 0.5] [--base CONFIG] [section.key=value ...] [--max-runs N] [--report-only] [--quiet]

For every variant of the study file (a pattern and its settings) and each of its seeds, `train.py`'s training run
(`train.train_run`: same loop, checkpoints, resume) trains the base config with the variant's overrides to
`train.total_steps`, stopping at each `budget_fractions` step on the way (and `--budget-fraction`) to be evaluated
there too. Every variant sees the same batches (the data is a function of seed and step), so the same number of
training code tokens (steps x batch x K x frames); what differs is the LM sequence each clip becomes and so the
compute per step (flattening lays a 4-codebook frame out as 4 positions, delay as about 1).

Each evaluation point exports the model (`train.export`, a checkpoint `sample.py --checkpoint` plays) and measures,
on the held-out (instrument, key) captions of `bench/eval_adherence.py` (its functions, imported):
- the teacher-forced loss per codebook on the real held-out clips (nats per code; each pattern's own factorisation,
  so the mean is comparable as a likelihood of the same codes);
- the adherence of generated audio (key, tonic, mode, tempo, instrument, drums by `mgjax.eval.attributes`) with
  Wilson 95 % intervals;
- decoding steps per second of audio (the pattern's layout) and the measured sampling speed.

Resumable: each evaluation point is written to `<out>/runs/<variant>-seed<s>/eval-step<N>.json` when done, and a
rerun skips what is written; a run killed mid-training resumes from its newest Orbax checkpoint (train.py's own
resume). The report (`study.md`, `study.json`, PNG plots; `bench/pattern_study_report.py`) is rebuilt after each
evaluation point, so a partial study shows what it has. On a pod only the base config changes (`base:` in the study
file or `--base`): runs and evaluation go through the same multi-host-aware code; files are written by host 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

import numpy as np
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import eval_adherence  # noqa: E402  (bench/eval_adherence.py: held-out captions, generation, attribute names)
import train as train_cli  # noqa: E402  (train.py: train_run, export)
from pattern_study_report import eval_steps, wilson_interval  # noqa: E402

STUDY_KEYS = {"base", "overrides", "variants", "seeds", "corpus", "evaluation", "budget_fractions", "out"}
VARIANT_KEYS = {"name", "overrides", "seeds"}
EVAL_DEFAULTS = {"captions": 128, "batch": 16, "seconds": 4.0, "top_k": 250, "temperature": 1.0, "cfg": 3.0,
                 "corpus_seed": 0}
CORPUS_DEFAULTS = {"dir": "", "clips": 4000, "seed": 0, "seconds": 4.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the study YAML (configs/sweeps/pattern-study.yaml)")
    parser.add_argument("--out", default=None, help="study folder (default: the study file's `out`, else "
                        "runs/pattern-study)")
    parser.add_argument("--base", default=None, help="replaces the study file's base config (e.g. a pod recipe)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides applied to every run, last")
    parser.add_argument("--budget-fraction", type=float, action="append", default=[],
                        help="also evaluate every run at this fraction of train.total_steps (repeatable; adds to "
                             "the study file's budget_fractions), to see how the ranking moves with the budget")
    parser.add_argument("--max-runs", type=int, default=None,
                        help="do at most this many evaluation points this time, then stop (the rest on a rerun)")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from what is written")
    parser.add_argument("--quiet", action="store_true", help="no per-step training logs on the console")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------- the study file

def load_study(path: str) -> dict:
    """The study file with defaults filled in; an unknown key (top level, variant, corpus, evaluation) is an error
    naming it."""
    from mgjax.config import ConfigError

    with open(path) as f:
        spec = yaml.safe_load(f) or {}

    def check(mapping: dict, known: set, where: str) -> None:
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {unknown} in {where} (known: {sorted(known)})")

    check(spec, STUDY_KEYS, "the study")
    if not spec.get("variants"):
        raise ConfigError(f"{path}: a study needs 'variants' (each {{name, overrides, [seeds]}})")
    names = [v.get("name") for v in spec["variants"]]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"{path}: every variant needs a distinct name, got {names}")
    for variant in spec["variants"]:
        check(variant, VARIANT_KEYS, f"variant {variant['name']}")
    check(spec.get("corpus") or {}, set(CORPUS_DEFAULTS), "corpus")
    check(spec.get("evaluation") or {}, set(EVAL_DEFAULTS), "evaluation")
    fractions = [float(f) for f in spec.get("budget_fractions") or []]
    if any(not 0 < f <= 1 for f in fractions):
        raise ConfigError(f"{path}: budget_fractions must lie in (0, 1], got {fractions}")
    return {"base": spec.get("base", "demo"), "overrides": list(spec.get("overrides") or []),
            "variants": spec["variants"], "seeds": [int(s) for s in spec.get("seeds") or [0]],
            "corpus": {**CORPUS_DEFAULTS, **(spec.get("corpus") or {})} if spec.get("corpus") else None,
            "evaluation": {**EVAL_DEFAULTS, **(spec.get("evaluation") or {})},
            "budget_fractions": fractions, "out": spec.get("out", "runs/pattern-study")}


def plan_runs(study: dict, out: str, base: str, extra: list[str]) -> list[dict]:
    """One entry per (variant, seed): `{name, variant, seed, dir, config}`. Every variant's first seed comes before
    any second seed, so an interrupted study has the comparison at one seed first."""
    from mgjax.config import load_config

    common = list(study["overrides"])
    corpus = study["corpus"]
    if corpus:
        directory = corpus["dir"] or os.path.join(out, "corpus")
        common += [f"train.data_dir={os.path.join(directory, 'manifest.jsonl')}",
                   f"train.cache_dir={os.path.join(directory, 'code_cache')}"]
    runs = []
    per_variant = [(v, [int(s) for s in v.get("seeds") or study["seeds"]]) for v in study["variants"]]
    for round_ in range(max(len(seeds) for _, seeds in per_variant)):
        for variant, seeds in per_variant:
            if round_ >= len(seeds):
                continue
            seed = seeds[round_]
            name = f"{variant['name']}-seed{seed}"
            directory = os.path.join(out, "runs", name)
            overrides = common + list(variant.get("overrides") or []) + list(extra) + [
                f"train.seed={seed}", f"train.output_dir={directory}"]
            runs.append({"name": name, "variant": variant["name"], "seed": seed, "dir": directory,
                         "config": load_config(base, overrides)})
    return runs


def ensure_corpus(study: dict, out: str, config: Any) -> None:
    """Writes the study's corpus (`mgjax.synth`, the demo corpus's generator and seed: clip i is the demo corpus's
    clip i) when its manifest is missing. On a multi-host run the corpus must exist beforehand."""
    corpus = study["corpus"]
    if not corpus:
        return
    directory = corpus["dir"] or os.path.join(out, "corpus")
    if os.path.isfile(os.path.join(directory, "manifest.jsonl")):
        return
    command = (f"python -m mgjax.synth {directory} --clips {corpus['clips']} --heldout 0 --seed {corpus['seed']} "
               f"--seconds {corpus['seconds']:g}")
    if config.train.distributed:
        raise SystemExit(f"the corpus {directory} is missing; on a multi-host run make it first: {command}")
    from mgjax import synth

    print(f"writing the corpus ({command})", flush=True)
    began, began_cpu = time.perf_counter(), time.process_time()
    synth.generate_corpus(directory, int(corpus["clips"]), int(corpus["seed"]), float(corpus["seconds"]),
                          holdout=True)
    print(f"corpus written in {time.perf_counter() - began:.0f} s ({time.process_time() - began_cpu:.0f} s of CPU)",
          flush=True)


# ----------------------------------------------------------------------------------------------- evaluation

def held_out_set(spec: dict, sample_rate: int) -> dict:
    """The held-out captions, their attributes and real clips (`eval_adherence.held_out_examples`)."""
    examples = eval_adherence.held_out_examples(int(spec["corpus_seed"]), int(spec["captions"]),
                                                float(spec["seconds"]), sample_rate, False)
    return {"real": np.stack([wav for wav, _, _ in examples])[:, None],  # [n, 1, N]
            "captions": [text for _, text, _ in examples], "truths": [attrs for _, _, attrs in examples]}


def adherence(wavs: np.ndarray, truths: list[dict], sample_rate: int) -> dict:
    """`{attribute: {"accuracy", "correct", "n", "ci95": [lo, hi]}}` of clips `[n, C, N]` against `truths`."""
    from mgjax.eval import attributes

    accuracy = attributes.accuracy([attributes.estimate_attributes(w, sample_rate) for w in wavs], truths)
    n = len(truths)
    out = {}
    for name in eval_adherence.ATTRIBUTES:
        correct = int(round(accuracy[name] * n))
        out[name] = {"accuracy": accuracy[name], "correct": correct, "n": n, "ci95": list(wilson_interval(correct, n))}
    return out


def per_codebook_loss(mg: Any, codes: np.ndarray, captions: list[str], batch: int) -> list[float]:
    """Teacher-forced loss per codebook (nats per code, no dropout, no CFG) of real clips' codes `[n, K, T]` under
    their captions, in batches of `batch` (the last one padded with masked rows: one compiled shape)."""
    import jax
    import jax.numpy as jnp

    from mgjax import training

    params = {name: value for name, value in mg.params.items() if name != "codec"}
    step = jax.jit(lambda p, b: training.eval_step(mg.config, p, {}, b))
    total, rows = np.zeros(codes.shape[1]), 0
    for i in range(0, len(codes), batch):
        chunk, texts = codes[i:i + batch], captions[i:i + batch]
        real = len(chunk)
        pad = batch - real
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        ids, mask = mg.tokenize(texts + [texts[-1]] * pad)
        rows_mask = np.zeros((batch, chunk.shape[-1]), bool)
        rows_mask[:real] = True
        out = step(params, {"codes": jnp.asarray(chunk), "text_ids": jnp.asarray(ids),
                            "text_mask": jnp.asarray(mask), "mask": jnp.asarray(rows_mask)})
        total += np.asarray(out["per_codebook"], np.float64) * real  # every real row has the same valid positions
        rows += real
    return [float(x) for x in total / rows]


def load_model(export_dir: str, mesh: Any = None) -> Any:
    """The exported model, read onto the training mesh when it has several devices (its params then live where
    the run's context mesh, set by `train.setup`, expects them)."""
    import mgjax

    return mgjax.MusicGen.load(export_dir, mesh=mesh if mesh is not None and mesh.size > 1 else None)


def evaluate(export_dir: str, spec: dict, seed: int, mesh: Any = None) -> dict:
    """The measurements of one exported model (see the module docstring)."""
    from mgjax.lm.patterns import pattern_from_config

    mg = load_model(export_dir, mesh)
    sr = mg.sample_rate
    held = held_out_set(spec, sr)
    args = eval_adherence.parse_args([
        "--clips", str(spec["captions"]), "--batch", str(spec["batch"]), "--seconds", str(spec["seconds"]),
        "--seed", str(seed), "--top-k", str(min(int(spec["top_k"]), mg.config.lm.card)),
        "--temperature", str(spec["temperature"]), "--cfg", str(spec["cfg"])])
    generated, speed = eval_adherence.generate_all(mg, held["captions"], args)
    batch = int(spec["batch"])
    codes = np.concatenate([np.asarray(mg.encode(held["real"][i:i + batch]))
                            for i in range(0, len(held["real"]), batch)])
    frames = mg.frames_for(float(spec["seconds"]))
    steps = pattern_from_config(mg.config.lm).steps(frames)
    return {"adherence": adherence(generated, held["truths"], sr),
            "loss_per_codebook": per_codebook_loss(mg, codes, held["captions"], batch),
            "decoding_steps": steps, "decoding_steps_per_audio_second": steps / float(spec["seconds"]),
            "sampling": {**speed, "ms_per_decoding_step": 1000 * speed["steady_batch_s"] / steps},
            "captions": len(held["captions"])}


def reference(out: str, spec: dict, export_dir: str, mesh: Any = None) -> dict:
    """Adherence of the real held-out clips and of those clips through the codec (pattern-independent ceilings),
    computed once per study and kept in `<out>/reference.json`."""
    path = os.path.join(out, "reference.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    mg = load_model(export_dir, mesh)
    held = held_out_set(spec, mg.sample_rate)
    batch = int(spec["batch"])
    through = np.concatenate([np.asarray(mg.decode(mg.encode(held["real"][i:i + batch])))
                              for i in range(0, len(held["real"]), batch)])
    result = {"real clips": adherence(held["real"], held["truths"], mg.sample_rate),
              "real through the codec": adherence(through, held["truths"], mg.sample_rate)}
    write_json(path, result)
    return result


# ----------------------------------------------------------------------------------------------- runs

def write_json(path: str, value: Any) -> None:
    """Atomic (temp + rename), host 0 only."""
    import jax

    if jax.process_index() != 0:
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def eval_path(run: dict, step: int) -> str:
    return os.path.join(run["dir"], f"eval-step{step}.json")


def latest_checkpoint(run: dict) -> int | None:
    directory = os.path.join(run["dir"], "checkpoints")
    steps = [int(d) for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(directory) else []
    return max(steps, default=None)


def run_point(run: dict, step: int, study: dict, out: str, quiet: bool) -> dict:
    """Trains `run` to `step` (resuming from its checkpoints), exports, evaluates; writes and returns the record."""
    config = run["config"]
    began, began_cpu = time.perf_counter(), time.process_time()
    result = train_cli.train_run(config, steps=step, quiet=quiet)
    trainer = result["trainer"]
    if trainer.step_count != step:
        raise RuntimeError(f"{run['name']}: trained to step {trainer.step_count}, expected {step}")
    train_s, train_cpu_s = time.perf_counter() - began, time.process_time() - began_cpu
    export_dir = os.path.join(run["dir"], f"export-step{step}")
    train_cli.export(config, trainer, result["codec"], export_dir, use_ema=config.train.ema_decay > 0)
    began, began_cpu = time.perf_counter(), time.process_time()
    spec = study["evaluation"]
    record = {"run": run["name"], "variant": run["variant"], "seed": run["seed"], "step": step,
              "total_steps": config.train.total_steps, "pattern": config.lm.pattern,
              "resumed_from": int(trainer.meta.get("step", 0)), "valid_loss": result["valid_loss"],
              "train_seq_steps": train_seq_steps(config), "train_call_s": train_s, "train_call_cpu_s": train_cpu_s,
              **evaluate(export_dir, spec, run["seed"], trainer.mesh)}
    record["eval_s"], record["eval_cpu_s"] = time.perf_counter() - began, time.process_time() - began_cpu
    reference(out, spec, export_dir, trainer.mesh)
    write_json(eval_path(run, step), record)
    return record


def train_seq_steps(config: Any) -> int:
    """LM positions one training segment becomes (the valid prefix the train step feeds)."""
    from mgjax.lm.patterns import pattern_from_config

    frames = max(1, int(round(config.train.segment_duration * config.codec.frame_rate)))
    return pattern_from_config(config.lm).steps(frames, valid_only=True)


def initialize_distributed_once(runs: list[dict]) -> list[dict]:
    """Multi-host runs (`train.distributed`): `jax.distributed.initialize` once for the whole study (it may not run
    twice in a process, and `train_run` would call it per run), then the runs' configs with it switched off."""
    config = runs[0]["config"]
    if not config.train.distributed:
        return runs
    from mgjax import sharding

    sharding.initialize_distributed(config.train)
    return [dict(run, config=dataclasses.replace(
        run["config"], train=dataclasses.replace(run["config"].train, distributed=False))) for run in runs]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import pattern_study_report as report
    from mgjax.config import ConfigError

    try:
        study = load_study(args.config)
        fractions = sorted(set(study["budget_fractions"] + [float(f) for f in args.budget_fraction]))
        if any(not 0 < f <= 1 for f in fractions):
            raise ConfigError(f"--budget-fraction must lie in (0, 1], got {fractions}")
        out = args.out or study["out"]
        runs = plan_runs(study, out, args.base or study["base"], args.overrides)
        window = min(run["config"].lm.max_duration for run in runs)
        if float(study["evaluation"]["seconds"]) > window:
            raise ConfigError(f"evaluation.seconds={study['evaluation']['seconds']} is longer than the model's "
                              f"window (lm.max_duration={window:g}): the held-out loss is taken in one window")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    if not args.report_only:
        ensure_corpus(study, out, runs[0]["config"])
        runs = initialize_distributed_once(runs)
    points = [(run, step) for run in runs for step in eval_steps(run["config"].train.total_steps, fractions)]
    if not args.report_only:
        done_now = 0
        for number, (run, step) in enumerate(points, 1):
            if os.path.isfile(eval_path(run, step)):
                continue
            latest = latest_checkpoint(run)
            if latest is not None and latest > step:
                print(f"[{number}/{len(points)}] {run['name']} step {step}: skipped, training is already at step "
                      f"{latest} (checkpoints of earlier steps are not kept)", flush=True)
                continue
            if args.max_runs is not None and done_now >= args.max_runs:
                print(f"stopping after {done_now} evaluation point(s) (--max-runs); rerun to go on", flush=True)
                break
            print(f"[{number}/{len(points)}] {run['name']}: training to step {step}"
                  + (f" (from checkpoint {latest})" if latest else ""), flush=True)
            record = run_point(run, step, study, out, args.quiet)
            done_now += 1
            print(f"[{number}/{len(points)}] {run['name']} step {step}: valid {record['valid_loss']:.4f}, held-out "
                  f"{np.mean(record['loss_per_codebook']):.4f}; train {record['train_call_s']:.0f} s "
                  f"({record['train_call_cpu_s']:.0f} s CPU), eval {record['eval_s']:.0f} s "
                  f"({record['eval_cpu_s']:.0f} s CPU)", flush=True)
            report.write_report(out, study, runs, fractions)
    paths = report.write_report(out, study, runs, fractions)
    print("report: " + ", ".join(paths), flush=True)
    return 0


if __name__ == "__main__":
    from mgjax.runtime import keep_host_memory

    keep_host_memory()  # as train.py does, before JAX starts its threads (not in-process callers such as tests)
    sys.exit(main())
