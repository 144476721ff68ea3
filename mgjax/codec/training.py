"""Codec training (the demo codec): reconstruction losses, EMA residual-VQ codebooks, the jitted train step, metrics.

The quantizer follows the reference (audiocraft `quantization/core_vq.py`, EnCodec):
- codes are the nearest codeword of the running residual, computed exactly as `ResidualVQ.encode` computes them, so
  the trained params load into `mgjax.Codec` unchanged and encode to the same codes;
- codebooks are not trained by gradient but by exponential moving averages of the cluster sizes and of the sums of
  the vectors assigned to each code (`decay`), normalised with Laplace-smoothed cluster sizes;
- codebooks start from k-means on encoder outputs of the first batch(es) (layer k on the residual of layers < k);
- dead codes (EMA cluster size < `dead_code_threshold`) are replaced by random residuals of the batch;
- straight-through estimator (`z + sg(q - z)`) and a commitment loss `mse(z_k, sg(q_k))` averaged over layers
  (as in the reference, residuals after the first are detached, so only layer 0's term has a gradient).
Two departures, both deliberate: a replaced dead code also resets its EMA statistics (the reference writes the new
vector into `embed` and then overwrites it with `embed_avg / cluster_size` in the same step, so its replacement has no
effect), and k-means init sets `embed_avg = embed * cluster_size` (the reference copies `embed`, which shrinks every
codeword by its cluster size at the first update).

Losses: `l1_weight * |wav - wav_hat|` + `spec_weight * multi-scale log-mel (L1 + L2)` + `commitment_weight *
commitment`. No adversarial losses (EnCodec's discriminators are optional and left out).

The train state keeps the codebooks and their EMA statistics in `vq` (a non-gradient pytree the step updates);
`params` holds the encoder and decoder only, so the optimizer never sees the codebooks. `codec_params(state)` is the
tree `mgjax.Codec` takes.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

from mgjax import config as config_lib
from mgjax.codec.encodec import EncodecModel, init_codec_params
from mgjax.codec.quantizer import nearest_codeword
from mgjax.config import CodecConfig, ConfigError


@dataclasses.dataclass(frozen=True)
class CodecTrainConfig:
    """Optimisation, losses and VQ settings of `train_codec.py` (YAML section `codec_train`)."""

    seed: int = 0
    batch_size: int = 16
    segment_duration: float = 1.0  # seconds; rounded to whole frames
    learning_rate: float = 3e-4
    adam_b1: float = 0.5  # audiocraft's EnCodec recipe
    adam_b2: float = 0.9
    lr_schedule: str = "constant"  # 'constant' or 'cosine' (to `final_lr_ratio * learning_rate` at total_steps)
    final_lr_ratio: float = 0.1
    warmup_steps: int = 0
    grad_clip: float = 0.0  # global-norm clipping; 0 disables
    total_steps: int = 10000
    # Losses.
    l1_weight: float = 0.1
    spec_weight: float = 1.0
    spec_windows: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)  # hop = window / 4
    n_mels: int = 64  # per scale at most window / 4 mel bands (narrow windows have few FFT bins)
    spec_floor: float = 1e-5  # of the log-mel terms, in full-scale units (1e-5: -100 dB)
    spec_linear_weight: float = 0.0  # L1 on the mel magnitudes themselves (stresses the loud partials)
    commitment_weight: float = 1.0  # on the encoder directly (outside the balancer, as in audiocraft)
    balance_losses: bool = True  # l1_weight : spec_weight as gradient-norm shares (audiocraft's Balancer)
    balancer_decay: float = 0.999  # EMA of the gradient norms
    # Residual VQ.
    vq_decay: float = 0.99
    vq_epsilon: float = 1e-5
    dead_code_threshold: float = 2.0  # 0 disables dead-code replacement
    kmeans_iters: int = 10  # 0: codebooks initialised from random encoder outputs
    init_batches: int = 8  # batches of encoder outputs the codebooks are initialised from
    # Bookkeeping (host only).
    log_every: int = 50
    eval_every: int = 500
    eval_clips: int = 16
    checkpoint_every: int = 500
    keep_checkpoints: int = 2

    def validate(self) -> "CodecTrainConfig":
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"codec_train.lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if not 0.0 < self.vq_decay < 1.0:
            raise ConfigError(f"codec_train.vq_decay must lie in (0, 1), got {self.vq_decay}")
        if self.batch_size < 1 or self.segment_duration <= 0:
            raise ConfigError("codec_train.batch_size and segment_duration must be positive")
        if not self.spec_windows or any(w < 8 or w & (w - 1) for w in self.spec_windows):
            raise ConfigError(f"codec_train.spec_windows must be powers of two >= 8, got {self.spec_windows}")
        return self


def load_codec_train_config(path: str, overrides: Sequence[str] = ()) -> tuple[CodecConfig, CodecTrainConfig]:
    """(codec, codec_train) from a YAML file with sections `codec` and `codec_train`, plus `section.key=value`
    overrides; an unknown section or key raises `ConfigError` naming it."""
    path = config_lib.resolve_config_path(path)
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    raw = config_lib.merge(raw, config_lib.parse_overrides(overrides))
    unknown = set(raw) - {"codec", "codec_train"}
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(sorted(unknown))} in {path} (known: codec, codec_train)")
    codec = config_lib.dataclass_from_dict(CodecConfig, raw.get("codec") or {}, "codec")
    codec.validate()
    train = config_lib.dataclass_from_dict(CodecTrainConfig, raw.get("codec_train") or {}, "codec_train")
    return codec, train.validate()


def segment_samples(codec: CodecConfig, train: CodecTrainConfig) -> int:
    """Training segment length in samples: a whole number (>= 1) of frames."""
    return max(1, round(train.segment_duration * codec.frame_rate)) * codec.hop_length


# ----------------------------------------------------------------------------------------------- spectra

def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None
                   ) -> np.ndarray:
    """`[n_fft // 2 + 1, n_mels]` triangular HTK-mel filters (unnormalised, as torchaudio's default)."""
    f_max = sample_rate / 2 if f_max is None else f_max
    hz_to_mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)
    mel_to_hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    rising = (freqs[:, None] - edges[None, :-2]) / (edges[1:-1] - edges[:-2])[None]
    falling = (edges[None, 2:] - freqs[:, None]) / (edges[2:] - edges[1:-1])[None]
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def stft_magnitude(x_BxN: jax.Array, n_fft: int) -> jax.Array:
    """`[B, N] -> [B, ceil(N / hop), n_fft // 2 + 1]` Hann-window magnitudes, hop = n_fft / 4, the signal
    reflect-padded by (n_fft - hop) / 2 each side (audiocraft's mel wrapper) and zero-padded to whole frames.

    Frames are built from four shifted views of hop-sized blocks (no gather), which keeps the backward pass cheap.
    """
    hop = n_fft // 4
    side = (n_fft - hop) // 2
    x = jnp.pad(x_BxN, ((0, 0), (side, side)), mode="reflect")
    frames = max(1, -(-(x.shape[1] - n_fft) // hop) + 1)
    x = jnp.pad(x, ((0, 0), (0, (frames + 3) * hop - x.shape[1])))
    blocks_BxMxH = x.reshape(x.shape[0], frames + 3, hop)
    frames_BxTxW = jnp.concatenate([blocks_BxMxH[:, i:i + frames] for i in range(4)], axis=-1)
    window = jnp.asarray(np.hanning(n_fft + 1)[:-1], x.dtype)  # periodic Hann
    spec = jnp.fft.rfft(frames_BxTxW * window, axis=-1)
    return jnp.sqrt(jnp.real(spec) ** 2 + jnp.imag(spec) ** 2 + 1e-12)  # no NaN gradient at |X| = 0


def mels(x_BxN: jax.Array, sample_rate: int, train: CodecTrainConfig) -> list[jax.Array]:
    """Per window of `train.spec_windows`: mel magnitudes `[B, T_w, M_w]`, the STFT scaled by 2 / n_fft so that a
    full-scale sinusoid peaks near 1 whatever the window (the floor then means the same level at every scale)."""
    return [stft_magnitude(x_BxN, n_fft) @ jnp.asarray(mel_filterbank(sample_rate, n_fft, min(train.n_mels, n_fft // 4))
                                                      * (2.0 / n_fft))
            for n_fft in train.spec_windows]


def multiscale_mel_loss(x_BxN: jax.Array, y_BxN: jax.Array, sample_rate: int, train: CodecTrainConfig) -> jax.Array:
    """Mean over windows of L1 + L2 between `log10(mel + floor)` spectrograms, plus `spec_linear_weight` times the
    L1 between the mel magnitudes themselves (`[]`)."""
    terms = []
    for a, b in zip(mels(x_BxN, sample_rate, train), mels(y_BxN, sample_rate, train)):
        log_diff = jnp.log10(a + train.spec_floor) - jnp.log10(b + train.spec_floor)
        term = jnp.mean(jnp.abs(log_diff)) + jnp.mean(log_diff ** 2)
        if train.spec_linear_weight:
            term = term + train.spec_linear_weight * jnp.mean(jnp.abs(a - b))
        terms.append(term)
    return sum(terms) / len(terms)


def mel_distance(x_BxN: jax.Array, y_BxN: jax.Array, sample_rate: int, train: CodecTrainConfig,
                 floor: float = 1e-5) -> jax.Array:
    """`[B]` mean over windows of the L1 distance between `log10(mel + floor)` spectrograms (the evaluation metric;
    `floor` in full-scale units, 1e-5 = -100 dB, whatever the training floor)."""
    terms = [jnp.mean(jnp.abs(jnp.log10(a + floor) - jnp.log10(b + floor)), axis=(1, 2))
             for a, b in zip(mels(x_BxN, sample_rate, train), mels(y_BxN, sample_rate, train))]
    return sum(terms) / len(terms)


def si_snr(estimate: np.ndarray, reference: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Scale-invariant SNR in dB over the last axis (`[..., N] x [..., N] -> [...]`), both signals zero-meaned."""
    estimate = np.asarray(estimate, np.float64)
    reference = np.asarray(reference, np.float64)
    if estimate.shape != reference.shape:
        raise ValueError(f"si_snr needs equal shapes, got {estimate.shape} and {reference.shape}")
    estimate = estimate - estimate.mean(axis=-1, keepdims=True)
    reference = reference - reference.mean(axis=-1, keepdims=True)
    scale = np.sum(estimate * reference, -1, keepdims=True) / (np.sum(reference ** 2, -1, keepdims=True) + eps)
    target = scale * reference
    noise = estimate - target
    return 10.0 * np.log10((np.sum(target ** 2, -1) + eps) / (np.sum(noise ** 2, -1) + eps))


def codebook_usage(codes_BxKxT: np.ndarray, codebook_size: int) -> dict:
    """Per codebook: `perplexity` (exp of the code entropy; `codebook_size` at best) and `used` (fraction of codes
    that occur)."""
    codes = np.asarray(codes_BxKxT)
    perplexity, used = [], []
    for k in range(codes.shape[1]):
        counts = np.bincount(codes[:, k].ravel(), minlength=codebook_size)
        p = counts / max(counts.sum(), 1)
        perplexity.append(float(np.exp(-np.sum(p[p > 0] * np.log(p[p > 0])))))
        used.append(float(np.mean(counts > 0)))
    return {"perplexity": perplexity, "used": used}


# ----------------------------------------------------------------------------------------------- EMA residual VQ

@flax.struct.dataclass
class VQState:
    """Codebooks and their EMA statistics: `codebooks [K, C, D]`, `cluster_size [K, C]`, `embed_avg [K, C, D]`."""

    codebooks: jax.Array
    cluster_size: jax.Array
    embed_avg: jax.Array


def ema_update(cluster_size_C: jax.Array, embed_avg_CxD: jax.Array, x_NxD: jax.Array, codes_N: jax.Array,
               decay: float, epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One EMA step of one codebook: `(cluster_size [C], embed_avg [C, D], codebook [C, D])`.

    cluster_size <- decay * cluster_size + (1 - decay) * counts;  embed_avg <- decay * embed_avg + (1 - decay) * sums;
    codebook = embed_avg / (n * (cluster_size + eps) / (n + C * eps)), n = sum(cluster_size) (Laplace smoothing).
    """
    size = cluster_size_C.shape[0]
    counts = jax.ops.segment_sum(jnp.ones_like(codes_N, jnp.float32), codes_N, size)
    sums = jax.ops.segment_sum(x_NxD, codes_N, size)
    cluster_size_C = decay * cluster_size_C + (1.0 - decay) * counts
    embed_avg_CxD = decay * embed_avg_CxD + (1.0 - decay) * sums
    total = jnp.sum(cluster_size_C)
    smoothed = (cluster_size_C + epsilon) / (total + size * epsilon) * total
    return cluster_size_C, embed_avg_CxD, embed_avg_CxD / smoothed[:, None]


def replace_dead_codes(codebook_CxD: jax.Array, cluster_size_C: jax.Array, embed_avg_CxD: jax.Array,
                       x_NxD: jax.Array, key: jax.Array, threshold: float
                       ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Codes whose EMA cluster size is below `threshold` become random rows of `x`; their statistics restart as
    `threshold` members at that vector (so the next EMA step keeps it). Returns (codebook, cluster_size,
    embed_avg, number replaced)."""
    dead_C = cluster_size_C < threshold
    picked = x_NxD[jax.random.randint(key, (codebook_CxD.shape[0],), 0, x_NxD.shape[0])]
    codebook_CxD = jnp.where(dead_C[:, None], picked, codebook_CxD)
    embed_avg_CxD = jnp.where(dead_C[:, None], picked * threshold, embed_avg_CxD)
    cluster_size_C = jnp.where(dead_C, threshold, cluster_size_C)
    return codebook_CxD, cluster_size_C, embed_avg_CxD, jnp.sum(dead_C)


def quantize_train(z_NxD: jax.Array, vq: VQState, key: jax.Array, train: CodecTrainConfig
                   ) -> tuple[jax.Array, jax.Array, jax.Array, VQState, dict]:
    """Training forward of the residual VQ on encoder outputs `z [N, D]`.

    Returns (quantized `[N, D]` with the straight-through gradient, codes `[K, N]`, commitment loss `[]`,
    updated `VQState`, stats). The codes and the residual chain are computed as `ResidualVQ.encode` does, with the
    codebooks as they were before this step's update.
    """
    x = jax.lax.stop_gradient(z_NxD).astype(jnp.float32)

    def layer(residual, inputs):
        codebook, cluster_size, embed_avg, layer_key = inputs
        codes = nearest_codeword(residual, codebook)
        quantized = codebook[codes]
        commit = jnp.mean((residual - quantized) ** 2)
        cluster_size, embed_avg, new_codebook = ema_update(cluster_size, embed_avg, residual, codes,
                                                           train.vq_decay, train.vq_epsilon)
        replaced = jnp.zeros((), jnp.int32)
        if train.dead_code_threshold > 0:
            new_codebook, cluster_size, embed_avg, replaced = replace_dead_codes(
                new_codebook, cluster_size, embed_avg, residual, layer_key, train.dead_code_threshold)
        return residual - quantized, (codes, quantized, commit, new_codebook, cluster_size, embed_avg, replaced)

    keys = jax.random.split(key, vq.codebooks.shape[0])
    _, (codes, quantized, commit, codebooks, cluster_size, embed_avg, replaced) = jax.lax.scan(
        layer, x, (vq.codebooks, vq.cluster_size, vq.embed_avg, keys))
    total = jnp.sum(quantized, axis=0)
    # Layer 0's commitment carries the gradient; later residuals are detached in the reference too.
    commit_loss = (jnp.mean((z_NxD - jax.lax.stop_gradient(quantized[0])) ** 2) + jnp.sum(commit[1:])) / len(commit)
    out = z_NxD + jax.lax.stop_gradient(total - z_NxD)
    return out, codes, commit_loss, VQState(codebooks, cluster_size, embed_avg), {"replaced": replaced}


def kmeans(x_NxD: jax.Array, num_clusters: int, iters: int, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(means [C, D], counts [C])`: Lloyd's k-means from `num_clusters` random rows; an empty cluster keeps its
    mean. With `iters = 0`, the random rows themselves (counts from one assignment)."""
    n = x_NxD.shape[0]
    start = (jax.random.permutation(key, n)[:num_clusters] if n >= num_clusters
             else jax.random.randint(key, (num_clusters,), 0, n))
    means = x_NxD[start]

    def assign(means):
        codes = nearest_codeword(x_NxD, means)
        counts = jax.ops.segment_sum(jnp.ones((n,), jnp.float32), codes, num_clusters)
        return codes, counts

    def step(_, means):
        codes, counts = assign(means)
        sums = jax.ops.segment_sum(x_NxD, codes, num_clusters)
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], means)

    means = jax.lax.fori_loop(0, iters, step, means)
    return means, assign(means)[1]


def init_vq(z_NxD: jax.Array, key: jax.Array, codec: CodecConfig, train: CodecTrainConfig, batches: int = 1
            ) -> VQState:
    """Codebooks from k-means on encoder outputs `z [N, D]` of `batches` training batches: layer k on the residual
    left by layers < k. Cluster sizes start at the k-means counts per batch (the scale of the EMA counts)."""
    def layer(residual, layer_key):
        means, counts = kmeans(residual, codec.codebook_size, train.kmeans_iters, layer_key)
        return residual - means[nearest_codeword(residual, means)], (means, counts)

    _, (codebooks, counts) = jax.lax.scan(layer, z_NxD.astype(jnp.float32), jax.random.split(key, codec.n_q))
    counts = counts / batches
    return VQState(codebooks=codebooks, cluster_size=counts, embed_avg=codebooks * counts[..., None])


# ----------------------------------------------------------------------------------------------- train state & step

@flax.struct.dataclass
class CodecTrainState:
    step: jax.Array  # int32 []
    params: dict  # {'encoder': ..., 'decoder': ...}: what the optimizer trains
    opt_state: Any
    vq: VQState  # codebooks + EMA statistics, updated by the step, never by the optimizer
    rng: jax.Array  # uint32 [2]: step keys are fold_in(rng, step), so a resumed run repeats the same draws
    norms_ema: dict  # {'l1': [], 'spec': []}: decayed sums of the losses' output-gradient norms (loss balancer)
    norms_fix: jax.Array  # []: decayed count, norms_ema / norms_fix is the bias-corrected average


def learning_rate(train: CodecTrainConfig) -> optax.Schedule:
    if train.lr_schedule == "constant":
        decay = optax.constant_schedule(train.learning_rate)
    else:
        decay = optax.cosine_decay_schedule(train.learning_rate, max(1, train.total_steps - train.warmup_steps),
                                            alpha=train.final_lr_ratio)
    if train.warmup_steps <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, train.learning_rate, train.warmup_steps), decay],
                                [train.warmup_steps])


def make_optimizer(train: CodecTrainConfig) -> optax.GradientTransformation:
    adam = optax.adam(learning_rate(train), b1=train.adam_b1, b2=train.adam_b2)
    return optax.chain(optax.clip_by_global_norm(train.grad_clip), adam) if train.grad_clip > 0 else adam


def codec_params(state: CodecTrainState) -> dict:
    """The params tree of `mgjax.Codec` / `EncodecModel`: encoder, decoder and the current codebooks."""
    return {**state.params, "quantizer": {"codebooks": state.vq.codebooks}}


def _model(codec: CodecConfig) -> EncodecModel:
    return EncodecModel(codec)


@functools.partial(jax.jit, static_argnums=(0, 1))
def init_state(codec: CodecConfig, train: CodecTrainConfig, init_wav_BxNxC: jax.Array) -> CodecTrainState:
    """Random encoder/decoder (from `train.seed`), codebooks by k-means on their outputs for `init_wav` `[B, N, C]`
    (cluster sizes scaled to one training batch of `batch_size` segments)."""
    rng = jax.random.key_data(jax.random.key(train.seed))
    vq_key = jax.random.split(jax.random.wrap_key_data(rng))[1]
    params = init_codec_params(codec, int(train.seed))
    params = {"encoder": params["encoder"], "decoder": params["decoder"]}
    z_BxTxD = _model(codec).apply({"params": params}, init_wav_BxNxC, method=EncodecModel.embed)
    batches = init_wav_BxNxC.shape[0] * init_wav_BxNxC.shape[1] / (train.batch_size * segment_samples(codec, train))
    vq = init_vq(z_BxTxD.reshape(-1, z_BxTxD.shape[-1]), vq_key, codec, train, batches)
    return CodecTrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=make_optimizer(train).init(params),
                           vq=vq, rng=rng, norms_ema={"l1": jnp.zeros(()), "spec": jnp.zeros(())},
                           norms_fix=jnp.zeros(()))


def forward(params: dict, vq: VQState, wav_BxNxC: jax.Array, key: jax.Array, codec: CodecConfig,
            train: CodecTrainConfig) -> tuple[tuple[jax.Array, jax.Array], tuple[VQState, jax.Array, dict]]:
    """Training forward on segments `[B, N, C]` (N a multiple of the hop): ((reconstruction `[B*C, N]`, commitment
    loss `[]`), (updated VQ state, codes `[K, B*T]`, stats))."""
    model = _model(codec)
    z_BxTxD = model.apply({"params": params}, wav_BxNxC, method=EncodecModel.embed)
    batch, frames, dim = z_BxTxD.shape
    quantized, codes, commit, vq, stats = quantize_train(z_BxTxD.reshape(-1, dim), vq, key, train)
    wav_hat = model.apply({"params": params}, quantized.reshape(batch, frames, dim),
                          method=lambda m, q: m.decoder(q))[:, :wav_BxNxC.shape[1]]
    return (jnp.moveaxis(wav_hat, -1, 1).reshape(-1, wav_BxNxC.shape[1]), commit), (vq, codes, stats)


def reconstruction_losses(x_BxN: jax.Array, y_BxN: jax.Array, codec: CodecConfig, train: CodecTrainConfig
                          ) -> dict[str, jax.Array]:
    """{'l1': waveform L1, 'spec': multi-scale mel loss} of reconstruction `y` against `x`."""
    return {"l1": jnp.mean(jnp.abs(x_BxN - y_BxN)), "spec": multiscale_mel_loss(x_BxN, y_BxN, codec.sample_rate, train)}


def loss_gradients(x_BxN: jax.Array, y_BxN: jax.Array, codec: CodecConfig, train: CodecTrainConfig
                   ) -> tuple[dict, dict, dict]:
    """(losses, their gradients w.r.t. the reconstruction `y` `[B, N]`, the gradients' mean per-item norms)."""
    losses, grads, norms = {}, {}, {}
    for name in ("l1", "spec"):
        losses[name], grads[name] = jax.value_and_grad(
            lambda y: reconstruction_losses(x_BxN, y, codec, train)[name])(y_BxN)
        norms[name] = jnp.mean(jnp.sqrt(jnp.sum(grads[name] ** 2, axis=-1)))
    return losses, grads, norms


def balance(grads: dict, norm_avg: dict, train: CodecTrainConfig) -> jax.Array:
    """The gradient to backpropagate from the reconstruction, `[B, N]`.

    With `balance_losses` (audiocraft's `Balancer`), each loss's gradient is divided by the running average of its
    norm (`norm_avg`, {name: []}) and weighted by its share of the weights, so that `l1_weight : spec_weight` is the
    ratio of their gradient norms whatever the losses' scales; otherwise the plain weighted sum.
    """
    weights = {"l1": train.l1_weight, "spec": train.spec_weight}
    if not train.balance_losses:
        return sum(weights[n] * grads[n] for n in weights)
    total = sum(weights.values())
    return sum(weights[n] / total / (1e-12 + norm_avg[n]) * grads[n] for n in weights)


# CodecTrainConfig fields that never reach the train step: runs differing only in these share its compiled program.
_HOST_ONLY_FIELDS = ("seed", "kmeans_iters", "init_batches", "log_every", "eval_every", "eval_clips",
                     "checkpoint_every", "keep_checkpoints")


def step_config(train: CodecTrainConfig) -> CodecTrainConfig:
    """`train` with the host-only fields at their defaults (the static argument of the jitted step)."""
    defaults = CodecTrainConfig()
    return dataclasses.replace(train, **{name: getattr(defaults, name) for name in _HOST_ONLY_FIELDS})


def train_step(codec: CodecConfig, train: CodecTrainConfig, state: CodecTrainState, wav_BxNxC: jax.Array
               ) -> tuple[CodecTrainState, dict]:
    """One Adam step on the reconstruction losses plus one EMA update of the codebooks (jitted; `state` is donated).
    `wav` `[B, N, C]`, N a multiple of the hop. Metrics: loss, l1, spec, commit, replaced `[K]` (dead codes
    replaced), perplexity `[K]` of this batch's codes, grad_norm, lr."""
    if wav_BxNxC.ndim != 3 or wav_BxNxC.shape[1] % codec.hop_length or wav_BxNxC.shape[2] != codec.channels:
        raise ValueError(f"wav must be [B, N, {codec.channels}] with N a multiple of the hop {codec.hop_length}, "
                         f"got shape {tuple(wav_BxNxC.shape)}")
    return _train_step(codec, step_config(train), state, wav_BxNxC)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=2)
def _train_step(codec: CodecConfig, train: CodecTrainConfig, state: CodecTrainState, wav_BxNxC: jax.Array
                ) -> tuple[CodecTrainState, dict]:
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    (y, commit), backward, (vq, codes, stats) = jax.vjp(
        lambda p: forward(p, state.vq, wav_BxNxC, key, codec, train), state.params, has_aux=True)
    x = jnp.moveaxis(wav_BxNxC, -1, 1).reshape(y.shape)
    losses, loss_grads, norms = loss_gradients(x, y, codec, train)
    # Bias-corrected EMA of the gradient norms, this batch included (audiocraft's averager).
    norms_ema = {n: state.norms_ema[n] * train.balancer_decay + norms[n] for n in norms}
    fix = state.norms_fix * train.balancer_decay + 1.0
    grad_y = balance(loss_grads, {n: norms_ema[n] / fix for n in norms}, train)
    (grads,) = backward((grad_y, jnp.asarray(train.commitment_weight, commit.dtype)))
    updates, opt_state = make_optimizer(train).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": train.l1_weight * losses["l1"] + train.spec_weight * losses["spec"]
               + train.commitment_weight * commit, **losses, "commit": commit, "replaced": stats["replaced"],
               "grad_norm_l1": norms["l1"], "grad_norm_spec": norms["spec"]}
    counts = jax.vmap(lambda c: jnp.bincount(c, length=codec.codebook_size))(codes)
    p = counts / codes.shape[1]
    metrics["perplexity"] = jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, 1e-30)), 0.0), axis=1))
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["lr"] = learning_rate(train)(state.step)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, vq=vq, norms_ema=norms_ema,
                         norms_fix=fix), metrics


def abstract_state(codec: CodecConfig, train: CodecTrainConfig) -> Any:
    """ShapeDtypeStructs of the train state (the restore target of a training checkpoint)."""
    wav = jax.ShapeDtypeStruct((1, codec.hop_length, codec.channels), jnp.float32)
    return jax.eval_shape(lambda w: init_state.__wrapped__(codec, train, w), wav)


# ----------------------------------------------------------------------------------------------- evaluation

@functools.partial(jax.jit, static_argnums=(0, 1))
def _round_trip(codec: CodecConfig, train: CodecTrainConfig, params: dict, wav_BxNxC: jax.Array):
    model = _model(codec)
    codes = model.apply({"params": params}, wav_BxNxC, method=EncodecModel.encode)
    wav_hat = model.apply({"params": params}, codes, method=EncodecModel.decode)[:, :wav_BxNxC.shape[1]]
    x = jnp.moveaxis(wav_BxNxC, -1, 1).reshape(-1, wav_BxNxC.shape[1])
    y = jnp.moveaxis(wav_hat, -1, 1).reshape(-1, wav_BxNxC.shape[1])
    return codes, wav_hat, jnp.stack([mel_distance(x, y, codec.sample_rate, train, floor) for floor in (1e-5, 1e-3)])


def evaluate(codec: CodecConfig, train: CodecTrainConfig, params: dict, clips_BxCxN: np.ndarray,
             batch_size: int = 8) -> dict:
    """Reconstruction quality through the inference path (encode -> nearest codes -> decode) on clips `[B, C, N]`:
    mean SI-SNR (dB), mean mel distance (L1 of log10 mel, averaged over the loss windows, with a -100 dB floor and,
    closer to what is audible, a -60 dB one), codebook usage, and the reconstructions `[B, C, N]` (key 'wav')."""
    clips = np.asarray(clips_BxCxN, np.float32)
    if clips.ndim != 3 or clips.shape[1] != codec.channels:
        raise ValueError(f"clips must be [B, {codec.channels}, N], got shape {clips.shape}")
    codes, recon, mel = [], [], []
    for i in range(0, len(clips), batch_size):
        piece = jnp.asarray(np.moveaxis(clips[i:i + batch_size], 1, -1))
        c, w, m = _round_trip(codec, step_config(train), params, piece)
        codes.append(np.asarray(c))
        recon.append(np.moveaxis(np.asarray(w), -1, 1))
        mel.append(np.asarray(m).T)  # [B, 2]
    recon = np.concatenate(recon)
    snr = si_snr(recon, clips).mean(axis=1)  # [B] (channels averaged)
    usage = codebook_usage(np.concatenate(codes), codec.codebook_size)
    return {"si_snr_db": float(np.mean(snr)), "si_snr_db_per_clip": snr.tolist(),
            "mel_distance": float(np.mean(np.concatenate(mel)[:, 0])),
            "mel_distance_60db": float(np.mean(np.concatenate(mel)[:, 1])), **usage, "wav": recon}


def metrics_to_host(metrics: Mapping[str, Any]) -> dict:
    """Device metrics -> floats / lists of floats (JSON-ready)."""
    out = {}
    for name, value in metrics.items():
        value = np.asarray(value)
        out[name] = value.tolist() if value.ndim else float(value)
    return out


def describe(codec: CodecConfig) -> str:
    """One line: frame rate, codebooks and bitrate."""
    bits = codec.n_q * math.log2(codec.codebook_size) * codec.frame_rate
    return (f"{codec.sample_rate} Hz, hop {codec.hop_length} ({codec.frame_rate:g} frames/s), {codec.n_q} x "
            f"{codec.codebook_size} codes ({bits / 1000:.2f} kbps), latent {codec.dimension}, filters "
            f"{codec.n_filters}, LSTM layers {codec.lstm_layers}")
