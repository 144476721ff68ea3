"""LM training: train state, optimizer, masked pattern loss, and the jitted (sharded) train/eval steps.

The train state is one pytree (`TrainState`): params `{'lm': ..., ['text': ...]}` (float32 master weights),
optimizer state, step, PRNG key (raw uint32 `[2]`) and optional EMA params. The text encoder is frozen by default:
its params then live in a separate `frozen` tree `{'text': ...}` that the optimizer never sees.

A batch (global arrays, batch dim sharded over ('data', 'fsdp')) holds
    codes int32 [B, K, T], mask bool [B, T] (padding), and the text condition, either
    text_ids int32 [B, L] + text_mask int32 [B, L] (run through T5) or cond float [B, L, Dc] + cond_mask [B, L]
    (precomputed T5 states), and optionally chroma float [B, F, 12] (melody models).

One step: CFG condition dropout (drawn once per batch: the whole batch gets the null condition, zero text states
and zero mask, and the null melody, a one-hot on chroma bin 0) -> pattern.build(codes, special token = card,
valid prefix) -> LM -> revert_logits -> per-codebook cross-entropy on positions that are both pattern-valid and
real (padding mask) -> AdamW (warmup + cosine, global-norm clipping), gradients optionally accumulated over
microbatches in a `lax.scan`.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mgjax import sharding as sharding_lib
from mgjax.config import LMConfig, MusicGenConfig, TrainConfig, to_dict
from mgjax.lm.loss import codebook_cross_entropy
from mgjax.lm.model import MusicGenLM, boxed_lm_params
from mgjax.lm.patterns import Pattern, pattern_from_config
from mgjax.text.t5 import boxed_t5_params, encode_text

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []
    params: dict  # {'lm': ..., ['text': ...]} float32
    opt_state: Any
    rng: jax.Array  # uint32 [2]: raw PRNG key; step keys are fold_in(rng, step), so resuming is exact
    ema: dict | None = None  # EMA of params (train.ema_decay > 0)


# ----------------------------------------------------------------------------------------------- optimizer

def learning_rate_schedule(train: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    warmup = max(0, train.warmup_steps)
    return optax.warmup_cosine_decay_schedule(0.0, train.learning_rate, warmup,
                                              max(train.total_steps, warmup + 1), end_value=0.0)


def make_optimizer(train: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (b1, b2, weight decay from the config) on the schedule."""
    adamw = optax.adamw(learning_rate_schedule(train), b1=train.adam_b1, b2=train.adam_b2,
                        weight_decay=train.weight_decay)
    return optax.chain(optax.clip_by_global_norm(train.grad_clip), adamw) if train.grad_clip > 0 else adamw


# ----------------------------------------------------------------------------------------------- models & init

def make_init_fns(config: MusicGenConfig) -> tuple[Callable[[jax.Array], TrainState], Callable[[jax.Array], dict]]:
    """(`rng -> TrainState`, `rng -> frozen`) with boxed params, for `sharding.sharded_initializer`. Two separate
    programs, so each compiles only the initialisers it needs (T5 goes to exactly one of them)."""
    optimizer = make_optimizer(config.train)
    trainable_text = config.train.train_text_encoder

    def init_state(rng):
        lm_rng, text_rng = jax.random.split(rng)
        params = {"lm": boxed_lm_params(config.lm, config.text.d_model, lm_rng)}
        if trainable_text:
            params["text"] = boxed_t5_params(config.text, text_rng)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=rng,
                          ema=params if config.train.ema_decay > 0 else None)

    def init_frozen(rng):
        return {} if trainable_text else {"text": boxed_t5_params(config.text, jax.random.split(rng)[1])}

    return init_state, init_frozen


@dataclasses.dataclass(frozen=True)
class Programs:
    """The jitted programs of one (config, mesh), built once per process and shared by every `Trainer`."""

    init_state: Callable  # rng -> TrainState, written straight into its shardings
    init_frozen: Callable  # rng -> frozen {'text': ...}
    train_step: Callable  # (state, frozen, batch) -> (state, metrics); the state is donated
    eval_step: Callable  # (params, frozen, batch) -> metrics
    state_shardings: Any
    frozen_shardings: Any
    abstract_state: Any  # ShapeDtypeStructs with this mesh's shardings: the restore target
    abstract_frozen: Any


# TrainConfig fields that never reach a compiled program: runs differing only in these share their programs.
_HOST_ONLY_FIELDS = ("seed", "segment_duration", "checkpoint_every", "keep_checkpoints", "log_every", "data_dir",
                     "output_dir", "synthetic", "cache_dir", "tokenizer_dir", "max_text_tokens", "valid_fraction",
                     "eval_every", "eval_batches", "pretrained", "codec_checkpoint", "finetune",
                     "async_checkpointing", "tensorboard", "distributed", "coordinator_address", "num_processes",
                     "process_id")


def programs(config: MusicGenConfig, mesh: jax.sharding.Mesh) -> Programs:
    """Shardings from the logical axes of `jax.eval_shape(init)`, and the init/train/eval programs jitted with
    explicit in/out shardings (cached: a resumed or repeated run in the same process compiles nothing)."""
    defaults = TrainConfig()
    host_only = {name: getattr(defaults, name) for name in _HOST_ONLY_FIELDS}
    return _programs(dataclasses.replace(config, train=dataclasses.replace(config.train, **host_only)), mesh)


_PATTERN_FIELDS = ("pattern", "pattern_delays", "pattern_flattening", "pattern_group_size", "pattern_flatten_first",
                   "pattern_empty_initial")


def _init_key(config: MusicGenConfig) -> MusicGenConfig:
    """`config` with everything that does not shape the train state reset, so e.g. every pattern or compute dtype
    shares one init program."""
    lm_defaults = LMConfig()
    lm = dataclasses.replace(config.lm, compute_dtype="float32", remat=False,
                             **{name: getattr(lm_defaults, name) for name in _PATTERN_FIELDS})
    train = TrainConfig(train_text_encoder=config.train.train_text_encoder,
                        ema_decay=0.5 if config.train.ema_decay > 0 else 0.0,
                        grad_clip=1.0 if config.train.grad_clip > 0 else 0.0)
    return dataclasses.replace(config, lm=lm, train=train)


@functools.lru_cache(maxsize=16)
def _init_programs(config: MusicGenConfig, mesh: jax.sharding.Mesh) -> dict:
    rng = jax.random.PRNGKey(0)
    init_state, state_sh = sharding_lib.sharded_initializer(make_init_fns(config)[0], mesh, rng)
    init_frozen, frozen_sh = sharding_lib.sharded_initializer(make_init_fns(config)[1], mesh, rng)
    abstract_state, abstract_frozen = jax.tree.map(
        lambda leaf, sh: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sh),
        (jax.eval_shape(init_state, rng), jax.eval_shape(init_frozen, rng)), (state_sh, frozen_sh))
    return dict(init_state=init_state, init_frozen=init_frozen,
                state_shardings=state_sh, frozen_shardings=frozen_sh, abstract_state=abstract_state,
                abstract_frozen=abstract_frozen)


@functools.lru_cache(maxsize=32)
def _programs(config: MusicGenConfig, mesh: jax.sharding.Mesh) -> Programs:
    sharding_lib.check_batch_size(config.train.batch_size, mesh, config.train.grad_accum_steps)
    init = _init_programs(_init_key(config), mesh)
    state_sh, frozen_sh = init["state_shardings"], init["frozen_shardings"]
    batch_sh, rep = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)
    return Programs(
        train_step=jax.jit(lambda s, f, b: train_step(config, mesh, s, f, b),
                           in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, rep),
                           donate_argnums=0),
        eval_step=jax.jit(lambda p, f, b: eval_step(config, p, f, b),
                          in_shardings=(state_sh.params, frozen_sh, batch_sh), out_shardings=rep),
        **init)


def with_params(state: TrainState, params: dict) -> TrainState:
    """`state` with (pretrained) `params` replacing the same top-level keys, EMA restarted from them."""
    merged = dict(state.params, **params)
    # The EMA gets its own buffers: the train step donates the state, and one buffer cannot be donated twice.
    ema = jax.tree.map(jnp.copy, merged) if state.ema is not None else None
    return state.replace(params=merged, ema=ema)


# ----------------------------------------------------------------------------------------------- loss

def drop_condition(cond: jax.Array, cond_mask: jax.Array, drop: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The null condition (zero states, zero mask) where the scalar `drop` is True, else unchanged."""
    return jnp.where(drop, jnp.zeros_like(cond), cond), jnp.where(drop, jnp.zeros_like(cond_mask), cond_mask)


def text_condition(config: MusicGenConfig, params: dict, frozen: dict, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """cond `[B, L, Dc]`, cond_mask `[B, L]` from precomputed states or from T5 on the caption tokens (float32
    whatever `lm.compute_dtype` is, as at inference: `mgjax.text.t5.encode_text`)."""
    if "cond" in batch:
        return batch["cond"], batch["cond_mask"]
    text_params = params["text"] if "text" in params else jax.lax.stop_gradient(frozen["text"])
    return encode_text(config.text, text_params, batch["text_ids"], batch["text_mask"]), batch["text_mask"]


def opening_weights(config: MusicGenConfig, timesteps: int) -> jax.Array | None:
    """`[T]` loss weights: `train.opening_loss_weight` on the frames of the first `train.opening_seconds`, 1 after;
    None when nothing is weighted."""
    train = config.train
    frames = int(round(train.opening_seconds * config.codec.frame_rate))
    if frames == 0 or train.opening_loss_weight == 1.0:
        return None
    return jnp.where(jnp.arange(timesteps) < frames, train.opening_loss_weight, 1.0).astype(jnp.float32)


def pattern_loss(config: MusicGenConfig, pattern: Pattern, params: dict, frozen: dict, batch: Batch,
                 drop: jax.Array, *, weighted: bool = False) -> tuple[jax.Array, dict]:
    """Masked per-codebook cross-entropy of the LM on `batch` -> (loss, {'per_codebook': [K], 'tokens': []});
    `weighted`: with the training loss's `opening_weights`."""
    lm = config.lm
    codes = batch["codes"]
    timesteps = codes.shape[-1]
    cond, cond_mask = drop_condition(*text_condition(config, params, frozen, batch), drop)
    chroma = batch.get("chroma")
    if chroma is not None:  # the null melody is a one-hot on bin 0 (what the LM assumes when chroma is absent)
        chroma = jnp.where(drop, jax.nn.one_hot(jnp.zeros(chroma.shape[:-1], jnp.int32), chroma.shape[-1],
                                                dtype=chroma.dtype), chroma)
    seq = pattern.build(codes, special_token=lm.card, valid_only=True)  # [B, K, S]
    logits = MusicGenLM(lm).apply({"params": params["lm"]}, seq, cond, cond_mask, chroma=chroma)
    logits, valid = pattern.revert_logits(logits, timesteps=timesteps)  # [B, K, T, card], [K, T]
    mask = jnp.asarray(valid)[None] & batch["mask"].astype(bool)[:, None, :]
    weights = opening_weights(config, timesteps) if weighted else None
    loss, per_codebook = codebook_cross_entropy(logits, codes, mask, weights)
    return loss, {"per_codebook": per_codebook, "tokens": mask.sum().astype(jnp.float32)}


# ----------------------------------------------------------------------------------------------- step

def _microbatches(batch: Batch, steps: int, mesh: jax.sharding.Mesh) -> Batch:
    """`[B, ...]` -> `[steps, B / steps, ...]`; each microbatch stays split over the data-parallel devices."""
    def split(x):
        x = x.reshape((x.shape[0] // steps, steps) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, sharding_lib.BATCH_AXES)))
    return jax.tree.map(split, batch)


def loss_and_grads(config: MusicGenConfig, pattern: Pattern, mesh: jax.sharding.Mesh, params: dict, frozen: dict,
                   batch: Batch, drop: jax.Array) -> tuple[jax.Array, dict, dict]:
    """(loss, aux, grads), averaged over `train.grad_accum_steps` microbatches run in a `lax.scan`.

    Every microbatch weighs the same, so this is the full-batch gradient when the microbatches hold equally many
    valid targets (always, without padding); the condition dropout `drop` is shared by all of them.
    """
    grad_fn = jax.value_and_grad(lambda p, b: pattern_loss(config, pattern, p, frozen, b, drop, weighted=True),
                                 has_aux=True)
    steps = config.train.grad_accum_steps
    if steps <= 1:
        (loss, aux), grads = grad_fn(params, batch)
        return loss, aux, grads

    def body(acc, micro):
        (loss, aux), grads = grad_fn(params, micro)
        return jax.tree.map(jnp.add, acc, grads), (loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, (losses, auxs) = jax.lax.scan(body, zeros, _microbatches(batch, steps, mesh))
    aux = {"per_codebook": auxs["per_codebook"].mean(0), "tokens": auxs["tokens"].sum()}
    return losses.mean(), aux, jax.tree.map(lambda g: g / steps, grads)


def train_step(config: MusicGenConfig, mesh: jax.sharding.Mesh, state: TrainState, frozen: dict,
               batch: Batch) -> tuple[TrainState, dict]:
    """One optimizer step -> (new state, metrics {loss, per_codebook [K], lr, grad_norm, tokens})."""
    train = config.train
    rng = jax.random.fold_in(state.rng, state.step)
    drop = jax.random.bernoulli(rng, train.cfg_dropout)  # once per batch, as audiocraft's CFG dropout
    loss, aux, grads = loss_and_grads(config, pattern_from_config(config.lm), mesh, state.params, frozen, batch, drop)
    updates, opt_state = make_optimizer(train).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema is not None:
        ema = jax.tree.map(lambda e, p: train.ema_decay * e + (1.0 - train.ema_decay) * p, ema, params)
    metrics = dict(aux, loss=loss, lr=learning_rate_schedule(train)(state.step), grad_norm=optax.tree.norm(grads),
                   cond_dropped=drop.astype(jnp.float32))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng, ema=ema), metrics


def eval_step(config: MusicGenConfig, params: dict, frozen: dict, batch: Batch) -> dict:
    """Loss on a batch without condition dropout -> {loss, per_codebook, tokens}."""
    loss, aux = pattern_loss(config, pattern_from_config(config.lm), params, frozen, batch, jnp.asarray(False))
    return dict(aux, loss=loss)


def load_pretrained(config: MusicGenConfig, prog: Programs, state: TrainState, frozen: dict,
                    fresh: bool) -> tuple[TrainState, dict]:
    """Takes T5 (and, when `train.finetune` on a fresh run, the LM) from the converted checkpoint `train.pretrained`,
    each leaf restored straight into its sharding. A resumed run keeps its trained params."""
    from mgjax import checkpoint

    train = config.train
    wanted = {"text": {**prog.abstract_state.params, **prog.abstract_frozen}["text"]}
    if train.finetune and fresh:
        wanted["lm"] = prog.abstract_state.params["lm"]
    loaded = checkpoint.restore_params(train.pretrained, wanted, sharding=lambda leaf: leaf.sharding)
    if "text" in state.params:
        if fresh:
            state = with_params(state, {"text": loaded.pop("text")})
        else:
            loaded.pop("text")
    else:
        frozen = dict(frozen, text=loaded.pop("text"))
    if loaded:
        state = with_params(state, loaded)
    return state, frozen


@dataclasses.dataclass
class Trainer:
    """Mesh, state, frozen params and the compiled steps of one run; `state` is replaced by every step."""

    config: MusicGenConfig
    mesh: jax.sharding.Mesh
    state: TrainState
    frozen: dict
    programs: Programs
    meta: dict  # meta of the checkpoint resumed from ({} for a fresh run)

    @classmethod
    def create(cls, config: MusicGenConfig, mesh: jax.sharding.Mesh, checkpointer: Any = None) -> "Trainer":
        """Resumes from `checkpointer`'s latest checkpoint (onto this mesh), else initialises; then loads
        `train.pretrained` if set."""
        prog = programs(config, mesh)
        rng = jax.random.PRNGKey(config.train.seed)
        meta: dict = {}
        if checkpointer is not None and checkpointer.latest_step() is not None:
            state, meta = checkpointer.restore(prog.abstract_state)
        else:
            state = prog.init_state(rng)
        frozen = prog.init_frozen(rng)
        if config.train.pretrained:
            state, frozen = load_pretrained(config, prog, state, frozen, fresh=not meta)
        return cls(config, mesh, state, frozen, prog, meta)

    @property
    def step_count(self) -> int:
        return int(jax.device_get(self.state.step))

    def step(self, local_batch: dict[str, np.ndarray]) -> dict:
        """One train step on this host's rows of the batch -> metrics (device arrays, not waited for)."""
        batch = sharding_lib.global_batch(local_batch, self.mesh)
        self.state, metrics = self.programs.train_step(self.state, self.frozen, batch)
        return metrics

    def evaluate(self, local_batches: Sequence[dict[str, np.ndarray]], use_ema: bool = False) -> dict:
        """Mean loss and per-codebook loss over batches (EMA params if asked and present)."""
        params = self.state.ema if use_ema and self.state.ema is not None else self.state.params
        results = [jax.device_get(self.programs.eval_step(params, self.frozen,
                                                          sharding_lib.global_batch(b, self.mesh)))
                   for b in local_batches]
        return {key: np.mean([r[key] for r in results], axis=0) for key in ("loss", "per_codebook")}


def checkpoint_meta(config: MusicGenConfig, step: int) -> dict:
    """What a checkpoint records beside the state: the data position (batches are a function of the step)."""
    return {"step": step, "data_position": step, "seed": config.train.seed, "config": to_dict(config)}


def fit(trainer: Trainer, dataset: Any, *, until: int | None = None, checkpointer: Any = None,
        valid: Any = None, on_log: Callable[[int, dict], None] | None = None) -> list[float]:
    """Trains from the state's step to `until` (default `train.total_steps`) -> the loss of every step run.

    `dataset.batch(step)` gives this host's rows; checkpoints every `train.checkpoint_every` steps and at the end;
    `on_log(step, metrics)` every `train.log_every` steps (metrics fetched to host, with `tokens_per_s` and, every
    `train.eval_every` steps when `valid` is given, `valid_loss`).
    """
    train = trainer.config.train
    until = train.total_steps if until is None else until
    step = trainer.step_count
    position = trainer.meta.get("data_position", step)
    if position != step:
        raise ValueError(f"checkpoint data position {position} differs from its step {step}")
    losses: list[float] = []
    last_time, last_step = time.perf_counter(), step
    while step < until:
        local = dataset.batch(step)
        metrics = trainer.step(local)
        step += 1
        losses.append(float(metrics["loss"]))  # also paces the host to the device
        if len(losses) == 1:  # keep compile time out of tokens/s
            last_time, last_step = time.perf_counter(), step
        if checkpointer is not None:
            checkpointer.save(step, trainer.state, checkpoint_meta(trainer.config, step))
        if on_log is not None and (step % max(train.log_every, 1) == 0 or step == until):
            now = time.perf_counter()
            logged = jax.device_get(metrics)
            logged["tokens_per_s"] = tokens_per_step(local) * (step - last_step) / max(now - last_time, 1e-9)
            if valid is not None and train.eval_every and step % train.eval_every == 0:
                logged["valid_loss"] = float(trainer.evaluate([valid.batch(i) for i in range(train.eval_batches)],
                                                              use_ema=True)["loss"])
            on_log(step, logged)
            last_time, last_step = time.perf_counter(), step
    if checkpointer is not None:
        checkpointer.save(step, trainer.state, checkpoint_meta(trainer.config, step), force=True)
        checkpointer.wait()
    return losses


def tokens_per_step(local_batch: dict[str, np.ndarray]) -> int:
    """Code tokens of the global batch (B * K * T) one step consumes."""
    return int(np.prod(np.shape(local_batch["codes"]))) * jax.process_count()
