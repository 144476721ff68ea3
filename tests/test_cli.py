"""End to end through the command lines: `python -m mgjax.convert`, then `python sample.py`."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch oracle needs torch (pip install -e .[test])")
soundfile = pytest.importorskip("soundfile")

from helpers_tokenizer import build_test_tokenizer  # noqa: E402
from oracle import musicgen  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48, num_codebooks=4,
               vocab_size=32)


def run(*args, check=True):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    src = tmp_path_factory.mktemp("hf")
    musicgen(DECODER, seed=4).save_pretrained(src)
    build_test_tokenizer(str(src))
    dst = tmp_path_factory.mktemp("mg") / "ckpt"
    result = run("-m", "mgjax.convert", str(src), str(dst))
    assert "wrote" in result.stdout
    return dst


def test_sample_writes_wavs_of_the_requested_duration(converted, tmp_path):
    out = tmp_path / "wavs"
    result = run("sample.py", "--checkpoint", str(converted), "--prompt", "calm piano melody",
                 "--prompt", "happy rock with drums", "--duration", "0.5", "--out", str(out), "--seed", "3")
    paths = sorted(out.glob("*.wav"))
    assert len(paths) == 2 and all(f"wrote {p}" in result.stdout for p in paths)
    assert "real-time factor" in result.stdout
    for path in paths:
        data, rate = soundfile.read(path)
        assert rate == 32000
        assert abs(len(data) - 0.5 * 32000) <= 32000 / 50  # within one frame
        assert np.isfinite(data).all() and np.abs(data).max() > 0


def test_sample_continues_an_audio_prompt(converted, tmp_path):  # with int8 LM weights (--int8)
    prompt = tmp_path / "prompt.wav"
    t = np.arange(int(0.2 * 44100)) / 44100
    soundfile.write(prompt, np.stack([np.sin(2 * np.pi * 220 * t)] * 2, axis=1) * 0.5, 44100)  # stereo, 44.1 kHz
    out = tmp_path / "cont.wav"
    run("sample.py", "--checkpoint", str(converted), "--prompt", "calm piano", "--duration", "0.4",
        "--continue", str(prompt), "--out", str(out), "--format", "float", "--no-progress", "--int8",
        "--normalize", "peak")
    data, rate = soundfile.read(out)
    assert rate == 32000 and abs(len(data) - 0.4 * 32000) <= 32000 / 50
    np.testing.assert_allclose(np.abs(data).max(), 10 ** (-1 / 20), rtol=1e-5)  # peak at -1 dBFS


@pytest.mark.parametrize("args, message", [
    (["--duration", "0"], "--duration"),
    (["--top-p", "2"], "--top-p"),
    (["--temperature", "0"], "--temperature"),
    (["--continue", "/nonexistent.wav"], "does not exist"),
    (["--batch-size", "0"], "--batch-size"),
    (["--loudness", "3"], "--loudness must lie in (-70, 0) LUFS"),
    (["--out", "x.mp3", "--format", "float"], "--format float is stored in .wav files only, not .mp3"),
    (["--prompts-file", "/nonexistent.txt"], "--prompts-file: /nonexistent.txt does not exist"),
])
def test_sample_rejects_bad_arguments(converted, args, message):
    result = run("sample.py", "--checkpoint", str(converted), "--prompt", "calm piano", *args, check=False)
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr


def test_sample_reads_prompts_from_a_file_and_computes_in_bfloat16(converted, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("calm piano\n\n  happy rock with drums  \n", encoding="utf-8")
    out = tmp_path / "clips"
    result = run("sample.py", "--checkpoint", str(converted), "--prompt", "lofi beat", "--prompts-file", str(prompts),
                 "--duration", "0.3", "--out", str(out), "--dtype", "bfloat16", "--no-progress",
                 "--audio-format", "flac")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00-lofi-beat.flac", "01-calm-piano.flac", "02-happy-rock-with-drums.flac"], result.stdout
    for name in names:
        data, rate = soundfile.read(out / name)
        assert rate == 32000 and np.isfinite(data).all() and abs(len(data) - 0.3 * 32000) <= 32000 / 50


def test_sample_unconditional_clips(converted, tmp_path):
    out = tmp_path / "free"
    result = run("sample.py", "--checkpoint", str(converted), "--unconditional", "3", "--batch-size", "2",
                 "--duration", "0.3", "--out", str(out), "--no-progress")
    names = sorted(p.name for p in out.glob("*.wav"))
    assert names == [f"{i:02d}-unconditional.wav" for i in range(3)], result.stdout
    clips = [soundfile.read(out / name)[0] for name in names]
    assert all(len(clip) == len(clips[0]) for clip in clips) and not np.array_equal(clips[0], clips[1])


def test_sample_keeps_compiled_programs_between_runs(converted, tmp_path):
    """`--compile-cache`: every program lands on disk, the generation's too, with the progress bar (calls of a few
    steps, no host callback inside) and without it (one loop); later runs read them and write the same audio."""
    cache, env = tmp_path / "xla", {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    args = ["sample.py", "--checkpoint", str(converted), "--prompt", "calm piano", "--duration", "0.3", "--top-k",
            "5", "--compile-cache", str(cache)]

    def cached(prefix):
        return [p.name for p in cache.iterdir() if p.name.startswith(prefix) and p.name.endswith("-cache")]

    for name, extra in (("bar1.wav", []), ("bar2.wav", []), ("plain.wav", ["--no-progress"])):
        subprocess.run([sys.executable, *args, *extra, "--out", str(tmp_path / name)], cwd=ROOT, env=env, check=True,
                       capture_output=True, timeout=600)
        assert cached("jit__encode_text") and cached("jit__advance") and cached("jit__start_generation")
    assert len(cached("jit__generate_codes")) == 1  # the --no-progress run's one loop
    first, second, plain = (soundfile.read(tmp_path / name)[0] for name in ("bar1.wav", "bar2.wav", "plain.wav"))
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, plain)


def test_sample_refuses_an_empty_prompts_file_and_no_prompt(converted, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    for args, message in ((["--prompts-file", str(empty)], "holds no prompt"), ([], "no prompt: give --prompt"),
                          (["--unconditional", "2", "--prompt", "x"], "--unconditional generates without")):
        result = run("sample.py", "--checkpoint", str(converted), *args, check=False)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_sample_reads_a_transformers_directory_directly(tmp_path):
    """`--checkpoint` may name a transformers MusicGen directory: converted in memory, the same audio as from its
    converted checkpoint."""
    src = tmp_path / "hf"
    musicgen(DECODER, seed=6).save_pretrained(src)
    build_test_tokenizer(str(src))
    ckpt = tmp_path / "ckpt"
    run("-m", "mgjax.convert", str(src), str(ckpt))
    outputs = {}
    for name, directory in (("direct", src), ("converted", ckpt)):
        result = run("sample.py", "--checkpoint", str(directory), "--prompt", "calm piano", "--duration", "0.3",
                     "--out", str(tmp_path / f"{name}.wav"), "--no-progress", "--compile-cache", "")
        outputs[name] = (tmp_path / f"{name}.wav").read_bytes()
        assert ("converting the transformers checkpoint" in result.stderr) == (name == "direct")
    assert outputs["direct"] == outputs["converted"]


def test_sample_refuses_a_missing_or_foreign_checkpoint(tmp_path):
    result = run("sample.py", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x", check=False)
    assert result.returncode != 0 and "does not exist" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "weights.bin").write_bytes(b"junk")
    result = run("sample.py", "--checkpoint", str(tmp_path / "foreign"), "--prompt", "x", check=False)
    assert result.returncode != 0 and "not an mgjax checkpoint" in result.stderr and "Traceback" not in result.stderr


def test_convert_cli_refuses_foreign_directory(tmp_path):
    result = run("-m", "mgjax.convert", str(tmp_path), str(tmp_path / "out"), check=False)
    assert result.returncode == 2 and "neither a transformers checkpoint" in result.stderr
    assert not (tmp_path / "out").exists()


def test_sample_refuses_melody_for_a_text_only_model(converted, tmp_path):
    melody = tmp_path / "melody.wav"
    soundfile.write(melody, np.zeros(3200), 32000)
    result = run("sample.py", "--checkpoint", str(converted), "--prompt", "x", "--melody", str(melody), check=False)
    assert result.returncode == 2 and "MusicGen-melody" in result.stderr and "Traceback" not in result.stderr


def test_progress_bar_counts_over_the_whole_generation(monkeypatch, capsys):
    """`MusicGen.generate` reports the steps of all windows of a long generation as one count (10, 20, ... 60 over
    two windows of 30): the bar stays on one line and its time left covers the whole generation, measured from
    the first report (20 steps in 2 s: 10 steps/s, 40 steps to go)."""
    from helpers_scripts import load_script

    sample = load_script("sample.py", "sample_cli")
    clock = iter([0.0, 1.0, 2.0])
    monkeypatch.setattr(sample.time, "perf_counter", lambda: next(clock))
    bar = sample.ProgressBar("prompts 1-1", True)
    for step in (10, 20, 30):
        bar(step, 60)
    bar.close()
    lines = [line.split("\r")[-1] for line in capsys.readouterr().err.strip().split("\n")]
    assert len(lines) == 1
    assert lines[0].rstrip().endswith("30/60 steps 10.0 steps/s, 3 s left")


def test_bench_train_threads_pins_the_process_and_refuses_an_impossible_count():
    """`bench_train.py --threads N` pins the whole process (both runtimes) to N CPUs, checked in a child process
    so this one keeps its CPUs; a count beyond what the process may use is refused with the allowed range."""
    from helpers_scripts import load_script
    bench = load_script(os.path.join("bench", "bench_train.py"), "bench_train")
    allowed = bench.allowed_cpus()
    for count in (0, len(allowed) + 1):
        with pytest.raises(SystemExit, match=rf"--threads {count}: .* pick 1\.\.{len(allowed)}"):
            bench.pin_to_cores(count)
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("this OS has no CPU affinity call")
    child = ("import os, sys; sys.path.insert(0, 'bench'); import bench_train as b; "
             "print(b.pin_to_cores(1), sorted(os.sched_getaffinity(0)))")
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
    assert out.strip() == f"{allowed[:1]} {allowed[:1]}"  # returned and applied
