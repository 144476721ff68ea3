#!/usr/bin/env bash
# The GPU check (issue 23, part 8): run it whenever a GPU is lent (the `device` tool runs it in a copy of the tree:
#   bash bench/device_check.sh), under 8 minutes on one H100. It uses the machine's Python, where JAX with CUDA is
# installed, adds what mgjax needs without touching that JAX, then runs on the GPU:
#   1. the parity tests (attention kernels incl. cuDNN, LM vs the transformers oracle, greedy generation),
#   2. the three benches (codec, sampling, train; each prints its ratio against the PyTorch reference, same run),
#   3. the musicgen-small-shaped sampler (random weights, bf16) at batch 1 and 16 for 30 s of audio,
#   4. the train step with the flash path (cuDNN attention) and without it,
# and prints one summary table (also in $OUT/device_check.md when $OUT is set). Record its figures in the README with
# the card named.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
SUMMARY="$OUT/device_check.md"
: > "$SUMMARY"
row() { echo "| $1 | $2 | $3 |" | tee -a "$SUMMARY"; }
step() {  # step NAME TIMEOUT_S COMMAND...: runs it, keeps its log, a table row with the last line
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  row "$name" "rc $rc, $((SECONDS - start)) s" "$(grep -v '^\s*$' "$OUT/$name.log" | tail -1 | cut -c1-160)"
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import jax; assert jax.default_backend() == 'gpu', jax.devices(); print(jax.devices())" || {
  echo "no JAX GPU backend here: nothing to check"; exit 1; }
# mgjax and its test dependencies, without replacing the machine's CUDA JAX (torch: the local CPU build).
$PY -m pip install -q --no-deps -e . && \
  $PY -m pip install -q flax==0.12.8 optax orbax-checkpoint chex transformers sentencepiece soundfile scipy pyyaml \
    tqdm pytest pyloudnorm "torch==2.13.0" 2>&1 | tail -2

echo "| check | status | result |" | tee -a "$SUMMARY"
echo "|---|---|---|" | tee -a "$SUMMARY"
row "GPU" "" "$(head -1 "$OUT/gpu.txt")"
step parity-tests 240 $PY -m pytest -q -x tests/test_attention_kernels.py tests/test_lm.py tests/test_generation.py
step bench-codec 120 $PY bench/bench_codec.py --seconds 10 --repeats 3
step bench-sampling 300 $PY bench/bench_sampling.py --rows small,small-b8 --frames 500
step bench-train-cudnn 180 $PY bench/bench_train.py --compute-dtype bfloat16
step sampler-small-30s 240 $PY - <<'PY'
import time, jax, jax.numpy as jnp
from mgjax import sampling
from mgjax.api import init_lm_params
from mgjax.config import load_config
config = load_config("musicgen-small", ["lm.compute_dtype=bfloat16"])
params = init_lm_params(config, 0)
frames = 1500  # 30 s
for batch in (1, 16):
    cond = jnp.zeros((batch, 16, config.text.d_model), jnp.float32)
    mask = jnp.ones((batch, 16), jnp.int32)
    prompt = jnp.zeros((batch, config.lm.num_codebooks, 0), jnp.int32)
    run = lambda: sampling.generate_codes(params, cond, mask, jax.random.key(0), prompt, lm_config=config.lm,
                                          frames=frames, sampling=sampling.SamplingConfig())
    start = time.perf_counter(); jax.block_until_ready(run()); first = time.perf_counter() - start
    start = time.perf_counter(); jax.block_until_ready(run()); warm = time.perf_counter() - start
    print(f"musicgen-small bf16, batch {batch}, 30 s: {warm:.1f} s warm ({30 * batch / warm:.1f} s of audio per s "
          f"over the batch, {30 / warm:.2f}x real time per clip); first call {first:.1f} s with compile")
PY
for attention in cudnn dense; do
  step "train-step-$attention" 180 $PY - "$attention" "${TRAIN_CONFIG:-train-small}" <<'PY'
import sys, time, jax, numpy as np
from mgjax import training
from mgjax.config import load_config
config = load_config(sys.argv[2], [f"lm.attention={sys.argv[1]}", "lm.kernels=plain", "train.batch_size=4",
                                     "train.mesh_shape=[-1,1,1]", "lm.remat_policy=full"])
from mgjax import aot, sharding
mesh = sharding.make_mesh(config.train.mesh_shape)
programs = training.programs(config, mesh)
with jax.set_mesh(mesh):
    state, frozen = programs.init_state(jax.random.key(0)), programs.init_frozen(jax.random.key(1))
    spec = aot.train_batch_spec(config, mesh)
    batch = {k: jax.device_put(np.zeros(v.shape, v.dtype), v.sharding) for k, v in spec.items()}
    batch["mask"] = jax.device_put(np.ones(spec["mask"].shape, bool), spec["mask"].sharding)
    state, metrics = programs.train_step(state, frozen, batch); jax.block_until_ready(metrics)
    times = []
    for _ in range(5):
        start = time.perf_counter(); state, metrics = programs.train_step(state, frozen, batch)
        jax.block_until_ready(metrics); times.append(time.perf_counter() - start)
step = float(np.median(times))
frames = spec["codes"].shape[0] * spec["codes"].shape[-1]
print(f"{sys.argv[2]} step, batch 4, attention {sys.argv[1]}: {step * 1e3:.0f} ms, {frames / step:,.0f} frames/s")
PY
done
echo
cat "$SUMMARY"
