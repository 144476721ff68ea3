"""LM train-step throughput: mgjax vs transformers `MusicgenForCausalLM`, same config and batch, in the same run.

One step = forward + backward + global-norm clipping + AdamW on the decoder LM (conditioned on precomputed T5 states
of width 768 through the text projection; the frozen T5 forward is left out on both sides). mgjax runs its real
train step (`training.Trainer`, delay pattern, masked loss, jitted with shardings); transformers gets the same
delayed code sequence, labels and an `nn.Linear` text projection, and `torch.optim.AdamW`. Compile/warm-up steps
are not timed; the two sides are timed in alternating blocks of steps and the medians reported. Last line: the
ratio (mgjax tokens/s / transformers tokens/s; > 1 means mgjax is faster). Tokens = B * K * T codes per step.
`--demo` benches the demo LM's shape (d 256, 4 layers, ffn 1024, card 256, batch 16 x 100 frames: its 4 s at
25 frames/s).

Usage: python bench/bench_train.py [--dim 512 --layers 6 --heads 8 --ffn 2048 --batch 4 --seconds 3 --steps 6]
                                   [--demo] [--block 3] [--threads N] [--compute-dtype bfloat16]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--card", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0, help="segment length (50 frames per second)")
    parser.add_argument("--text-len", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side (rounded up to whole blocks)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--block", type=int, default=3, help="steps per side before switching (1: strict A/B)")
    parser.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=len(allowed_cpus()),
                        help="CPUs the process is pinned to (both runtimes) and torch's thread count; 1 is fairer on a "
                             "busy shared machine, where torch's spinning OpenMP threads suffer most")
    parser.add_argument("--demo", action="store_true", help="the demo LM's shape (overrides the size flags)")
    args = parser.parse_args()
    if args.demo:
        args.dim, args.layers, args.heads, args.ffn, args.card, args.batch, args.seconds = 256, 4, 8, 1024, 256, 16, 2.0
    return args


def make_config(args):
    from mgjax.config import load_config

    overrides = [f"lm.dim={args.dim}", f"lm.num_layers={args.layers}", f"lm.num_heads={args.heads}",
                 f"lm.ffn_dim={args.ffn}", f"lm.card={args.card}", f"codec.codebook_size={args.card}",
                 f"lm.compute_dtype={args.compute_dtype}",
                 # T5 is not run (precomputed states); a one-layer stand-in keeps its init cheap, width stays 768.
                 "text.num_layers=1", "text.vocab_size=128", "text.d_ff=64",
                 f"train.batch_size={args.batch}", f"train.segment_duration={args.seconds}",
                 "train.warmup_steps=10", "train.total_steps=1000", "train.cfg_dropout=0.0", "train.mesh_shape=[1,1,1]"]
    return load_config("musicgen-small", overrides)


def make_batch(config, args, rng: np.random.Generator) -> dict[str, np.ndarray]:
    frames = int(round(args.seconds * config.codec.frame_rate))
    k = config.lm.num_codebooks
    return {"codes": rng.integers(0, config.lm.card, (args.batch, k, frames)).astype(np.int32),
            "mask": np.ones((args.batch, frames), bool),
            "cond": rng.standard_normal((args.batch, args.text_len, config.text.d_model)).astype(np.float32),
            "cond_mask": np.ones((args.batch, args.text_len), np.int32)}


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (all of them where the OS has no affinity call, e.g. macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def pin_to_cores(count: int) -> list[int]:
    """Restricts this process (both runtimes' threads) to its first `count` allowed CPUs; returns them. XLA has no
    working thread-count flag in jaxlib 0.10.2 (`--xla_cpu_multi_thread_eigen=false` still keeps two cores busy), so
    a CPU affinity is what makes a `--threads 1` comparison one core against one core."""
    allowed = allowed_cpus()
    if count < 1 or count > len(allowed):
        raise SystemExit(f"--threads {count}: this process may use {len(allowed)} CPUs; pick 1..{len(allowed)}")
    if count < len(allowed):
        if not hasattr(os, "sched_setaffinity"):
            raise SystemExit(f"--threads {count}: this OS cannot pin a process to CPUs; run with all "
                             f"{len(allowed)} (the default)")
        os.sched_setaffinity(0, allowed[:count])
    return allowed[:count]


def first_call(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def time_interleaved(steps: dict, warmup: int, timed: int, block: int = 1) -> dict[str, float]:
    """Median seconds per step of each entry over `timed` steps (rounded up to whole blocks), timed in alternating
    blocks of `block` steps (A, B, A, B, ... for block 1) after `warmup` calls each, so both see the same
    background load on a shared machine. Blocks longer than one step keep each runtime's idle worker threads
    (XLA's and OpenMP's spin a while after a step) from slowing the other's next step, which a real training job
    never sees."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(-(-timed // block)):
        for name, step in steps.items():
            for _ in range(block):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def mgjax_step(config, batch):
    import jax

    from mgjax import sharding, training

    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    jax.set_mesh(mesh)
    trainer = training.Trainer.create(config, mesh)

    def step():
        metrics = trainer.step(batch)
        jax.block_until_ready(metrics["loss"])

    n_params = sum(x.size for x in jax.tree.leaves(trainer.state.params))
    return step, n_params


def torch_step(config, batch, threads: int):
    import torch
    import transformers
    from mgjax.lm.patterns import pattern_from_config

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    lm = config.lm
    frames = batch["codes"].shape[-1]
    hf_config = transformers.MusicgenDecoderConfig(
        vocab_size=lm.card, max_position_embeddings=max(2048, frames + 8), num_hidden_layers=lm.num_layers,
        ffn_dim=lm.ffn_dim, num_attention_heads=lm.num_heads, hidden_size=lm.dim, num_codebooks=lm.num_codebooks,
        activation_function="gelu", dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
        scale_embedding=False, tie_word_embeddings=False, pad_token_id=lm.card, bos_token_id=lm.card)
    model = transformers.MusicgenForCausalLM(hf_config).train()
    proj = torch.nn.Linear(config.text.d_model, lm.dim)
    params = list(model.parameters()) + list(proj.parameters())
    train = config.train
    optimizer = torch.optim.AdamW(params, lr=train.learning_rate, betas=(train.adam_b1, train.adam_b2),
                                  weight_decay=train.weight_decay)

    pattern = pattern_from_config(lm)
    seq = pattern.build(batch["codes"], special_token=lm.card, valid_only=True)  # [B, K, S] numpy
    b, k, s = seq.shape
    input_ids = torch.from_numpy(seq.reshape(b * k, s).astype(np.int64))
    labels = np.concatenate([seq[:, :, 1:], np.full((b, k, 1), lm.card)], axis=-1).transpose(0, 2, 1)
    labels = torch.from_numpy(np.ascontiguousarray(labels).astype(np.int64))  # [B, S, K], pad id = ignored
    cond = torch.from_numpy(batch["cond"])
    cond_mask = torch.from_numpy(batch["cond_mask"].astype(np.int64))

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = model(input_ids=input_ids, encoder_hidden_states=proj(cond) * cond_mask[..., None],
                    encoder_attention_mask=cond_mask, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        optimizer.step()

    return step, sum(p.numel() for p in params)


def main() -> None:
    args = parse_args()
    cores = pin_to_cores(args.threads)  # must precede the first JAX import: XLA sizes its thread pool from it
    from mgjax.runtime import keep_host_memory

    kept = keep_host_memory()  # as train.py does; torch's step is unaffected (measured)
    import jax
    import torch

    config = make_config(args)
    batch = make_batch(config, args, np.random.default_rng(0))
    tokens = int(np.prod(batch["codes"].shape))

    mg_step, n_mg = mgjax_step(config, batch)
    mg_first = first_call(mg_step)
    pt_step, n_pt = torch_step(config, batch, args.threads)
    pt_first = first_call(pt_step)
    median = time_interleaved({"mgjax": mg_step, "transformers": pt_step}, args.warmup - 1, args.steps,
                              args.block)
    mg_s, pt_s = median["mgjax"], median["transformers"]

    print(f"device: {jax.devices()[0].device_kind} ({jax.device_count()} device), torch {torch.__version__} "
          f"threads {args.threads}, process pinned to CPUs {cores}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, host memory kept {kept}")
    print(f"LM: dim {config.lm.dim}, {config.lm.num_layers} layers, {config.lm.num_heads} heads, ffn "
          f"{config.lm.ffn_dim}, card {config.lm.card}, K {config.lm.num_codebooks}; params mgjax {n_mg / 1e6:.1f}M, "
          f"transformers {n_pt / 1e6:.1f}M; compute {args.compute_dtype}")
    print(f"batch {args.batch} x {args.seconds:g} s ({tokens} code tokens per step), text length {args.text_len}")
    print(f"mgjax        first step (compile) {mg_first:.2f} s, step {mg_s * 1e3:.1f} ms, {tokens / mg_s:,.0f} tokens/s")
    print(f"transformers first step {pt_first:.2f} s, step {pt_s * 1e3:.1f} ms, {tokens / pt_s:,.0f} tokens/s")
    print(f"train-step throughput ratio mgjax vs transformers: {pt_s / mg_s:.2f}x")


if __name__ == "__main__":
    main()
