"""Streaming latency and throughput: `MusicGen.generate_stream` against `generate`, same model, same run.

Rows: the shipped demo model (mgjax/assets/demo) and the musicgen-small shape (configs/musicgen-small.yaml, random
weights: T5-base, EnCodec 32 kHz, 24-layer d=1024 decoder), batch 1, CFG 3, top-k 250. Per row:
  first audio (cold): request -> first chunk in a fresh process, compilation included;
  first audio (warm): the same with every program compiled;
  chunk interval: median time between chunks (warm), and the audio each chunk holds;
  RTF streaming: seconds of audio produced per second of wall clock while streaming (> 1: faster than playback);
  total stream / total generate: the whole streamed piece against `generate` of the same piece (warm, best of runs),
  and per interleaved pair (stream and generate back to back, order alternating): median [min, max], the spread
  other processes on the machine cause.

Usage: python bench/bench_stream.py [--rows demo,small] [--seconds S (demo row)] [--small-seconds S] [--runs N]
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def cpu_name() -> str:
    """The CPU's model name (`/proc/cpuinfo`), and how many cores this process may use."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else platform.processor() or 'unknown CPU'}, {len(os.sched_getaffinity(0))} cores"


def build(row: str):
    """`(MusicGen, generate keyword arguments)` for a row."""
    import mgjax
    from mgjax.config import load_config

    if row == "demo":
        mg = mgjax.MusicGen.load(os.path.join(ROOT, "mgjax", "assets", "demo"))
        return mg, dict(prompts=["a plucked string arpeggio in e minor with drums, 140 bpm"])
    mg = mgjax.MusicGen.from_config(load_config(os.path.join(ROOT, "configs", "musicgen-small.yaml")), seed=0)
    return mg, dict(input_ids=np.array([[37, 3, 21, 8, 812, 1]], np.int32))


def timed_stream(mg, seconds: float, request: dict) -> dict:
    """Streams one piece: `{'first': s to the first chunk, 'intervals': [s between chunks], 'chunk_audio': [s],
    'total': s, 'audio': s of audio}`."""
    start = time.perf_counter()
    arrivals, lengths = [], []
    for chunk in mg.generate_stream(duration=seconds, seed=0, **request):
        arrivals.append(time.perf_counter() - start)
        lengths.append(chunk.shape[-1] / mg.sample_rate)
    return dict(first=arrivals[0], intervals=list(np.diff(arrivals)), chunk_audio=lengths, total=arrivals[-1],
                audio=sum(lengths))


def timed_generate(mg, seconds: float, request: dict) -> float:
    start = time.perf_counter()
    mg.generate(duration=seconds, seed=0, **request)
    return time.perf_counter() - start


def bench_row(row: str, seconds: float, runs: int) -> dict:
    """Cold stream, then `runs` interleaved pairs (stream, generate; the order alternating), so that load from
    other processes falls on both engines alike; the ratio per pair gives the spread."""
    mg, request = build(row)
    cold = timed_stream(mg, seconds, request)
    timed_generate(mg, seconds, request)  # compiles generate's program
    streams, plain = [], []
    for run in range(runs):
        if run % 2:
            plain.append(timed_generate(mg, seconds, request))
            streams.append(timed_stream(mg, seconds, request))
        else:
            streams.append(timed_stream(mg, seconds, request))
            plain.append(timed_generate(mg, seconds, request))
    warm = min(streams, key=lambda run: run["total"])
    pairs = [stream["total"] / generate for stream, generate in zip(streams, plain)]
    return dict(row=row, seconds=seconds, cold_first=cold["first"], warm_first=warm["first"],
                interval=float(np.median(warm["intervals"])) if warm["intervals"] else float("nan"),
                chunk_audio=float(np.median(warm["chunk_audio"])), rtf=warm["audio"] / warm["total"],
                stream_total=warm["total"], generate_total=min(plain), pairs=pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="demo,small")
    parser.add_argument("--seconds", type=float, default=8.0, help="demo row: seconds generated (4 s windows)")
    parser.add_argument("--small-seconds", type=float, default=4.0, help="musicgen-small row: seconds generated")
    parser.add_argument("--runs", type=int, default=6, help="warm (stream, generate) pairs, interleaved")
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}; load average before: {os.getloadavg()[0]:.2f}")
    header = (f"{'row':<6} {'audio s':>7} {'1st cold s':>10} {'1st warm s':>10} {'interval s':>10} "
              f"{'chunk s':>7} {'RTF':>6} {'stream s':>8} {'generate s':>10} {'ratio':>6} "
              f"{'pairs: median [min, max]':>26}")
    print(header)
    for row in args.rows.split(","):
        r = bench_row(row, args.seconds if row == "demo" else args.small_seconds, args.runs)
        ratio = r["stream_total"] / r["generate_total"]
        pairs = r["pairs"]
        print(f"{r['row']:<6} {r['seconds']:>7.1f} {r['cold_first']:>10.2f} {r['warm_first']:>10.2f} "
              f"{r['interval']:>10.3f} {r['chunk_audio']:>7.2f} {r['rtf']:>6.2f} {r['stream_total']:>8.2f} "
              f"{r['generate_total']:>10.2f} {ratio:>6.3f} "
              f"{np.median(pairs):>10.3f} [{min(pairs):.3f}, {max(pairs):.3f}]", flush=True)
    print(f"ratio = best total stream / best total generate (same piece, warm); pairs: stream / generate run back "
          f"to back; target <= 1.10. Load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
