"""The report of `bench/pattern_study.py`: tables (`study.md`), all numbers (`study.json`) and plots (PNG), built from
the evaluation records and training logs the study wrote. Pure host code (numpy, matplotlib); no JAX.

Ties: where a variant was trained with more than one seed, the spread of a metric between its seeds (max - min,
the largest over such variants) is the study's seed spread for that metric; two variants whose values differ by
less than it are tied (they share a rank, marked `=`). With one seed everywhere no tie is called, and the table
says so.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any

import numpy as np

ATTRIBUTES = ("key", "tonic", "mode", "tempo", "instrument", "drums")
CHANCE = {"key": 1 / 24, "tonic": 1 / 12, "mode": 0.5, "tempo": 1 / 3, "instrument": 0.25, "drums": 0.5}
# The columns of the two tables of study.md (the per-codebook loss columns follow "held-out loss").
LOSS_COLUMNS = ("pattern", "seeds", "LM positions per training clip", "decoding steps / s of audio",
                "train time (min)", "s / train step", "valid loss", "held-out loss (nats / code)",
                "sampling (s of audio / s)", "ms / decoding step", "rank (held-out loss)")
ADHERENCE_COLUMNS = ("pattern",) + ATTRIBUTES + ("mean", "rank (mean adherence)")
PLOTS = ("loss_vs_step.png", "loss_vs_time.png", "adherence.png", "quality_vs_steps.png")


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion `correct / n`."""
    if n <= 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # The interval always contains p; clamping to it keeps float rounding (p = 1: hi = 0.9999999999999999) from
    # putting p outside, which matplotlib's error bars refuse as a negative length.
    return (min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))


# ----------------------------------------------------------------------------------------------- reading

def eval_steps(total: int, fractions: list[float]) -> list[int]:
    """The steps a run is evaluated at: each fraction of `total` (rounded, at least 1) and `total` itself."""
    return sorted({max(1, int(round(f * total))) for f in fractions if f < 1} | {total})


def read_metrics(run_dir: str, config: Any) -> dict:
    """Training curves of one run from its metrics.jsonl: steps, train loss, validation points, and the training
    wall-clock at each logged step (seconds of train steps: `tokens_per_s` of each logged interval, so compilation,
    evaluation and the time between a kill and its resume are not counted)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    frames = max(1, int(round(config.train.segment_duration * config.codec.frame_rate)))
    tokens = config.train.batch_size * config.lm.num_codebooks * frames
    out = {"step": [], "loss": [], "time_s": [], "valid_step": [], "valid_loss": [], "valid_time_s": []}
    if not os.path.isfile(path):
        return out
    elapsed, previous = 0.0, 0
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = int(record["step"])
            rate = float(record.get("tokens_per_s") or 0)
            elapsed += (step - previous) * tokens / rate if rate > 0 else 0.0
            previous = step
            out["step"].append(step)
            out["loss"].append(float(record["loss"]))
            out["time_s"].append(elapsed)
            if "valid_loss" in record:
                out["valid_step"].append(step)
                out["valid_loss"].append(float(record["valid_loss"]))
                out["valid_time_s"].append(elapsed)
    return out


def read_records(runs: list[dict], steps_of: dict) -> dict:
    """`{(variant, step): [records of its seeds]}` of the evaluation records written so far; `steps_of[run name]`:
    the steps that run is evaluated at."""
    found: dict = {}
    for run in runs:
        for step in steps_of[run["name"]]:
            path = os.path.join(run["dir"], f"eval-step{step}.json")
            if os.path.isfile(path):
                with open(path) as f:
                    record = json.load(f)
                record["metrics"] = read_metrics(run["dir"], run["config"])
                found.setdefault((run["variant"], step), []).append(record)
    return found


# ----------------------------------------------------------------------------------------------- aggregation

def summarise(records: list[dict]) -> dict:
    """One variant at one step: seed means (adherence pooled over seeds), and each metric's per-seed values."""
    per_seed = {
        "valid loss": [r["valid_loss"] if r["valid_loss"] is not None else math.nan for r in records],
        "held-out loss": [float(np.mean(r["loss_per_codebook"])) for r in records],
        "mean adherence": [float(np.mean([r["adherence"][a]["accuracy"] for a in ATTRIBUTES])) for r in records],
        **{a: [r["adherence"][a]["accuracy"] for r in records] for a in ATTRIBUTES},
    }
    correct = {a: sum(r["adherence"][a]["correct"] for r in records) for a in ATTRIBUTES}
    n = sum(r["adherence"][ATTRIBUTES[0]]["n"] for r in records)
    train_time = []
    for r in records:
        metrics = r["metrics"]
        upto = [t for s, t in zip(metrics["step"], metrics["time_s"]) if s <= r["step"]]
        train_time.append(upto[-1] if upto else math.nan)
    first = records[0]
    return {
        "seeds": [r["seed"] for r in records], "step": first["step"], "total_steps": first["total_steps"],
        "per_seed": per_seed, "mean": {k: float(np.mean(v)) for k, v in per_seed.items()},
        "adherence": {a: {"accuracy": correct[a] / n, "ci95": list(wilson_interval(correct[a], n)), "n": n}
                      for a in ATTRIBUTES},
        "loss_per_codebook": np.mean([r["loss_per_codebook"] for r in records], axis=0).tolist(),
        "train_seq_steps": first["train_seq_steps"],
        "decoding_steps_per_audio_second": first["decoding_steps_per_audio_second"],
        "train_time_s": float(np.mean(train_time)),
        "s_per_step": float(np.mean(train_time)) / max(first["step"], 1),
        "sampling_audio_s_per_s": float(np.mean([r["sampling"]["audio_seconds_per_second"] for r in records])),
        "sampling_batch": first["sampling"]["batch"],
        "ms_per_decoding_step": float(np.mean([r["sampling"]["ms_per_decoding_step"] for r in records])),
    }


def seed_spread(summaries: dict) -> dict:
    """Per metric, the largest max - min between the seeds of one variant (0 where no variant has two seeds)."""
    spread: dict = {}
    for summary in summaries.values():
        for metric, values in summary["per_seed"].items():
            values = [v for v in values if not math.isnan(v)]
            if len(values) >= 2:
                spread[metric] = max(spread.get(metric, 0.0), max(values) - min(values))
    return spread


def tied_ranks(values: dict, spread: float, lower_is_better: bool) -> dict:
    """`{name: "1", "2=", ...}`: 1 + the number of names better by more than `spread`; '=' where another name lies
    within `spread` (a tie)."""
    sign = 1 if lower_is_better else -1
    ranks = {}
    for name, v in values.items():
        better = sum(1 for other, w in values.items() if other != name and sign * (v - w) > spread)
        tied = any(other != name and abs(v - w) <= spread for other, w in values.items())
        ranks[name] = f"{better + 1}{'=' if tied else ''}"
    return ranks


def ordering(values: dict, spread: float, lower_is_better: bool, fmt: str) -> str:
    """'a (1.0) ≈ b (1.1) > c (1.5)': sorted, '≈' between neighbours closer than `spread`."""
    names = sorted(values, key=lambda n: values[n] if lower_is_better else -values[n])
    parts = []
    for i, name in enumerate(names):
        if i:
            parts.append("≈" if abs(values[name] - values[names[i - 1]]) <= spread else ">")
        parts.append(f"{name} ({format(values[name], fmt)})")
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------- tables

def _markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _markdown_head(head: list[str]) -> list[str]:
    """A markdown table's header row and its rule."""
    return [_markdown_row(head), "|---" * len(head) + "|"]


def _fmt_seeds(values: list[float], fmt: str) -> str:
    mean = format(float(np.mean(values)), fmt)
    return mean if len(values) < 2 else f"{mean} ({' / '.join(format(v, fmt) for v in values)})"


def loss_table(summaries: dict, variants: list[str], spread: dict) -> str:
    k = len(next(iter(summaries.values()))["loss_per_codebook"])
    head = list(LOSS_COLUMNS[:8]) + [f"cb {i + 1}" for i in range(k)] + list(LOSS_COLUMNS[8:])
    present = [v for v in variants if v in summaries]
    ranks = tied_ranks({v: summaries[v]["mean"]["held-out loss"] for v in present},
                       spread.get("held-out loss", 0.0), lower_is_better=True)
    lines = _markdown_head(head)
    for v in present:
        s = summaries[v]
        valid = s["per_seed"]["valid loss"]
        cells = [v, ", ".join(map(str, s["seeds"])), str(s["train_seq_steps"]),
                 f"{s['decoding_steps_per_audio_second']:.1f}", f"{s['train_time_s'] / 60:.1f}",
                 f"{s['s_per_step']:.2f}", "n/a" if any(math.isnan(x) for x in valid) else _fmt_seeds(valid, ".4f"),
                 _fmt_seeds(s["per_seed"]["held-out loss"], ".4f")]
        cells += [f"{x:.3f}" for x in s["loss_per_codebook"]]
        cells += [f"{s['sampling_audio_s_per_s']:.1f} (batch {s['sampling_batch']})",
                  f"{s['ms_per_decoding_step']:.1f}", ranks[v]]
        lines.append(_markdown_row(cells))
    return "\n".join(lines)


def adherence_table(summaries: dict, variants: list[str], spread: dict, ref: dict | None) -> str:
    present = [v for v in variants if v in summaries]
    ranks = tied_ranks({v: summaries[v]["mean"]["mean adherence"] for v in present},
                       spread.get("mean adherence", 0.0), lower_is_better=False)
    lines = _markdown_head(list(ADHERENCE_COLUMNS))
    for v in present:
        s = summaries[v]
        cells = [v] + [f"{s['adherence'][a]['accuracy']:.1%} [{s['adherence'][a]['ci95'][0]:.0%}, "
                       f"{s['adherence'][a]['ci95'][1]:.0%}]" for a in ATTRIBUTES]
        cells += [_fmt_seeds(s["per_seed"]["mean adherence"], ".1%"), ranks[v]]
        lines.append(_markdown_row(cells))
    for name, values in (ref or {}).items():
        mean = np.mean([values[a]["accuracy"] for a in ATTRIBUTES])
        lines.append(_markdown_row([f"{name} (ceiling)"] + [f"{values[a]['accuracy']:.1%}" for a in ATTRIBUTES]
                                   + [f"{mean:.1%}", ""]))
    lines.append(_markdown_row(["chance"] + [f"{CHANCE[a]:.1%}" for a in ATTRIBUTES]
                               + [f"{np.mean(list(CHANCE.values())):.1%}", ""]))
    return "\n".join(lines)


def ranking_lines(summaries: dict, spread: dict) -> list[str]:
    out = []
    for metric, lower, fmt in (("held-out loss", True, ".4f"), ("valid loss", True, ".4f"),
                               ("mean adherence", False, ".1%")):
        values = {v: s["mean"][metric] for v, s in summaries.items() if not math.isnan(s["mean"][metric])}
        if values:
            measured = f"seed spread {format(spread[metric], fmt)}" if metric in spread else "no seed spread"
            out.append(f"- {metric} ({measured}; best first, `>` better than, `≈` tied): "
                       + ordering(values, spread.get(metric, 0.0), lower, fmt))
    return out


def study_markdown(by_step: dict, variants: list[str], spread_of: dict, ref: dict | None, study: dict) -> str:
    steps = sorted(by_step)
    full = steps[-1]
    summaries = by_step[full]
    any_s = next(iter(summaries.values()))
    spread = spread_of[full]
    spec = study["evaluation"]
    lines = [f"# Interleaving-pattern study ({len(summaries)} of {len(variants)} patterns evaluated at step {full})",
             "",
             f"Every pattern: the same data, seed(s), optimizer and {any_s['total_steps']} steps, so the same "
             f"number of training code tokens; compute per step grows with the LM positions a training clip becomes "
             f"(column 3: flattening lays each frame out as K positions). Held-out: {spec['captions']} captions of "
             f"(instrument, key) pairs never trained on, {spec['seconds']:g} s, top-k {spec['top_k']}, temperature "
             f"{spec['temperature']:g}, CFG {spec['cfg']:g}. Losses in nats per code: `valid loss` on the training "
             f"run's validation split, `held-out loss` teacher-forced on the real held-out clips (cb k: codebook k). "
             f"Train time: the train steps alone (no compilation or evaluation).",
             "",
             "Ties: " + ("differences below the seed spread (the largest max - min between two seeds of one pattern) "
                         "share a rank, marked `=`; values of several seeds are given as mean (seed / seed)."
                         if spread else "no pattern has a second seed, so no tie is called (add `seeds: [0, 1]` to "
                                        "a variant to measure the spread)."),
             "", f"## Loss and cost (step {full})", "", loss_table(summaries, variants, spread), "",
             f"## Adherence of generated audio (step {full}; Wilson 95 % intervals, seeds pooled)", "",
             adherence_table(summaries, variants, spread, ref), "", f"## Ranking at step {full}", "",
             *ranking_lines(summaries, spread)]
    for step in steps[:-1]:
        partial = by_step[step]
        lines += ["", f"## At step {step} ({step / full:.0%} of the budget; the same runs, learning rate not yet "
                      f"decayed)", "", *ranking_lines(partial, spread_of[step])]
        moves = []
        for metric, lower in (("held-out loss", True), ("mean adherence", False)):
            common = [v for v in variants if v in partial and v in summaries]
            before = tied_ranks({v: partial[v]["mean"][metric] for v in common},
                                spread_of[step].get(metric, 0.0), lower)
            after = tied_ranks({v: summaries[v]["mean"][metric] for v in common}, spread.get(metric, 0.0), lower)
            moves.append(f"- rank by {metric}, step {step} -> {full}: "
                         + ", ".join(f"{v} {before[v]} -> {after[v]}" for v in common))
        lines += [""] + moves
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- plots

def colours(variants: list[str]) -> dict:
    """One colour per pattern, the same in every figure (matplotlib's tab10, then tab20, in study order)."""
    import matplotlib

    palette = list(matplotlib.colormaps["tab10"].colors) + list(matplotlib.colormaps["tab20"].colors[1::2])
    return {v: palette[i % len(palette)] for i, v in enumerate(variants)}


def plot_all(out: str, by_step: dict, records: dict, variants: list[str]) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colour = colours(variants)
    styles = ("-", "--", ":", "-.")
    full = max(by_step)
    paths = []

    runs = {}  # (variant, seed) -> metrics of the furthest evaluated record
    for (variant, step), recs in sorted(records.items(), key=lambda item: item[0][1]):
        for r in recs:
            runs[(variant, r["seed"])] = r["metrics"]
    for name, x_key, vx_key, xlabel, scale in (
            ("loss_vs_step.png", "step", "valid_step", "training step", 1.0),
            ("loss_vs_time.png", "time_s", "valid_time_s", "training wall-clock, train steps only (min)", 1 / 60)):
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        for (variant, seed), m in sorted(runs.items(), key=lambda item: (variants.index(item[0][0]), item[0][1])):
            seeds = sorted(s for v, s in runs if v == variant)
            style = styles[seeds.index(seed) % len(styles)]
            label = f"{variant} (seed {seed})" if len(seeds) > 1 else variant
            left.plot(np.array(m[x_key]) * scale, m["loss"], style, color=colour[variant], label=label, lw=1.2)
            if m["valid_loss"]:
                right.plot(np.array(m[vx_key]) * scale, m["valid_loss"], style, marker="o", ms=3,
                           color=colour[variant], label=label)
        for ax, what in ((left, "training loss"), (right, "validation loss")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{what} (nats per code)")
            ax.grid(alpha=0.3)
        right.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=110)
        plt.close(fig)
        paths.append(os.path.join(out, name))

    summaries = by_step[full]
    present = [v for v in variants if v in summaries]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / max(len(present), 1)
    for i, v in enumerate(present):
        acc = np.array([summaries[v]["adherence"][a]["accuracy"] for a in ATTRIBUTES]) * 100
        lo = np.array([summaries[v]["adherence"][a]["ci95"][0] for a in ATTRIBUTES]) * 100
        hi = np.array([summaries[v]["adherence"][a]["ci95"][1] for a in ATTRIBUTES]) * 100
        x = np.arange(len(ATTRIBUTES)) - 0.4 + width * (i + 0.5)
        ax.bar(x, acc, width, color=colour[v], label=v, yerr=[acc - lo, hi - acc], capsize=2,
               error_kw={"lw": 0.8})
    ax.hlines([CHANCE[a] * 100 for a in ATTRIBUTES], np.arange(len(ATTRIBUTES)) - 0.45,
              np.arange(len(ATTRIBUTES)) + 0.45, colors="black", linestyles=":", label="chance")
    ax.set_xticks(np.arange(len(ATTRIBUTES)), ATTRIBUTES)
    ax.set_xlabel("attribute of the held-out caption")
    ax.set_ylabel("generated clips read back correctly (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"adherence at step {full} (95 % Wilson intervals)")
    ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "adherence.png"), dpi=110)
    plt.close(fig)
    paths.append(os.path.join(out, "adherence.png"))

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for v in present:
        points = [(step, by_step[step][v]) for step in sorted(by_step) if v in by_step[step]]
        x = [s["decoding_steps_per_audio_second"] for _, s in points]
        for ax, key, scale in ((left, "held-out loss", 1.0), (right, "mean adherence", 100.0)):
            y = [s["mean"][key] * scale for _, s in points]
            ax.plot(x, y, "-", color=colour[v], lw=0.8)
            for (step, _), xi, yi in zip(points, x, y):
                ax.plot(xi, yi, "o", color=colour[v], mfc=colour[v] if step == full else "white", ms=7,
                        label=v if step == full else None)
        for ax, key, scale in ((left, "held-out loss", 1.0), (right, "mean adherence", 100.0)):
            ax.annotate(v, (x[-1], points[-1][1]["mean"][key] * scale), textcoords="offset points",
                        xytext=(5, 3), fontsize=7, color=colour[v])
    ticks = spaced_ticks([by_step[full][v]["decoding_steps_per_audio_second"] for v in present])
    left.set_ylabel("held-out teacher-forced loss (nats per code)")
    right.set_ylabel("mean adherence over the six attributes (%)")
    for ax in (left, right):
        ax.set_xlabel("decoding steps per second of audio")
        ax.set_xscale("log")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    right.legend(fontsize=8, title="filled: full budget\nopen: earlier steps", title_fontsize=8,
                 loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside: the points fill the whole axes
    fig.tight_layout()
    fig.savefig(os.path.join(out, "quality_vs_steps.png"), dpi=110)
    plt.close(fig)
    paths.append(os.path.join(out, "quality_vs_steps.png"))
    return paths


def spaced_ticks(values: list[float], min_ratio: float = 1.25) -> list[int]:
    """Rounded tick positions for a log axis, each at least `min_ratio` times the previous one, so patterns that
    differ by a step or two (delay 26, parallel 25.25 steps/s) share one label instead of overprinting."""
    ticks: list[int] = []
    for value in sorted(round(v) for v in values):
        if not ticks or value >= ticks[-1] * min_ratio:
            ticks.append(value)
    return ticks


# ----------------------------------------------------------------------------------------------- entry

def write_report(out: str, study: dict, runs: list[dict], fractions: list[float]) -> list[str]:
    """Writes study.md, study.json and the plots for what is evaluated so far -> the paths written ([] when
    nothing is evaluated yet). Host 0 only."""
    import jax

    if jax.process_index() != 0:
        return []
    steps_of = {r["name"]: eval_steps(r["config"].train.total_steps, fractions) for r in runs}
    records = read_records(runs, steps_of)
    if not records:
        return []
    variants = [v["name"] for v in study["variants"]]
    by_step: dict = {}
    for (variant, step), recs in records.items():
        by_step.setdefault(step, {})[variant] = summarise(recs)
    spread_of = {step: seed_spread(summaries) for step, summaries in by_step.items()}
    ref_path = os.path.join(out, "reference.json")
    ref = json.load(open(ref_path)) if os.path.isfile(ref_path) else None
    paths = []
    md = os.path.join(out, "study.md")
    with open(md, "w") as f:
        f.write(study_markdown(by_step, variants, spread_of, ref, study))
    paths.append(md)
    js = os.path.join(out, "study.json")
    with open(js, "w") as f:
        json.dump({"by_step": {str(s): v for s, v in by_step.items()},
                   "seed_spread": {str(s): v for s, v in spread_of.items()}, "reference": ref}, f, indent=1)
    paths.append(js)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warnings.warn("matplotlib is not installed: the study's plots are skipped (pip install matplotlib)")
        return paths
    return paths + plot_all(out, by_step, records, variants)
