"""Untrusted input stays harmless (issue 24): checkpoints never run code, NaN/inf and absurd sizes are refused before
anything loads, no work is lost at the end, corrupt training checkpoints are skipped, leftovers are cleaned up and
outputs are readable, resumed logs count each step once, unknown prompt words are reported; plus a fuzz of the CLI
and API argument checks. Bad input: exit status 2, one line naming the problem and the fix, no traceback."""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the malicious checkpoints are written with torch.save")
soundfile = pytest.importorskip("soundfile")

import mgjax  # noqa: E402
from mgjax import checkpoint, validation  # noqa: E402
from mgjax.convert.io import UnsafePickleError, load_transformers_state_dict  # noqa: E402
from mgjax.text.tokenizer import UnknownWordsWarning  # noqa: E402

from helpers_scripts import ROOT, load_script  # noqa: E402

DEMO = os.path.join(ROOT, "mgjax", "assets", "demo")
sample = load_script("sample.py", "sample_cli_untrusted")


class Payload:
    """Unpickling this creates the directory `marker`: proof that loading ran code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def run_script(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def assert_clean_refusal(result: subprocess.CompletedProcess, *phrases: str) -> None:
    """Exit status 2, no traceback, every phrase in the error."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for phrase in phrases:
        assert phrase in result.stderr, (phrase, result.stderr[-2000:])


def cli_error(argv: list[str]) -> str:
    """The message `sample.py`'s checks (parse + validate, nothing loaded) give for `argv`, or '' when accepted."""
    args = sample.parse_args(argv)
    try:
        sample.validate(args)
    except (sample.CliError, ValueError) as err:
        return str(err)
    return ""


@pytest.fixture(scope="module")
def demo():
    return mgjax.MusicGen.load(DEMO)


# --- 1. loading never runs code ---------------------------------------------------------------------------------

def test_malicious_pickles_never_run(tmp_path):
    """A `__reduce__` payload in a transformers `pytorch_model.bin`, in audiocraft's `state_dict.bin`, and through
    `sample.py --checkpoint`: refused unread (the payload's directory never appears), naming the object and the fix;
    where safetensors sit beside the pickle, the safetensors are read."""
    marker = str(tmp_path / "pwned")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "musicgen"}))
    torch.save({"lm.weight": torch.zeros(2), "x": Payload(marker)}, hf / "pytorch_model.bin")
    with pytest.raises(UnsafePickleError, match=r"posix\.mkdir.*unpickling objects can run any code.*safetensors"):
        mgjax.convert_checkpoint(str(hf), str(tmp_path / "out"))
    assert not os.path.exists(marker) and not (tmp_path / "out").exists()

    from mgjax.convert.__main__ import main as convert_main
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert convert_main([str(hf), str(tmp_path / "out")]) == 2
    assert "pickled Python object (posix.mkdir)" in stderr.getvalue() and not os.path.exists(marker)

    ac = tmp_path / "ac"
    ac.mkdir()
    torch.save({"best_state": {"w": torch.zeros(1)}, "xp.cfg": Payload(marker)}, ac / "state_dict.bin")
    torch.save({"best_state": {"w": torch.zeros(1)}, "xp.cfg": "{}"}, ac / "compression_state_dict.bin")
    with pytest.raises(UnsafePickleError, match="posix.mkdir"):
        mgjax.convert_checkpoint(str(ac), str(tmp_path / "out"), t5_dir=str(hf))
    assert not os.path.exists(marker)

    from safetensors.numpy import save_file
    save_file({"safe": np.ones(3, np.float32)}, str(hf / "model.safetensors"))
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):  # both indexes: safetensors wins
        target = name.replace(".index.json", "")
        (hf / name).write_text(json.dumps({"weight_map": {"safe": target}}))
    assert list(load_transformers_state_dict(str(hf))) == ["safe"] and not os.path.exists(marker)

    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin.index.json"):
        os.remove(hf / name)
    result = run_script("sample.py", "--checkpoint", str(hf), "--prompt", "x", "--out", str(tmp_path / "a.wav"),
                        "--compile-cache", "")
    assert_clean_refusal(result, "posix.mkdir", "unpickling objects can run any code")
    assert not os.path.exists(marker) and not (tmp_path / "a.wav").exists()


# --- 2. NaN and infinity ------------------------------------------------------------------------------------------

def test_nan_and_infinity_are_refused_by_the_cli_and_the_api(demo, tmp_path):
    out = str(tmp_path / "o.wav")
    for flag, value, fix in (("--cfg", "nan", "1 turns guidance off"), ("--temperature", "inf", "--greedy"),
                             ("--top-p", "nan", "0 turns top-p filtering off"), ("--duration", "-inf", "--continue")):
        message = cli_error(["--prompt", "x", "--out", out, f"{flag}={value}"])
        assert message.startswith(f"{flag} must be a finite number") and fix in message, message
    for name, value in (("cfg_coef", math.nan), ("temperature", math.inf), ("top_p", math.nan)):
        with pytest.raises(validation.InvalidInput, match=f"^{name} must be a finite number"):
            demo.generate(["x"], duration=0.1, **{name: value})

    bad = np.zeros((1, 1, 3200), np.float32)
    bad[0, 0, 5], bad[0, 0, 9] = np.nan, np.inf
    for kwargs in (dict(prompt_audio=bad), dict(prompt_audio=bad[:, 0])):
        with pytest.raises(validation.InvalidInput, match="prompt_audio holds 2 NaN or infinite samples.*finite"):
            demo.generate(["x"], duration=1.0, **kwargs)
    with pytest.raises(validation.InvalidInput, match="melody holds 2 NaN"):
        validation.finite_audio("melody", bad)

    wav = tmp_path / "nan.wav"
    soundfile.write(wav, bad[0, 0], 32000, subtype="FLOAT")
    for flag in ("--continue", "--melody"):
        args = sample.parse_args(["--prompt", "x", flag, str(wav), "--out", out])
        with pytest.raises(sample.CliError, match=f"{flag}: .*nan.wav holds 2 NaN or infinite samples.*re-export"):
            sample.read_inputs(args)
    result = run_script("sample.py", "--prompt", "x", "--cfg", "nan", "--out", out, "--compile-cache", "")
    assert_clean_refusal(result, "--cfg must be a finite number in [0, 100], got nan")
    assert not os.path.exists(out)


# --- 3. no work lost at the end -----------------------------------------------------------------------------------

def test_output_is_checked_before_generating_and_kept_when_writing_fails(tmp_path):
    existing = tmp_path / "take.wav"
    existing.write_bytes(b"precious")
    message = cli_error(["--prompt", "x", "--out", str(existing)])
    assert "already exists; pass --overwrite to replace it" in message
    assert cli_error(["--prompt", "x", "--out", str(existing), "--overwrite"]) == ""
    folder = tmp_path / "clips"
    folder.mkdir()
    (folder / "00-calm-piano.wav").write_bytes(b"old")
    assert "00-calm-piano.wav already exists" in cli_error(["--prompt", "calm piano", "--out", str(folder)])
    assert existing.read_bytes() == b"precious"

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert "is a file; choose another --out" in cli_error(["--prompt", "x", "--out", str(blocker / "a.wav")])
    if os.geteuid() != 0:  # root writes into read-only folders; the file-in-the-way case above holds for everyone
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        assert "cannot write into" in cli_error(["--prompt", "x", "--out", str(locked / "a.wav")])

    from mgjax.audio import write_audio
    wav = np.full((1, 320), 0.25, np.float32)
    saved, error = sample.save_clip(write_audio, str(blocker / "a.wav"), wav, 32000, "float")
    try:
        assert isinstance(error, OSError) and os.path.basename(saved).startswith("mgjax-unsaved-a-")
        np.testing.assert_allclose(soundfile.read(saved)[0], wav[0])
        assert os.stat(saved).st_mode & 0o600 == 0o600
    finally:
        os.remove(saved)
    result = run_script("sample.py", "--prompt", "x", "--out", str(existing), "--compile-cache", "")
    assert_clean_refusal(result, "already exists; pass --overwrite")
    assert existing.read_bytes() == b"precious"


# --- 4. a corrupt latest training checkpoint ----------------------------------------------------------------------

TRAIN = ["train.batch_size=8", "train.max_text_tokens=8", "train.segment_duration=0.6", "train.warmup_steps=0",
         "train.total_steps=4", "train.checkpoint_every=2", "train.log_every=1", "train.eval_every=0"]


def train_argv(output, quiet: bool = True) -> list[str]:
    return ["--config", "train-tiny", "--synthetic", *TRAIN, f"train.output_dir={output}"] + (["--quiet"] * quiet)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run to step 4 with checkpoints at 2 and 4 (and metrics of steps 1-4)."""
    import jax
    from mgjax import sharding

    jax.set_mesh(sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    output = tmp_path_factory.mktemp("run")
    cli = load_script("train.py", "train_cli_untrusted")
    assert cli.main(train_argv(output)) == 0
    return cli, output


def _truncate_largest_data_file(step_dir: str) -> None:
    path = max(glob.glob(f"{step_dir}/state/ocdbt.process_0/d/*"), key=os.path.getsize)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's abandoned reads
def test_resume_skips_a_corrupt_latest_checkpoint(trained, tmp_path):
    """Truncated data, a missing `_METADATA`, an empty step folder: resumed from the newest intact step with a
    short warning naming the step and the cause; the broken step is moved aside; none intact: a few lines."""
    from mgjax import training
    from mgjax.config import load_config

    cli, output = trained
    config = load_config("train-tiny", TRAIN)
    abstract = training.programs(config, _mesh()).abstract_state
    breakages = {"truncated or corrupt": _truncate_largest_data_file,
                 "_METADATA is missing": lambda d: os.remove(f"{d}/state/_METADATA"),
                 "is empty": lambda d: (shutil.rmtree(d), os.mkdir(d))}
    for cause, breakage in breakages.items():
        directory = tmp_path / cause.replace(" ", "-")
        shutil.copytree(output / "checkpoints", directory)
        breakage(str(directory / "4"))
        with checkpoint.TrainCheckpointer(str(directory), save_every=2, keep=3) as ckpt:
            with pytest.warns(UserWarning, match=rf"step 4: .*{cause}.*resuming from step 2") as record:
                state, meta = ckpt.restore(abstract)
            assert int(state.step) == 2 and meta["data_position"] == 2 and ckpt.all_steps() == [2]
        text = next(str(w.message) for w in record if "resuming from" in str(w.message))
        assert len(text) < 600 and "TensorStore(" not in text, text
        assert (directory / "4.corrupt").is_dir() and not (directory / "4").exists()

    directory = tmp_path / "all"
    shutil.copytree(output / "checkpoints", directory)
    for step in ("2", "4"):
        os.remove(directory / step / "state" / "_METADATA")
    with checkpoint.TrainCheckpointer(str(directory), save_every=2, keep=3) as ckpt:
        with pytest.raises(checkpoint.CheckpointError) as error:
            ckpt.restore(abstract)
    lines = str(error.value).splitlines()
    assert len(lines) <= 4 and "step 4:" in lines[1] and "step 2:" in lines[2] and "run again" in lines[-1]


def _mesh():
    import jax
    from mgjax import sharding
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    jax.set_mesh(mesh)
    return mesh


# --- 8. logs after a resume -------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's abandoned reads
def test_resumed_run_logs_each_step_once(trained, tmp_path, capsys):
    """The train CLI resumes past a truncated latest checkpoint (step 4 -> from 2) and its metrics.jsonl counts
    every step once; `trim_metrics` drops records past the resumed step and a torn last line."""
    cli, output = trained
    run = tmp_path / "run"
    shutil.copytree(output, run)
    _truncate_largest_data_file(str(run / "checkpoints" / "4"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(train_argv(run, quiet=False)) == 0
    assert any("step 4: a data file under" in str(w.message) for w in caught)
    assert f"resumed from {run}/checkpoints at step 2" in capsys.readouterr().out
    with open(run / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7)) + '{"step": 7, "lo')
    assert cli.trim_metrics(str(metrics), 4) == 3
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4]
    assert cli.trim_metrics(str(metrics), 4) == 0 and not glob.glob(f"{tmp_path}/metrics.jsonl.tmp-*")


# --- 5. absurd sizes ----------------------------------------------------------------------------------------------

def test_absurd_sizes_are_refused_before_anything_loads(tmp_path, monkeypatch, capsys):
    def no_loading(_directory):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(sample, "load_model", no_loading)
    out = str(tmp_path / "o.wav")
    for argv, message in ((["--duration", "1e6"], "--duration must be a finite number in (0, 3600] seconds"),
                          (["--duration", "inf"], "--duration must be a finite number"),
                          (["--seed", "9" * 23], "--seed must lie in [0, 4294967295]"),
                          (["--batch-size", "0"], "--batch-size must lie in [1, 10000]")):
        with pytest.raises(ValueError, match=re.escape(message)):
            sample.run(sample.parse_args(["--prompt", "x", "--out", out, *argv]))
    with pytest.raises(AssertionError, match="the model was loaded"):  # a long piece: warned, then it goes ahead
        sample.run(sample.parse_args(["--prompt", "x", "--out", out, "--duration", "1200"]))
    assert "warning: --duration 1200 s of audio is a long generation" in capsys.readouterr().err

    cli = load_script("train.py", "train_cli_sizes")
    assert cli.main(["--config", "train-tiny", "train.batch_size=0", f"train.output_dir={tmp_path}/run"]) == 2
    err = capsys.readouterr().err
    assert "train.batch_size must lie in [1," in err and "as an override" in err
    assert not (tmp_path / "run").exists()


def test_progress_counts_over_every_window():
    """A generation of several windows (`generate`'s path from the text states on) reports one rising count up to
    the steps of all windows together. The tiny LM alone: no codec or text encoder is needed."""
    import jax

    from mgjax.api import init_lm_params
    from mgjax.config import load_config
    from mgjax.sampling import SamplingConfig, steps_to_sample

    config = load_config("tiny")
    config = dataclasses.replace(config, lm=dataclasses.replace(config.lm, max_duration=0.2, extend_stride=0.1))
    mg = mgjax.MusicGen(config, {"lm": init_lm_params(config), "codec": {}, "text": {}})
    seen = []
    codes, _ = mg.generate_windows(np.zeros((1, 2, config.text.d_model), np.float32), np.ones((1, 2), np.int32),
                                   np.zeros((1, config.lm.num_codebooks, 0), np.int32), 20, SamplingConfig(top_k=5),
                                   jax.random.key(0), progress_every=4,
                                   progress=lambda step, total: seen.append((step, total)))
    assert codes.shape[-1] == 20
    steps, totals = [s for s, _ in seen], {t for _, t in seen}
    assert len(totals) == 1 and steps == sorted(steps) and len(set(steps)) == len(steps) and steps[-1] in totals
    window, stride = mg.window_frames()
    assert len(mgjax.api.window_plan(20, window, stride)) == 3
    assert steps[-1] == sum(steps_to_sample(config.lm, window, 0 if i == 0 else window - stride) for i in range(3))


# --- 6. leftovers and permissions ---------------------------------------------------------------------------------

def test_leftovers_are_removed_and_outputs_are_readable(tmp_path):
    """Temporaries of a killed write (dead process id, or none) are removed by the next write to the same path, a
    running writer's are kept; the checkpoint gets a normal umask mode; SIGTERM unwinds the CLI's write."""
    dead = tmp_path / ".ckpt.tmp-999999999-abc"
    legacy = tmp_path / ".ckpt.tmp-k3j2"
    live = tmp_path / f".ckpt.tmp-{os.getpid()}-live"
    for folder in (dead, legacy, live):
        folder.mkdir()
        (folder / "big").write_bytes(b"0" * 1000)
    old_mask = os.umask(0o022)
    try:
        with pytest.warns(UserWarning, match="removed 2 leftover"):
            checkpoint.save(str(tmp_path / "ckpt"), "codec", {"codec": {}}, {"codec": {"a": np.zeros(3, np.float32)}})
    finally:
        os.umask(old_mask)
    assert not dead.exists() and not legacy.exists() and live.is_dir()
    assert os.stat(tmp_path / "ckpt").st_mode & 0o777 == 0o755
    for root, dirs, files in os.walk(tmp_path / "ckpt"):
        assert all(os.stat(os.path.join(root, d)).st_mode & 0o005 == 0o005 for d in dirs)
        assert all(os.stat(os.path.join(root, f)).st_mode & 0o004 for f in files)

    script = ("import os, signal, sys, time\n"
              "from mgjax import checkpoint\n"
              "import mgjax.convert.__main__ as cli\n"
              "def convert(*_a, **_k):\n"
              "    with checkpoint.atomic_directory(sys.argv[2]):\n"
              "        os.kill(os.getpid(), signal.SIGTERM)\n"
              "        time.sleep(30)\n"
              "import mgjax.convert\n"
              "mgjax.convert.convert_checkpoint = convert\n"
              "sys.exit(cli.main(sys.argv[1:]))\n")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(tmp_path / "killed")], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 128 + 15, result.stderr[-2000:]
    assert not glob.glob(f"{tmp_path}/.killed.*") and not (tmp_path / "killed").exists()


# --- 7. API messages ----------------------------------------------------------------------------------------------

def test_api_refuses_bad_arguments_with_the_cli_words(demo):
    cases = [(dict(prompts=None), "prompts is None: give a list of text descriptions.*generate_unconditional"),
             (dict(duration="abc"), r"duration must be a finite number in \(0, 3600\] seconds, got 'abc'"),
             (dict(seed=1.5), r"seed must be a whole number in \[0, 4294967295\], got 1.5"),
             (dict(top_k=2.5), r"top_k must be a whole number .* got 2.5; 0 turns top-k filtering off"),
             (dict(seed=2 ** 70), r"seed must lie in \[0, 4294967295\], got 1180591620717411303424"),
             (dict(prompt_sample_rate=0), r"prompt_sample_rate must lie in \[1000, 768000\], got 0; give the audio's")]
    for kwargs, message in cases:
        given = {"prompts": ["x"], "duration": 0.1, **kwargs}
        with pytest.raises(validation.InvalidInput, match=message):
            demo.generate(given.pop("prompts"), **given)
    with pytest.raises(validation.InvalidInput, match="seed must be a whole number"):
        demo.generate_unconditional(1, duration=0.1, seed=1.5)
    api_words = pytest.raises(validation.InvalidInput)
    with api_words as api:
        demo.generate(["x"], cfg_coef=-1.0)
    cli = cli_error(["--prompt", "x", "--cfg", "-1", "--out", "/nonexistent-dir/o.wav"])
    assert cli.replace("--cfg", "cfg_coef") == str(api.value)  # one validation function, two spellings


# --- 9. unknown words ---------------------------------------------------------------------------------------------

def test_unknown_prompt_words_are_reported_once(demo):
    known = [w for w in sorted(demo.tokenizer.get_vocab()) if w.isalpha()][:3]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownWordsWarning)
        demo.tokenize([" ".join(known)])  # all known: silent
    with pytest.warns(UnknownWordsWarning) as record:
        demo.tokenize([f"{known[0]} zorblax frobnitz zorblax", "zorblax"])
    assert len(record) == 1
    assert "2 prompt word(s) unknown" in str(record[0].message)
    assert "'zorblax', 'frobnitz'; rephrase with words it knows" in str(record[0].message)


# --- fuzz ---------------------------------------------------------------------------------------------------------

def _fuzz_values(rng: random.Random) -> list[str]:
    alphabet = "abcxyz0123456789.-+eE_ nNaIifF"
    randoms = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8))) for _ in range(6)]
    return randoms + ["nan", "-nan", "inf", "-inf", "1e308", "-1e308", "9" * 30, "-" + "9" * 30, "-5", "0", "1",
                      "0.5", "1e-300", ""]


def test_fuzz_cli_arguments_end_in_success_or_one_clear_line(tmp_path):
    rng = random.Random(24)
    options = ("--duration", "--top-k", "--top-p", "--temperature", "--cfg", "--seed", "--loudness", "--batch-size",
               "--unconditional", "--extend-stride")
    outcomes = {"accepted": 0, "refused": 0, "usage": 0}
    for option in options:
        for value in _fuzz_values(rng):
            argv = ["--prompt", "x", "--out", str(tmp_path / "o.wav"), f"{option}={value}"]
            stderr = io.StringIO()
            with contextlib.redirect_stderr(stderr):
                try:
                    message = cli_error(argv)
                except SystemExit as exit_:  # argparse: not a number of the option's type
                    assert exit_.code == 2 and f"argument {option}" in stderr.getvalue(), (argv, stderr.getvalue())
                    outcomes["usage"] += 1
                    continue
            if message:
                assert "\n" not in message and (option in message or "--unconditional" in message), (argv, message)
                outcomes["refused"] += 1
            else:  # accepted: a finite number of a sane size
                assert math.isfinite(float(value)) and abs(float(value)) < 1e12, argv
                outcomes["accepted"] += 1
    assert min(outcomes.values()) > 0, outcomes


def test_fuzz_api_arguments_end_in_success_or_a_named_error(demo, monkeypatch):
    """Every numeric argument of `generate` with NaN, infinities, huge, negative, wrong-typed values: a result or
    a ValueError naming the argument (generation itself is stubbed: this is about the checks)."""
    def windows(self, cond, mask, prompt_codes, frames, *args, **kwargs):
        return np.zeros((cond.shape[0], self.config.lm.num_codebooks, frames), np.int32), []

    monkeypatch.setattr(mgjax.MusicGen, "generate_windows", windows)
    monkeypatch.setattr(mgjax.MusicGen, "decode", lambda self, codes: np.zeros((codes.shape[0], 1, 8), np.float32))
    values = [math.nan, math.inf, -math.inf, 1e308, -1e308, 10 ** 30, -(10 ** 30), -5, 0, 1, 0.5, 3, 44100, "abc",
              None, True, [1], np.float32(0.7), np.int64(7)]
    accepted = refused = 0
    for name in ("duration", "top_k", "top_p", "temperature", "cfg_coef", "seed", "prompt_sample_rate",
                 "melody_sample_rate"):
        for value in values:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UnknownWordsWarning)
                try:
                    out = demo.generate(["x"], **{"duration": 0.1, name: value})
                except ValueError as err:
                    assert str(err).startswith(name) and "\n" not in str(err), (name, value, err)
                    refused += 1
                    continue
            assert out.codes.shape[:2] == (1, demo.config.lm.num_codebooks)
            accepted += 1
    assert accepted and refused
