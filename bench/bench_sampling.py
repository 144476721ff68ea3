"""Sampling speed: mgjax's compiled loop vs transformers `generate`, same random weights, same run.

Rows: the musicgen-small decoder (d=1024, 24 layers, 16 heads, 4 x 2048) at batch 1 and 8, and a small shape
(d=256, 6 layers) where per-step overhead rather than memory bandwidth decides; with CFG, 500 frames (10 s) by
default (100 for the batch-8 row, which is 16 sequences with CFG). Each engine runs in its own subprocess (so peak
RSS is its own): transformers (float32), mgjax float32, mgjax int8 (weight-only storage, int8 x int8 -> int32
matmuls with per-row activation scales). Compile time is reported apart. `wt GB/s` is the LM weight bytes a decoding
step reads (float32 for transformers) x steps/s, beside a one-thread numpy copy's bandwidth. The last line is the
ratio mgjax (best format) / transformers at the musicgen-small shape, batch 1.

Usage: python bench/bench_sampling.py [--frames N (all rows)] [--rows small,tiny,small-b8] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

SHAPES = {  # name: (decoder kwargs, batch, default frames)
    "small": (dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096), 1, 500),
    "tiny": (dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, ffn_dim=1024), 1, 500),
    # 100 frames: at 500 this row alone takes ~30 min of a 2-core CPU (batch 8 with CFG is 16 sequences).
    "small-b8": (dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096), 8, 100),
}
TEXT_LEN = 12


def build_source(shape: str, directory: str) -> None:
    """A random transformers MusicGen with the given decoder shape (tiny T5 and codec), saved to `directory`."""
    import torch
    import transformers

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from oracle import codec_config

    torch.manual_seed(0)
    decoder = SHAPES[shape][0]
    config = transformers.MusicgenConfig(
        text_encoder=transformers.T5Config(vocab_size=64, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=1),
        audio_encoder=codec_config(4, 2048),
        decoder=transformers.MusicgenDecoderConfig(num_codebooks=4, vocab_size=2048, pad_token_id=2048,
                                                   bos_token_id=2048, max_position_embeddings=2048, **decoder))
    transformers.MusicgenForConditionalGeneration(config).eval().save_pretrained(directory)


def text_inputs(batch: int):
    import numpy as np
    rng = np.random.default_rng(0)
    return rng.integers(1, 64, (batch, TEXT_LEN)).astype(np.int64), np.ones((batch, TEXT_LEN), np.int64)


def run_torch(source: str, batch: int, frames: int, threads: int) -> dict:
    import torch
    import transformers

    torch.set_num_threads(threads)
    model = transformers.MusicgenForConditionalGeneration.from_pretrained(source).eval()
    ids, mask = (torch.from_numpy(a) for a in text_inputs(batch))
    kwargs = dict(input_ids=ids, attention_mask=mask, do_sample=True, top_k=250, guidance_scale=3.0)
    with torch.inference_mode():
        model.generate(**kwargs, max_new_tokens=8)  # warm-up
        start = time.perf_counter()
        model.generate(**kwargs, max_new_tokens=frames + 3)
        seconds = time.perf_counter() - start
    return dict(seconds=seconds, compile=0.0)


def run_mgjax(checkpoint: str, batch: int, frames: int, weight_format: str) -> dict:
    import mgjax

    mg = mgjax.MusicGen.load(checkpoint)
    quality = {}
    if weight_format == "int8":
        float_lm, float_config = mg.params["lm"], mg.config.lm
        mg = mg.with_int8_weights()
        quality = int8_quality(float_config, float_lm, mg.config.lm, mg.params["lm"], mg)
    ids, mask = text_inputs(batch)
    duration = frames / mg.frame_rate
    compile_s = compile_seconds(mg, ids, mask, frames)
    mg.generate(input_ids=ids, attention_mask=mask, duration=duration, top_k=250, cfg_coef=3.0, seed=0)
    start = time.perf_counter()
    mg.generate(input_ids=ids, attention_mask=mask, duration=duration, top_k=250, cfg_coef=3.0, seed=1)
    seconds = time.perf_counter() - start
    weight_bytes = streamed_bytes(mg.params["lm"])
    return dict(seconds=seconds, compile=compile_s, weight_bytes=weight_bytes, **quality)


def compile_seconds(mg, ids, mask, frames: int) -> float:
    """Ahead-of-time compile time of the whole generation program (prefill + decoding scan)."""
    import jax
    import jax.numpy as jnp

    from mgjax import sampling

    cond = mg.encode_text(ids, mask)
    prompt = jnp.zeros((ids.shape[0], mg.config.lm.num_codebooks, 0), jnp.int32)
    shape = sampling._LoopShape.of(sampling.SamplingConfig(top_k=250, cfg_coef=3.0))
    start = time.perf_counter()
    sampling._generate_codes.lower(mg.params["lm"], cond, jnp.asarray(mask), jax.random.key(0), prompt, None,
                                   jnp.float32(3.0), jnp.float32(1.0), jnp.float32(0.0), lm_config=mg.config.lm,
                                   frames=frames, shape=shape,
                                   split_layers=sampling.split_layers_by_default(mg.params["lm"],
                                                                                 mg.config.lm.kernels)).compile()
    return time.perf_counter() - start


def streamed_bytes(lm_params: dict) -> int:
    """Bytes of the LM weights each decoding step reads: all but the embedding tables, the condition projections
    and the cross-attention key/value projections (applied once, at prefill)."""
    import jax

    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(lm_params):
        name = jax.tree_util.keystr(path)
        once = ("enc_to_dec_proj" in name or name.startswith("['embed']")
                or ("cross_attn']" in name and ("k_proj" in name or "v_proj" in name)))
        total += 0 if once else leaf.size * leaf.dtype.itemsize
    return total


def int8_quality(float_config, float_lm, int8_config, int8_lm, mg) -> dict:
    """Teacher-forced logits of the int8 model vs float32 on random codes: max abs error relative to the logits'
    spread, and how often the argmax agrees."""
    import jax
    import jax.numpy as jnp

    from mgjax.lm.model import MusicGenLM

    ids, mask = text_inputs(2)
    cond = mg.encode_text(ids, mask)
    codes = jax.random.randint(jax.random.key(0), (2, float_config.num_codebooks, 100), 0, float_config.card)
    full = MusicGenLM(float_config).apply({"params": float_lm}, codes, cond, jnp.asarray(mask, bool))
    quant = MusicGenLM(int8_config).apply({"params": int8_lm}, codes, cond, jnp.asarray(mask, bool))
    return dict(int8_rel_err=float(jnp.abs(full - quant).max() / full.std()),
                int8_argmax_agree=float((full.argmax(-1) == quant.argmax(-1)).mean()))


def copy_bandwidth() -> float:
    """GB/s of a large numpy copy, counting bytes read + written."""
    import numpy as np
    source = np.ones(2 ** 28, np.uint8)
    source.copy()
    start = time.perf_counter()
    for _ in range(4):
        source.copy()
    return 2 * source.nbytes * 4 / (time.perf_counter() - start) / 1e9


def child(args) -> None:
    if args.engine == "prepare":  # in a child too, so the parent's peak RSS (inherited by exec) stays small
        import mgjax
        build_source(args.shape, args.source)
        mgjax.convert_checkpoint(args.source, args.checkpoint)
        print("RESULT {}")
        return
    if args.engine == "bandwidth":
        print("RESULT " + json.dumps({"gbps": copy_bandwidth()}))
        return
    if args.engine == "torch":
        result = run_torch(args.source, args.batch, args.frames, args.threads)
    else:
        result = run_mgjax(args.checkpoint, args.batch, args.frames, args.engine.split("-")[1])
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print("RESULT " + json.dumps(result))


def spawn(engine: str, source: str, checkpoint: str, batch: int, frames: int, threads: int, shape: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", engine, "--source", source, "--checkpoint",
           checkpoint, "--batch", str(batch), "--frames", str(frames), "--threads", str(threads), "--shape", shape]
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{engine} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=None,
                        help="frames per row (default: 500; 100 for the batch-8 row)")
    parser.add_argument("--rows", default="small,tiny,small-b8")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--source", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--shape", default="small", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.engine = args.child
        return child(args)

    bandwidth = spawn("bandwidth", "", "", 1, 0, args.threads, "small")["gbps"]
    print(f"+3 delay steps per row, CFG 3, top-k 250, threads {args.threads}; one-thread numpy copy "
          f"{bandwidth:.1f} GB/s (read + write); wt GB/s: LM weight bytes a decoding step reads x steps/s")
    print(f"{'row':9} {'frames':>6} {'engine':12} {'steps/s':>8} {'x torch':>8} {'compile s':>9} {'peak GB':>8} "
          f"{'wt GB/s':>7}  quality")
    headline = None
    with tempfile.TemporaryDirectory() as tmp:
        for row in args.rows.split(","):
            _, batch, default_frames = SHAPES[row]
            frames = args.frames or default_frames
            source, checkpoint = os.path.join(tmp, f"{row}-hf"), os.path.join(tmp, f"{row}-mg")
            if not os.path.isdir(source):
                spawn("prepare", source, checkpoint, batch, frames, args.threads, row)
            steps = frames + 3
            results = {engine: spawn(engine, source, checkpoint, batch, frames, args.threads, row)
                       for engine in ("torch", "mgjax-float32", "mgjax-int8")}
            torch_rate = steps / results["torch"]["seconds"]
            float_bytes = results["mgjax-float32"]["weight_bytes"]  # what transformers reads per step too
            for engine, result in results.items():
                rate = steps / result["seconds"]
                weights_gbps = f"{result.get('weight_bytes', float_bytes) * rate / 1e9:.1f}"
                quality = ""
                if "int8_rel_err" in result:
                    quality = (f"logit err {result['int8_rel_err']:.3f} std, argmax agrees "
                               f"{100 * result['int8_argmax_agree']:.1f}%")
                print(f"{row:9} {frames:6d} {engine:12} {rate:8.2f} {rate / torch_rate:8.2f} {result['compile']:9.1f} "
                      f"{result['peak_rss_gb']:8.2f} {weights_gbps:>7}  {quality}", flush=True)
            if row == "small":
                best = max(steps / results[e]["seconds"] for e in ("mgjax-float32", "mgjax-int8"))
                headline = best / torch_rate
    if headline is not None:
        print(f"speed ratio mgjax vs transformers (musicgen-small decoder, batch 1, CFG, "
              f"{args.frames or SHAPES['small'][2]} frames): {headline:.2f}x")


if __name__ == "__main__":
    main()
