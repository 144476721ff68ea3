"""Train the MusicGen LM: `python train.py --config configs/train-small.yaml [section.key=value ...]`.

    python train.py --config train-tiny --synthetic                       # no audio needed
    python train.py --config train-small train.data_dir=/data/music train.pretrained=ckpt/musicgen-small
    python train.py --config train-tiny --sweep configs/sweeps/train-patterns.yaml --synthetic   # pattern ablation
    python train.py --config train-medium --compile-only --topology v5e:8x8   # fits a TPU pod? (make tpu-tools)

Logs loss, per-codebook loss, learning rate and tokens/s to stdout and <output_dir>/metrics.jsonl (progress bar
with tqdm when installed; TensorBoard scalars in <output_dir>/tb when a TensorBoard writer is installed).
Checkpoints go to <output_dir>/checkpoints and a rerun of the same command resumes from the latest one (`--fresh`
refuses to resume, `--steps` stops early).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from typing import Any

import yaml

from mgjax import aot  # no JAX at import: `--compile-only` must put libtpu on the path before JAX starts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML recipe: a path or a name in configs/ (train-tiny); "
                        "with --sweep it replaces the sweep's base")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.batch_size=16")
    parser.add_argument("--synthetic", action="store_true", help="train on generated codes (no audio)")
    parser.add_argument("--steps", type=int, default=None, help="stop after this step (default train.total_steps)")
    parser.add_argument("--fresh", action="store_true",
                        help="never resume: fail if <output_dir>/checkpoints already holds checkpoints")
    parser.add_argument("--sweep", default=None, help="a sweep YAML: train every variant, print a table")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar or per-step logs on the console (metrics.jsonl is still written)")
    parser.add_argument("--export", default=None, metavar="DIR",
                        help="after training, write the model (codec + text encoder + LM + tokenizer) as a MusicGen "
                             "checkpoint to DIR, for sample.py --checkpoint DIR")
    parser.add_argument("--export-ema", action="store_true", help="export the EMA params (train.ema_decay > 0)")
    aot.add_arguments(parser, sampling=False)
    args = parser.parse_args(argv)
    if args.config is None and args.sweep is None:
        parser.error("--config is required (a YAML path or a name in configs/, e.g. train-tiny)")
    return args


# ----------------------------------------------------------------------------------------------- logging

class Logger:
    """Progress bar (tqdm, else plain prints) unless quiet, metrics.jsonl and optional TensorBoard always; silent on
    hosts other than 0."""

    def __init__(self, output_dir: str, start: int, total: int, *, tensorboard: bool, quiet: bool):
        import jax

        self.active = jax.process_index() == 0
        self.console = self.active and not quiet
        self.bar = self.writer = self.metrics_file = None
        if not self.active:
            return
        metrics_path = os.path.join(output_dir, "metrics.jsonl")
        dropped = trim_metrics(metrics_path, start)
        if dropped and not quiet:
            print(f"metrics.jsonl: dropped {dropped} record(s) past step {start}, the checkpoint resumed from "
                  f"(they are logged again as the steps rerun)", flush=True)
        self.metrics_file = open(metrics_path, "a")
        if self.console:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)
            except ImportError:
                pass
        if tensorboard:
            self.writer = _tensorboard_writer(os.path.join(output_dir, "tb"))

    def __call__(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        per_codebook = " ".join(f"{x:.3f}" for x in metrics["per_codebook"])
        line = (f"step {step} loss {float(metrics['loss']):.4f} [{per_codebook}] lr {float(metrics['lr']):.2e} "
                f"grad_norm {float(metrics['grad_norm']):.3f} tokens/s {metrics['tokens_per_s']:.0f}")
        if "valid_loss" in metrics:
            line += f" valid {metrics['valid_loss']:.4f}"
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"loss {float(metrics['loss']):.4f} tok/s {metrics['tokens_per_s']:.0f}")
            self.bar.write(line)
        elif self.console:
            print(line, flush=True)
        record = {"step": step, "time": round(time.time(), 1),
                  **{k: float(v) for k, v in metrics.items() if k != "per_codebook"},
                  "per_codebook": [float(x) for x in metrics["per_codebook"]]}
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        if self.writer is not None:
            scalars = {"loss": metrics["loss"], "lr": metrics["lr"], "grad_norm": metrics["grad_norm"],
                       "tokens_per_s": metrics["tokens_per_s"]}
            scalars.update({f"loss_codebook_{k}": v for k, v in enumerate(metrics["per_codebook"])})
            if "valid_loss" in metrics:
                scalars["valid_loss"] = metrics["valid_loss"]
            for name, value in scalars.items():
                self.writer.add_scalar(name, float(value), step)

    def close(self) -> None:
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def trim_metrics(path: str, last_step: int) -> int:
    """Drops the records of `path` (JSON lines with a "step") past `last_step`, and a torn last line: those steps
    run again after a resume from `last_step`, and would otherwise be counted twice. Rewritten atomically (temp
    file + rename); returns how many lines were dropped (0: the file is left untouched)."""
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = [line.rstrip("\n") + "\n" for line in lines
            if _record_step(line) is not None and _record_step(line) <= last_step]
    if kept == lines:
        return 0
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)
    return len(lines) - len(kept)


def _record_step(line: str) -> int | None:
    """The "step" of one metrics.jsonl line, or None for a torn or foreign line."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _tensorboard_writer(directory: str) -> Any:
    """A SummaryWriter from tensorboardX or torch.utils.tensorboard, or None (with a note) if neither works."""
    for module in ("tensorboardX", "torch.utils.tensorboard"):
        try:
            writer_cls = __import__(module, fromlist=["SummaryWriter"]).SummaryWriter
            return writer_cls(directory)
        except Exception:  # ImportError, or torch's wrapper raising because tensorboard itself is missing
            continue
    print("note: TensorBoard logging skipped (install tensorboard or tensorboardX to enable it)", flush=True)
    return None


# ----------------------------------------------------------------------------------------------- data

def make_datasets(config: Any, synthetic: bool) -> tuple[Any, Any, Any]:
    """(train dataset, valid dataset, codec): synthetic codes (codec None), or cached codes of `train.data_dir` and
    the codec that encoded them."""
    from mgjax import data
    from mgjax.conditioning.fuser import takes_melody

    train = config.train
    if synthetic or train.synthetic:
        make = lambda stream: data.SyntheticDataset(train, config.lm.num_codebooks, config.lm.card,
                                                     config.codec.frame_rate, config.text.vocab_size, stream=stream)
        return make(0), make(1), None
    entries = data.scan_entries(train.data_dir)
    train_entries, valid_entries = data.split_valid(entries, train.valid_fraction)
    codec = load_codec(config)
    cache = data.CodeCache(train.cache_dir or os.path.join(train.output_dir, "code_cache"), codec,
                           chroma=takes_melody(config.lm), stereo=config.lm.audio_channels == 2)
    tokenizer = load_tokenizer(config)
    dataset = data.AudioDataset(train_entries, cache, train, tokenizer=tokenizer)
    # Few held-out files: every host reads all of them (each host must take part in every eval step).
    import jax
    valid = (data.AudioDataset(valid_entries, cache, train, tokenizer=tokenizer, stream=1,
                               shard_files=len(valid_entries) >= 4 * jax.process_count())
             if valid_entries else None)
    return dataset, valid, codec


def load_codec(config: Any) -> Any:
    """The codec of `train.codec_checkpoint`, else of `train.pretrained`, else a random one (tests)."""
    from mgjax.codec.encodec import Codec
    from mgjax.config import ConfigError

    source = config.train.codec_checkpoint or config.train.pretrained
    if not source:
        warnings.warn("neither train.codec_checkpoint nor train.pretrained is set: encoding audio with a RANDOM "
                      "codec (only useful for tests)")
        return Codec.from_config(config.codec, config.train.seed)
    if not os.path.isdir(source):
        key = "codec_checkpoint" if config.train.codec_checkpoint else "pretrained"
        raise ConfigError(f"train.{key}={source} is not a directory: train a codec with train_codec.py or convert "
                          f"released weights with python -m mgjax.convert, then point train.{key} at it")
    codec = Codec.load(source)
    if codec.config != config.codec:
        raise ConfigError(f"the codec of {source} ({codec.config}) differs from the config's codec section "
                          f"({config.codec}); copy the checkpoint's codec settings into the config")
    return codec


def tokenizer_directory(config: Any) -> str:
    """`train.tokenizer_dir`, else `<pretrained>/tokenizer` when it exists, else '' (caption ids given)."""
    directory = config.train.tokenizer_dir
    if not directory and config.train.pretrained:
        candidate = os.path.join(config.train.pretrained, "tokenizer")
        directory = candidate if os.path.isdir(candidate) else ""
    return directory


def load_tokenizer(config: Any) -> Any:
    """The tokenizer of `tokenizer_directory(config)`, or None."""
    from mgjax.text.tokenizer import load_tokenizer as load

    directory = tokenizer_directory(config)
    return load(directory) if directory else None


# ----------------------------------------------------------------------------------------------- runs

def setup(config: Any) -> Any:
    """Multi-host start-up when configured, then the mesh (set as the current mesh)."""
    import jax

    from mgjax import sharding

    sharding.initialize_distributed(config.train)
    mesh = sharding.make_mesh(config.train.mesh_shape)
    jax.set_mesh(mesh)
    return mesh


def train_run(config: Any, *, synthetic: bool = False, steps: int | None = None, fresh: bool = False,
              quiet: bool = False, checkpoints: bool = True) -> dict:
    """One training run -> {'losses', 'valid_loss', 'trainer', 'valid_batch', 'codec'} ('codec': the one the audio
    was encoded with, None for synthetic codes); resumes from <output_dir>/checkpoints."""
    import jax

    from mgjax import checkpoint, config as config_lib, training

    mesh = setup(config)
    train = config.train
    os.makedirs(train.output_dir, exist_ok=True)
    if jax.process_index() == 0:  # hosts share output_dir: one writer, no torn file
        config_lib.save_config(config, os.path.join(train.output_dir, "config.yaml"))
    dataset, valid, codec = make_datasets(config, synthetic)
    ckpt_dir = os.path.join(train.output_dir, "checkpoints")
    if fresh and os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise SystemExit(f"--fresh: {ckpt_dir} already holds checkpoints; remove it or choose train.output_dir")
    checkpointer = (checkpoint.TrainCheckpointer(ckpt_dir, save_every=train.checkpoint_every,
                                                 keep=train.keep_checkpoints, async_save=train.async_checkpointing)
                    if checkpoints else None)
    trainer = training.Trainer.create(config, mesh, checkpointer)
    until = train.total_steps if steps is None else min(steps, train.total_steps)
    start = trainer.step_count
    if start and not quiet:
        print(f"resumed from {ckpt_dir} at step {start}", flush=True)
    logger = Logger(train.output_dir, start, until, tensorboard=train.tensorboard, quiet=quiet)
    with contextlib.closing(logger), checkpointer if checkpointer is not None else contextlib.nullcontext():
        losses = training.fit(trainer, dataset, until=until, checkpointer=checkpointer, valid=valid, on_log=logger)
    valid_loss = float(trainer.evaluate([valid.batch(i) for i in range(train.eval_batches)])["loss"]) if valid else None
    return {"losses": losses, "valid_loss": valid_loss, "trainer": trainer,
            "valid_batch": (valid or dataset).batch(0), "codec": codec}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    aot.prepare(args)
    from mgjax.runtime import keep_host_memory

    keep_host_memory()  # before JAX starts its threads: no page faults on each step's temp buffer
    from mgjax.checkpoint import CheckpointError
    from mgjax.config import ConfigError, load_config
    from mgjax.data import DataError

    try:
        if args.sweep:
            sweep(args)
            return 0
        config = load_config(args.config, args.overrides)
        if args.compile_only:
            return aot.run_train_check(config, args)
        result = train_run(config, synthetic=args.synthetic, steps=args.steps, fresh=args.fresh, quiet=args.quiet)
        if args.export:
            export(config, result["trainer"], result["codec"], args.export, args.export_ema)
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    losses = result["losses"]
    if losses:
        print(f"done: step {result['trainer'].step_count}, first loss {losses[0]:.4f}, last loss {losses[-1]:.4f}"
              + (f", valid loss {result['valid_loss']:.4f}" if result["valid_loss"] is not None else ""), flush=True)
    return 0


def export(config: Any, trainer: Any, codec: Any, directory: str, use_ema: bool) -> None:
    """Writes the run as a MusicGen checkpoint; `codec`: the one the data was encoded with (None for synthetic
    codes: a random codec of the config)."""
    from mgjax.codec.encodec import Codec
    from mgjax.export import export_musicgen

    codec = codec or Codec.from_config(config.codec, config.train.seed)
    path = export_musicgen(trainer, codec, directory, tokenizer_dir=tokenizer_directory(config), use_ema=use_ema,
                           source=f"train.py {config.train.output_dir} step {trainer.step_count}")
    print(f"exported the model to {path} (sample.py --checkpoint {directory})", flush=True)


# ----------------------------------------------------------------------------------------------- sweep

def load_sweep(path: str) -> dict:
    """`{base, overrides: [...], variants: [{name, overrides: [...]}]}` from a sweep YAML."""
    from mgjax.config import ConfigError, resolve_config_path

    with open(resolve_config_path(path) if not os.path.isfile(path) else path) as f:
        sweep_spec = yaml.safe_load(f) or {}
    unknown = set(sweep_spec) - {"base", "overrides", "variants"}
    if unknown or not sweep_spec.get("variants"):
        raise ConfigError(f"{path}: a sweep needs 'variants' (and optional 'base', 'overrides'); "
                          f"unknown keys: {sorted(unknown)}")
    return sweep_spec


def decoding_steps_per_second(config: Any) -> float:
    """LM steps to generate one second of audio with the config's pattern (full layout, for a segment)."""
    from mgjax.lm.patterns import pattern_from_config

    frames = max(1, int(round(config.train.segment_duration * config.codec.frame_rate)))
    return pattern_from_config(config.lm).steps(frames) / (frames / config.codec.frame_rate)


def sampling_speed(trainer: Any, local_batch: dict) -> str:
    """Seconds of audio generated per wall-clock second by `mgjax.sampling` (CFG on, the batch's captions, one
    segment)."""
    import jax
    import numpy as np

    from mgjax import sampling, training

    config = trainer.config
    params, frozen = trainer.state.params, trainer.frozen
    text = {"text_ids": local_batch["text_ids"], "text_mask": local_batch["text_mask"]}
    cond, cond_mask = jax.jit(lambda p, f, b: training.text_condition(config, p, f, b))(params, frozen, text)
    batch, frames = local_batch["codes"].shape[0], local_batch["codes"].shape[-1]
    prompt = np.zeros((batch, config.lm.num_codebooks, 0), np.int32)
    settings = sampling.SamplingConfig(top_k=min(250, config.lm.card))

    def generate():
        return jax.block_until_ready(sampling.generate_codes(
            params["lm"], cond, cond_mask, jax.random.key(0), prompt, lm_config=config.lm, frames=frames,
            sampling=settings))

    generate()  # compile
    start = time.perf_counter()
    generate()
    elapsed = time.perf_counter() - start
    return f"{batch * frames / config.codec.frame_rate / elapsed:.1f} s/s"


def sweep(args: argparse.Namespace) -> list[dict]:
    """Trains every variant of the sweep file on the same data; prints and writes a markdown table."""
    from mgjax.config import load_config

    spec = load_sweep(args.sweep)
    base = args.config or spec.get("base")
    rows = []
    root = None
    for variant in spec["variants"]:
        name = variant["name"]
        overrides = list(spec.get("overrides", [])) + list(variant.get("overrides", [])) + list(args.overrides)
        config = load_config(base, overrides)
        root = root or config.train.output_dir
        config = load_config(base, overrides + [f"train.output_dir={os.path.join(root, 'sweep', name)}"])
        start = time.perf_counter()
        result = train_run(config, synthetic=args.synthetic, steps=args.steps, quiet=True, checkpoints=False)
        losses = result["losses"]
        rows.append({"pattern": name, "steps_per_s_audio": decoding_steps_per_second(config),
                     "train_loss": float(sum(losses[-10:]) / max(len(losses[-10:]), 1)),
                     "valid_loss": result["valid_loss"],
                     "sampling_speed": sampling_speed(result["trainer"], result["valid_batch"]),
                     "train_time_s": time.perf_counter() - start})
        print(f"{name}: train {rows[-1]['train_loss']:.4f} valid {rows[-1]['valid_loss']}", flush=True)
    table = format_table(rows)
    print(table, flush=True)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "sweep.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(root, "sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("| pattern | decoding steps / s of audio | final train loss | final valid loss | sampling speed (audio s "
            "per s) | train time (s) |\n|---|---|---|---|---|---|")
    lines = [f"| {r['pattern']} | {r['steps_per_s_audio']:.1f} | {r['train_loss']:.4f} | "
             f"{'n/a' if r['valid_loss'] is None else format(r['valid_loss'], '.4f')} | {r['sampling_speed']} | "
             f"{r['train_time_s']:.1f} |" for r in rows]
    return "\n".join([head] + lines)


if __name__ == "__main__":
    sys.exit(main())
