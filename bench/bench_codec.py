"""EnCodec 32 kHz (full config, random weights): encode + decode of 10 s, mgjax vs transformers in the same run.

Both run the same weights (the transformers model converted by our converter), after a warm-up; compile time is
printed apart. Last line: the speed ratio (transformers time / mgjax time; > 1 means mgjax is faster).
Usage: python bench/bench_codec.py [--seconds 10] [--repeats 3] [--threads N]
"""
from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import jax
    import torch
    import transformers

    from mgjax.codec.encodec import Codec
    from mgjax.config import CodecConfig
    from mgjax.convert.encodec_weights import codec_params

    torch.set_num_threads(args.threads)
    config = CodecConfig()  # the released 32 kHz codec: ratios [8,5,4,4], 64 filters, dim 128, 2 LSTM, 4 x 2048
    hf_config = transformers.EncodecConfig(
        sampling_rate=config.sample_rate, upsampling_ratios=list(config.ratios), num_filters=config.n_filters,
        hidden_size=config.dimension, num_lstm_layers=config.lstm_layers, use_causal_conv=False,
        pad_mode=config.pad_mode, use_conv_shortcut=False, codebook_size=config.codebook_size,
        target_bandwidths=[config.n_q * config.frame_rate * math.log2(config.codebook_size) / 1000])
    torch.manual_seed(0)
    model = transformers.EncodecModel(hf_config).eval()
    with torch.no_grad():
        for layer in model.quantizer.layers:
            layer.codebook.embed.normal_()
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    codec = Codec(config, jax.device_put(codec_params(state, config)))

    samples = int(args.seconds * config.sample_rate)
    wav = (0.1 * np.random.default_rng(0).standard_normal((1, 1, samples))).astype(np.float32)
    wav_torch = torch.from_numpy(wav)

    def run_mgjax():
        codes = codec.encode(wav)
        return codec.decode(codes).block_until_ready()

    def run_torch():
        with torch.inference_mode():
            codes = model.encode(wav_torch)[0]
            return model.decode(codes, [None])[0]

    start = time.perf_counter()
    run_mgjax()
    compile_s = time.perf_counter() - start
    run_torch()
    mgjax_s = best_of(run_mgjax, args.repeats)
    torch_s = best_of(run_torch, args.repeats)
    print(f"device: {jax.devices()[0].device_kind}, torch threads {args.threads}, audio {args.seconds:.1f} s")
    print(f"mgjax first call (compile + run): {compile_s:.2f} s")
    print(f"mgjax        encode+decode: {mgjax_s:.3f} s  real-time factor {args.seconds / mgjax_s:.1f}x")
    print(f"transformers encode+decode: {torch_s:.3f} s  real-time factor {args.seconds / torch_s:.1f}x")
    print(f"speed ratio mgjax vs transformers: {torch_s / mgjax_s:.2f}x")


if __name__ == "__main__":
    main()
