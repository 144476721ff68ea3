"""Generate music from text prompts with the shipped demo model or a converted MusicGen checkpoint.

    python sample.py --prompt "an upbeat chiptune melody in A minor with drums, 140 bpm" --duration 8 --out out/
    python sample.py --checkpoint ckpt/musicgen-small --prompt "lofi beat" --continue intro.wav --duration 20

Writes one wav per prompt and prints the paths and the real-time factor.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
import warnings

# Constants only: mgjax.audio imports numpy and nothing heavy, so --help stays fast.
from mgjax import aot  # noqa: E402
from mgjax.audio import CONTAINERS, LOUDNESS_TARGET_LUFS, NORMALIZE_STRATEGIES  # noqa: E402
from mgjax.runtime import DEFAULT_COMPILATION_CACHE  # noqa: E402
from mgjax.validation import (MAX_DURATION_S, MAX_SEED, as_float, as_int, generation_settings,  # noqa: E402
                              long_duration_note)

DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mgjax", "assets", "demo")
NO_CHECKPOINT_HELP = (
    "no checkpoint to sample from: {path} does not exist.\n"
    "mgjax cannot download weights. Convert released MusicGen weights that you have on disk, then point at them:\n"
    "  .venv/bin/python -m mgjax.convert /path/to/musicgen-small ckpt/musicgen-small\n"
    "  make sample PROMPT=\"...\" ARGS=\"--checkpoint ckpt/musicgen-small\"")


# How this CLI spells the settings `mgjax.validation.generation_settings` checks (the API spells them as arguments).
CLI_NAMES = {"duration": "--duration", "top_k": "--top-k", "top_p": "--top-p", "temperature": "--temperature",
             "cfg_coef": "--cfg", "seed": "--seed", "greedy": "--greedy", "continue": "--continue"}
MAX_CLIPS = 10_000


class CliError(Exception):
    """A bad argument or input: printed as one line, exit status 2."""


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", action="append", default=[], help="text description (repeat for several)")
    parser.add_argument("--prompts-file", default=None,
                        help="text file with one description per line (blank lines skipped), after any --prompt")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of audio per prompt (default 8)")
    parser.add_argument("--checkpoint", default=None, help=f"converted checkpoint directory (default: the shipped "
                                                           f"demo model, {os.path.relpath(DEFAULT_CHECKPOINT)})")
    parser.add_argument("--out", default="out", help="output directory, or a file path (.wav, .flac, .ogg, .mp3) when "
                                                     "there is one prompt")
    parser.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    parser.add_argument("--audio-format", choices=[suffix[1:] for suffix in CONTAINERS], default="wav",
                        help="container of the files written into an --out directory (default wav)")
    parser.add_argument("--format", choices=("pcm16", "float"), default="pcm16",
                        help="sample format (float: wav only)")
    parser.add_argument("--normalize", choices=NORMALIZE_STRATEGIES, default="loudness",
                        help="output level, as audiocraft's audio_write: loudness (default: --loudness LUFS with a "
                             "tanh soft clip, as MusicGen's samples are written), peak (-1 dBFS), rms (-18 dBFS), "
                             "clip, or none (the model's output as is)")
    parser.add_argument("--loudness", type=float, default=LOUDNESS_TARGET_LUFS,
                        help=f"target loudness in LUFS for --normalize loudness (default {LOUDNESS_TARGET_LUFS:g})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top-k", type=int, default=250)
    parser.add_argument("--top-p", type=float, default=0.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance coefficient")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    parser.add_argument("--int8", action="store_true",
                        help="int8 LM weights: faster sampling on a CPU, slightly different tokens than float32")
    parser.add_argument("--continue", dest="continue_wav", default=None,
                        help="audio prompt to continue (resampled and mixed down as needed)")
    parser.add_argument("--melody", default=None,
                        help="melody audio to follow (MusicGen-melody checkpoints; used as given, no stem separation)")
    parser.add_argument("--unconditional", type=int, default=0, metavar="N",
                        help="generate N clips with no description (the null condition) instead of prompts")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts generated together")
    parser.add_argument("--extend-stride", type=float, default=None, metavar="SECONDS",
                        help="past the model's window (30 s), how far each new window advances (default: the "
                             "checkpoint's, 18 s)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="LM compute dtype (default: the checkpoint's, float32 when converted; float32 is the "
                             "exact one and the faster on a CPU, bfloat16 or float16 are for GPUs and TPUs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--compile-cache", default=DEFAULT_COMPILATION_CACHE, metavar="DIR",
                        help="directory keeping compiled programs between runs (default %(default)s; '' for none)")
    parser.add_argument("--config", default=None, metavar="NAME",
                        help="with --compile-only: a model config (a name in configs/, e.g. musicgen-medium, or a "
                             "YAML path) instead of the checkpoint's")
    aot.add_arguments(parser, sampling=True)
    return parser.parse_args(argv)


def compile_check(args) -> int:
    """`--compile-only`: the generation program for `--batch-size` clips of `--duration` s, compiled for a TPU."""
    from mgjax.config import ConfigError, load_config

    source = args.config or os.path.join(args.checkpoint or DEFAULT_CHECKPOINT, "config.yaml")
    overrides = [f"lm.compute_dtype={args.dtype}"] if args.dtype else []
    try:
        config = load_config(source, overrides)
    except (ConfigError, FileNotFoundError) as err:
        raise CliError(f"--compile-only: cannot read the model config {source} ({err})") from None
    return aot.run_sample_check(config, args)


def read_prompts_file(path: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped."""
    if not os.path.isfile(path):
        raise CliError(f"--prompts-file: {path} does not exist")
    try:
        with open(path, encoding="utf-8") as handle:
            return [line.strip() for line in handle if line.strip()]
    except UnicodeDecodeError as err:
        raise CliError(f"--prompts-file: {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def validate(args) -> None:
    if args.prompts_file:
        from_file = read_prompts_file(args.prompts_file)
        if not from_file:
            raise CliError(f"--prompts-file: {args.prompts_file} holds no prompt (one description per line)")
        args.prompt = args.prompt + from_file
    as_int("--unconditional", args.unconditional, 0, MAX_CLIPS, "the number of clips to generate")
    if args.unconditional and (args.prompt or args.melody):
        raise CliError("--unconditional generates without a description or melody: drop --prompt, --prompts-file "
                       "and --melody, or drop --unconditional")
    if args.unconditional:
        args.prompt = [None] * args.unconditional
    if not args.prompt:
        raise CliError("no prompt: give --prompt \"...\" (repeatable), --prompts-file FILE or --unconditional N")
    generation_settings(duration=args.duration, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                        cfg_coef=args.cfg, seed=args.seed, greedy=args.greedy, names=CLI_NAMES)
    if any(p is not None and not p.strip() for p in args.prompt):
        raise CliError("--prompt must not be empty")
    as_int("--batch-size", args.batch_size, 1, MAX_CLIPS, "the number of prompts generated together")
    if not -70 < args.loudness < 0:
        raise CliError(f"--loudness must lie in (-70, 0) LUFS, got {args.loudness}")
    if args.extend_stride is not None:
        as_float("--extend-stride", args.extend_stride, 0.0, MAX_DURATION_S, low_open=True, unit=" seconds",
                 hint="it must also stay below the model's window (30 s for the released models)")
    for flag, path in (("--continue", args.continue_wav), ("--melody", args.melody)):
        if path and not os.path.isfile(path):
            raise CliError(f"{flag}: audio file {path} does not exist")
    if output_file(args.out) and len(args.prompt) > 1:
        raise CliError("--out names one file but there are several prompts; give a directory")
    container = os.path.splitext(args.out)[1].lower() if output_file(args.out) else "." + args.audio_format
    if args.format == "float" and container != ".wav":
        raise CliError(f"--format float is stored in .wav files only, not {container}")
    check_outputs(output_paths(args.out, args.prompt, container), args.overwrite)


def check_outputs(paths: list[str], overwrite: bool) -> None:
    """Before any generation: each output path is new (or `overwrite`) and its directory can be written."""
    for path in paths:
        if os.path.isdir(path):
            raise CliError(f"--out: {path} is a directory; give a file path, or the directory alone")
        if os.path.exists(path) and not overwrite:
            raise CliError(f"--out: {path} already exists; pass --overwrite to replace it, or choose another --out")
    for directory in sorted({os.path.dirname(os.path.abspath(path)) for path in paths}):
        probe_writable(directory)


def probe_writable(directory: str) -> None:
    """A `CliError` unless a file can be created in `directory` (or, when it does not exist yet, in its nearest
    existing ancestor, where it will be created); tried with a real temporary file, which permissions, read-only
    mounts and root alike answer truly."""
    existing = directory
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise CliError(f"--out: cannot create {directory}: {existing} is a file; choose another --out")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise CliError(f"--out: cannot write into {existing} ({err.strerror}); choose a writable --out or fix the "
                       f"permissions there") from None


def output_file(out: str) -> bool:
    """Whether `--out` names a file (its suffix is an audio container) rather than a directory."""
    return os.path.splitext(out)[1].lower() in CONTAINERS


def output_paths(out: str, prompts: list[str | None], suffix: str = ".wav") -> list[str]:
    """One path per prompt (None: an unconditional clip) under `out`, or `out` itself when it names a file."""
    if output_file(out):
        return [out]
    names = []
    for i, prompt in enumerate(prompts):
        slug = "unconditional" if prompt is None else re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48]
        slug = slug or "prompt"
        names.append(os.path.join(out, f"{i:02d}-{slug}{suffix}"))
    return names


class ProgressBar:
    """A one-line text progress bar over decoding steps (stderr), all windows of a long generation counted as one
    run (`MusicGen.generate` reports them so). The rate and the time left count from the first report, so the first
    compilation stays out of them."""

    def __init__(self, label: str, enabled: bool):
        self.label, self.enabled = label, enabled
        self.origin: tuple[int, float] | None = None  # (step, time) of the first report

    def __call__(self, step: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.origin is None:
            self.origin = (step, now)
        width = 30
        filled = int(width * step / max(total, 1))
        done, elapsed = step - self.origin[0], now - self.origin[1]
        rate = f"{done / elapsed:.1f} steps/s" if done and elapsed > 0 else "..."
        if done and elapsed > 0 and step < total:
            rate += f", {(total - step) * elapsed / done:.0f} s left"
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {step}/{total} steps {rate}  ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.origin is not None:
            sys.stderr.write("\n")
            sys.stderr.flush()


def fallback_path(path: str, directory: str | None = None) -> str:
    """Where a clip whose `path` cannot be written is kept instead: a new name in `directory` (default: the
    system's temporary directory), keeping the file's name and container."""
    stem, suffix = os.path.splitext(os.path.basename(path))
    fd, fallback = tempfile.mkstemp(prefix=f"mgjax-unsaved-{stem}-", suffix=suffix,
                                    dir=directory or tempfile.gettempdir())
    os.close(fd)
    return fallback


def save_clip(write, path: str, *args) -> tuple[str, OSError | None]:
    """`write(path, *args)`; when that fails with an OSError, the clip goes to a `fallback_path` instead ->
    `(the path written, the error or None)`. A failing fallback raises the first error."""
    try:
        return write(path, *args), None
    except OSError as err:
        fallback = fallback_path(path)
        try:
            return write(fallback, *args), err
        except OSError:
            os.remove(fallback)
            raise err from None


def read_inputs(args) -> dict:
    """`{flag: (wav [C, N], sample rate)}` of --continue and --melody, read (and checked finite) before the model
    loads."""
    from mgjax.audio import read_audio

    inputs = {}
    for flag, path in (("--continue", args.continue_wav), ("--melody", args.melody)):
        if path:
            try:
                inputs[flag] = read_audio(path)
            except (ValueError, FileNotFoundError) as err:
                raise CliError(f"{flag}: {err}") from None
    return inputs


def load_model(checkpoint_dir: str):
    """An mgjax checkpoint, or a transformers MusicGen directory (or hub cache folder) converted in memory."""
    import mgjax
    from mgjax.checkpoint import META_FILE
    from mgjax.convert import detect_format, resolve_hub_cache

    if os.path.isfile(os.path.join(checkpoint_dir, META_FILE)):
        return mgjax.MusicGen.load(checkpoint_dir)
    try:
        transformers_dir = detect_format(resolve_hub_cache(checkpoint_dir)) == "transformers"
    except ValueError:  # not a checkpoint of any kind we read (ConversionError): MusicGen.load says what it is not
        transformers_dir = False
    if not transformers_dir:
        return mgjax.MusicGen.load(checkpoint_dir)
    print(f"converting the transformers checkpoint {checkpoint_dir} in memory (to skip this on every run: "
          f"python -m mgjax.convert {checkpoint_dir} DST, then --checkpoint DST)", file=sys.stderr)
    return mgjax.MusicGen.from_transformers(checkpoint_dir)


def run(args) -> int:
    validate(args)
    note = long_duration_note(args.duration)
    if note:
        print(f"warning: --duration {note}", file=sys.stderr)
    checkpoint_dir = args.checkpoint or DEFAULT_CHECKPOINT
    if not os.path.isdir(checkpoint_dir):
        if args.checkpoint:
            raise CliError(f"checkpoint directory {checkpoint_dir} does not exist")
        print(NO_CHECKPOINT_HELP.format(path=os.path.relpath(checkpoint_dir)), file=sys.stderr)
        return 2

    import numpy as np

    from mgjax.audio import conform, normalize_audio, write_audio

    inputs = read_inputs(args)
    mg = load_model(checkpoint_dir)
    if args.int8:
        mg = mg.with_int8_weights()
    if args.extend_stride is not None:
        mg = mg.with_extend_stride(args.extend_stride)
    if args.dtype and args.dtype != mg.config.lm.compute_dtype:
        mg = mg.with_compute_dtype(args.dtype)
    prompt_audio = None
    if args.continue_wav:
        prompt_audio = conform(*inputs["--continue"], mg.sample_rate, mg.channels)
        if prompt_audio.shape[-1] / mg.sample_rate >= args.duration:
            raise CliError(f"--continue audio ({prompt_audio.shape[-1] / mg.sample_rate:.2f} s) must be shorter "
                           f"than --duration ({args.duration} s)")
    melody = None
    if args.melody:
        from mgjax.conditioning.fuser import takes_melody
        if not takes_melody(mg.config.lm):
            raise CliError(f"--melody needs a MusicGen-melody checkpoint; {checkpoint_dir} conditions on text only")
        melody = conform(*inputs["--melody"], mg.sample_rate, 1)
    paths = output_paths(args.out, args.prompt, "." + args.audio_format)
    written, failed, audio_seconds, start = [], [], 0.0, time.perf_counter()
    for first in range(0, len(args.prompt), args.batch_size):
        prompts = args.prompt[first: first + args.batch_size]
        batch_prompt_audio = None if prompt_audio is None else np.repeat(prompt_audio[None], len(prompts), axis=0)
        batch_melody = None if melody is None else np.repeat(melody[None], len(prompts), axis=0)
        bar = ProgressBar(f"prompts {first + 1}-{first + len(prompts)}", not args.no_progress)
        common = dict(duration=args.duration, prompt_audio=batch_prompt_audio, top_k=args.top_k, top_p=args.top_p,
                      temperature=args.temperature, greedy=args.greedy,
                      seed=(args.seed + first) % (MAX_SEED + 1),
                      progress=None if args.no_progress else bar, progress_every=10)
        if args.unconditional:
            out = mg.generate_unconditional(len(prompts), **common)
        else:
            out = mg.generate(prompts, melody=batch_melody, cfg_coef=args.cfg, **common)
        bar.close()
        for wav, path in zip(out.wav, paths[first: first + len(prompts)]):
            wav = normalize_audio(wav, mg.sample_rate, args.normalize, loudness_target=args.loudness,
                                  compressor=True)
            saved, error = save_clip(write_audio, path, wav, mg.sample_rate, args.format)
            (written if error is None else failed).append((saved, path, error))
            audio_seconds += wav.shape[-1] / mg.sample_rate
    elapsed = time.perf_counter() - start
    for saved, _, _ in written:
        print(f"wrote {saved}")
    print(f"generated {audio_seconds:.1f} s of audio in {elapsed:.1f} s "
          f"(real-time factor {audio_seconds / elapsed:.2f}x, compile time included)")
    for saved, path, error in failed:
        print(f"error: cannot write {path} ({error.strerror or error}); the audio is kept in {saved}: move it "
              f"where you want it", file=sys.stderr)
    return 1 if failed else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    aot.prepare(args)
    from mgjax.runtime import keep_host_memory, use_compilation_cache

    keep_host_memory()  # before JAX starts its threads
    if not args.compile_only:  # TPU executables have no place in this machine's cache
        use_compilation_cache(args.compile_cache)
    warnings.showwarning = lambda message, *_args, **_kwargs: print(f"warning: {message}", file=sys.stderr)
    try:
        return compile_check(args) if args.compile_only else run(args)
    except CliError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
