"""bench/pattern_study.py end to end on a tiny budget: two patterns, a few steps, two held-out captions, the tiny
config; interrupted after the first pattern and rerun (the done pattern is not retrained, the other resumes from its
checkpoint); the report's tables and plots carry every column."""
from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import pattern_study  # noqa: E402
import pattern_study_report as report  # noqa: E402

STUDY = """
base: tiny
overrides: [train.total_steps=4, train.warmup_steps=1, train.batch_size=2, train.segment_duration=1.0,
            train.eval_every=2, train.eval_batches=1, train.checkpoint_every=2, train.log_every=1,
            train.valid_fraction=0.3, train.tensorboard=false, train.async_checkpointing=false,
            text.vocab_size=256, train.tokenizer_dir={tokenizer}]
corpus: {{dir: {corpus}, clips: 10, seed: 0, seconds: 1.0}}
evaluation: {{captions: 2, batch: 2, seconds: 1.0}}
budget_fractions: [0.5]
variants:
  - {{name: delay, overrides: [lm.pattern=delay]}}
  - {{name: flattening, overrides: [lm.pattern=unroll]}}
"""


# The tiny config has no codec checkpoint: its audio is encoded by a random codec, which train.py warns about.
pytestmark = pytest.mark.filterwarnings("ignore:neither train.codec_checkpoint nor train.pretrained")


class Interrupted(Exception):
    """Stands for the study being killed."""


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Runs the study twice: killed in the second pattern's first evaluation (its training to step 2 done), then
    to the end. Returns (out dir, the rerun's train_run calls, stdout of the rerun)."""
    tmp = tmp_path_factory.mktemp("study")
    config = tmp / "study.yaml"
    config.write_text(STUDY.format(tokenizer=os.path.join(ROOT, "mgjax", "assets", "demo", "tokenizer"),
                                   corpus=tmp / "corpus"))
    out = tmp / "out"
    argv = ["--config", str(config), "--out", str(out), "--quiet"]
    patch = pytest.MonkeyPatch()
    evaluate, calls = pattern_study.evaluate, []

    def killed_on_third(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:  # delay at steps 2 and 4 done; flattening trained to step 2
            raise Interrupted
        return evaluate(*args, **kwargs)

    patch.setattr(pattern_study, "evaluate", killed_on_third)
    with pytest.raises(Interrupted):
        pattern_study.main(argv)
    patch.undo()

    delay_done = {name: os.path.getmtime(out / "runs" / "delay-seed0" / name)
                  for name in ("eval-step2.json", "eval-step4.json", "metrics.jsonl")}
    train_run, trained = pattern_study.train_cli.train_run, []

    def spy(config, **kwargs):
        trained.append((os.path.basename(config.train.output_dir), kwargs.get("steps")))
        return train_run(config, **kwargs)

    patch.setattr(pattern_study.train_cli, "train_run", spy)
    try:
        assert pattern_study.main(argv) == 0
    finally:
        patch.undo()
    return out, trained, delay_done


def test_resume_skips_done_pattern_and_resumes_the_other(study):
    out, trained, delay_done = study
    assert trained == [("flattening-seed0", 2), ("flattening-seed0", 4)]  # delay is not trained again
    for name, mtime in delay_done.items():
        assert os.path.getmtime(out / "runs" / "delay-seed0" / name) == mtime, name
    runs = out / "runs" / "flattening-seed0"
    half = json.loads((runs / "eval-step2.json").read_text())
    full = json.loads((runs / "eval-step4.json").read_text())
    assert half["resumed_from"] == 2  # the killed run's checkpoint at step 2, not a fresh start
    assert full["resumed_from"] == 2 and full["step"] == 4
    steps = [json.loads(line)["step"] for line in (runs / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # every step logged once


def test_table_and_plots_have_every_column(study):
    out, _, _ = study
    md = (out / "study.md").read_text()
    for column in report.LOSS_COLUMNS + report.ADHERENCE_COLUMNS + ("cb 1", "cb 4"):
        assert f"| {column} |" in md or f" {column} |" in md, column
    for pattern in ("delay", "flattening"):
        assert f"\n| {pattern} | 0 | " in md  # the loss table's row
    assert "## At step 2 (50% of the budget" in md and "## Ranking at step 4" in md
    assert "real clips (ceiling)" in md and "| chance |" in md
    table_rows = [line for line in md.splitlines() if line.startswith("| delay |")]
    assert len(table_rows) == 2 and all("nan" not in row for row in table_rows)
    summary = json.loads((out / "study.json").read_text())
    assert set(summary["by_step"]) == {"2", "4"}
    full = summary["by_step"]["4"]
    assert full["flattening"]["decoding_steps_per_audio_second"] > 3 * full["delay"]["decoding_steps_per_audio_second"]
    for name in ("delay", "flattening"):
        assert len(full[name]["loss_per_codebook"]) == 4
        assert all(0 <= full[name]["adherence"][a]["ci95"][0] <= full[name]["adherence"][a]["accuracy"]
                   <= full[name]["adherence"][a]["ci95"][1] <= 1 for a in report.ATTRIBUTES)
    pytest.importorskip("matplotlib")
    for name in report.PLOTS:
        path = out / name
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_ties_and_ranks():
    # seed spread 0.05: 1.00 and 1.04 tie, 1.20 is behind both
    assert report.tied_ranks({"a": 1.0, "b": 1.04, "c": 1.2}, 0.05, lower_is_better=True) == \
        {"a": "1=", "b": "1=", "c": "3"}
    assert report.tied_ranks({"a": 0.5, "b": 0.7}, 0.0, lower_is_better=False) == {"a": "2", "b": "1"}
    assert report.ordering({"a": 1.0, "b": 1.04, "c": 1.2}, 0.05, True, ".2f") == "a (1.00) ≈ b (1.04) > c (1.20)"
    lo, hi = report.wilson_interval(32, 64)
    assert lo == pytest.approx(0.3809, abs=1e-3) and hi == pytest.approx(0.6191, abs=1e-3)
    assert all(report.wilson_interval(n, n)[1] == 1.0 and report.wilson_interval(0, n)[0] == 0.0
               for n in range(1, 300))  # p itself, not p -/+ a rounding error (a negative error bar)
    assert report.wilson_interval(0, 10)[0] == 0.0 and report.eval_steps(500, [0.5, 1.0]) == [250, 500]
    spread = report.seed_spread({"a": {"per_seed": {"valid loss": [2.0, 2.1]}},
                                 "b": {"per_seed": {"valid loss": [3.0]}}})
    assert spread["valid loss"] == pytest.approx(0.1)


def test_spaced_ticks_merge_neighbouring_step_rates():
    # delay 26, parallel 25.25, partial delay 25.5 share the label 25; 50.25 and 100.25 keep their own
    assert report.spaced_ticks([26.0, 25.25, 100.25, 50.25, 25.5]) == [25, 50, 100]
    assert report.spaced_ticks([]) == []
