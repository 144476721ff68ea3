"""Frozen, hashable configuration dataclasses and their YAML / `key=value` loading.

A YAML file has one section per dataclass field of `MusicGenConfig` (`codec`, `text`, `lm`) plus an optional `train`
section; every key must name a field, otherwise loading fails with a message naming the key. Lists become tuples so
configs stay hashable (they are static arguments to `jax.jit`).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import yaml

from mgjax.lm.patterns import PATTERNS, pattern_from_config


class ConfigError(ValueError):
    """A configuration file or override that does not map onto the dataclasses."""


REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLEMENTATIONS = ("auto", "dense", "pallas", "pallas_interpret", "cudnn")
KERNELS = ("auto", "cpu", "plain")
CONDITIONINGS = ("cross", "prepend")  # the condition fusers' names (`mgjax.conditioning.fuser.FUSERS`)


@dataclasses.dataclass(frozen=True)
class CodecConfig:
    """EnCodec (SEANet encoder/decoder + residual VQ). Defaults: the 32 kHz codec of the released MusicGen models."""

    sample_rate: int = 32000
    channels: int = 1
    dimension: int = 128  # latent width (transformers: hidden_size)
    n_filters: int = 64
    ratios: tuple[int, ...] = (8, 5, 4, 4)  # decoder (upsampling) order; the encoder uses them reversed
    n_residual_layers: int = 1
    residual_kernel_size: int = 3
    dilation_base: int = 2
    kernel_size: int = 7
    last_kernel_size: int = 7
    compress: int = 2
    lstm_layers: int = 2
    causal: bool = False
    pad_mode: str = "reflect"  # 'reflect' (transformers encodec_32khz) or 'constant' (audiocraft yaml)
    true_skip: bool = True  # identity skip in residual blocks (transformers: not use_conv_shortcut)
    trim_right_ratio: float = 1.0
    n_q: int = 4
    codebook_size: int = 2048
    codebook_dim: int = 0  # 0 means `dimension`
    normalize: bool = False

    @property
    def hop_length(self) -> int:
        return int(math.prod(self.ratios))

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    @property
    def effective_codebook_dim(self) -> int:
        return self.codebook_dim or self.dimension

    def validate(self) -> None:
        if self.pad_mode not in ("reflect", "constant"):
            raise ConfigError(f"codec.pad_mode must be 'reflect' or 'constant', got {self.pad_mode!r}")
        if self.n_q < 1 or self.codebook_size < 2:
            raise ConfigError(f"codec needs n_q >= 1 and codebook_size >= 2, got {self.n_q}, {self.codebook_size}")
        if not self.ratios or any(r < 1 for r in self.ratios):
            raise ConfigError(f"codec.ratios must be positive integers, got {self.ratios}")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """T5 encoder. Defaults: t5-base."""

    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "relu"  # 'relu' or 'gated-gelu'
    layer_norm_epsilon: float = 1e-6
    pad_token_id: int = 0

    def validate(self) -> None:
        if self.num_layers < 1 or self.num_heads < 1:
            raise ConfigError(f"text.num_layers and text.num_heads must be >= 1, got {self.num_layers} and "
                              f"{self.num_heads} (a zero-layer stack cannot be checkpointed)")
        if self.feed_forward_proj not in ("relu", "gated-gelu"):
            raise ConfigError(f"text.feed_forward_proj must be 'relu' or 'gated-gelu', got {self.feed_forward_proj!r}")


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """MusicGen decoder LM. Defaults: musicgen-small."""

    dim: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    ffn_dim: int = 4096
    num_codebooks: int = 4
    card: int = 2048  # codebook size; token id `card` is the special (input-only) token
    # Codebook interleaving, a name of `mgjax.lm.patterns.PATTERNS` (delay | parallel | unroll | coarse_first |
    # musiclm) with its settings, as audiocraft's `codebooks_pattern` section has them:
    pattern: str = "delay"
    pattern_delays: tuple[int, ...] = ()  # delay / unroll / coarse_first: () means the pattern's default
    pattern_flattening: tuple[int, ...] = ()  # unroll pattern: () means (0, 1, ..., K-1)
    pattern_group_size: int = 2  # musiclm pattern (audiocraft's group_by)
    pattern_flatten_first: int = 0  # delay pattern: the first N timesteps one codebook per step
    pattern_empty_initial: int = 0  # delay / parallel: N extra empty steps after the leading one
    # The condition fuser, one of CONDITIONINGS (`mgjax.conditioning.fuser.FUSERS`): 'cross' (text by cross-attention)
    # or 'prepend' (melody models: chroma + text prepended). Code asks the fuser (`takes_melody`, ...), not the string.
    conditioning: str = "cross"
    # 2: stereo (musicgen-stereo-*): each channel is coded by the mono codec and the codebooks interleave left/right,
    # [L0, R0, L1, R1, ...], so num_codebooks = 2 x codec.n_q
    audio_channels: int = 1
    layer_norm_eps: float = 1e-5
    compute_dtype: str = "float32"
    # 'int8': matmul weights stored as int8 with per-output-channel float32 scales and multiplied as int8 x int8
    # -> int32 with per-row activation scales (a sampling-speed option; `quantize_lm_params` converts float params).
    weight_format: str = "float32"
    remat: bool = False
    # What the backward pass keeps of each layer (`mgjax.lm.remat`): none | full | dots | dots_no_batch |
    # names:<checkpoint names, comma-separated>; '' follows `remat` (false: none, true: full)
    remat_policy: str = ""
    # Teacher-forced attention core: auto (by backend: pallas on TPU, cudnn on GPU, dense on CPU) | dense | pallas |
    # pallas_interpret | cudnn (`mgjax.kernels.attention`)
    attention: str = "auto"
    # Formulations of the projections, feed-forward, heads and decoding layout (`mgjax.kernels.select`): auto (by
    # backend: cpu on the CPU, plain elsewhere) | cpu | plain. The same numbers either way: a runtime choice that
    # changes the compiled program, never what the params mean.
    kernels: str = "auto"
    # Layers per iteration of the scan over layers (1: one compiled layer). Larger trades compile time and code
    # size for fewer loop iterations; the compile check compiles 1 and 2 to price one layer (`mgjax.aot`).
    scan_unroll: int = 1
    num_chroma: int = 12  # melody models: chroma bins projected and prepended
    chroma_length: int = 235  # melody models: number of chroma frames in the prefix
    max_duration: float = 30.0  # seconds of the training window: longer generations go window by window
    extend_stride: float = 18.0  # seconds a window advances; each new window is prompted with the rest

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def effective_remat_policy(self) -> str:
        return self.remat_policy or ("full" if self.remat else "none")

    def validate(self) -> None:
        if self.num_layers < 1 or self.num_heads < 1:
            raise ConfigError(f"lm.num_layers and lm.num_heads must be >= 1, got {self.num_layers} and "
                              f"{self.num_heads}")
        if self.dim % self.num_heads:
            raise ConfigError(f"lm.dim={self.dim} is not divisible by lm.num_heads={self.num_heads}")
        if self.conditioning not in CONDITIONINGS:
            raise ConfigError(f"lm.conditioning must be one of {', '.join(CONDITIONINGS)}, got {self.conditioning!r}")
        if self.pattern not in PATTERNS:
            raise ConfigError(f"unknown lm.pattern {self.pattern!r}; choose one of {', '.join(PATTERNS)}")
        try:
            pattern = pattern_from_config(self)
        except ValueError as err:
            raise ConfigError(f"lm.pattern={self.pattern}: {err}") from None
        if not pattern.starts_with_special_token(1):
            raise ConfigError(f"lm.pattern_empty_initial={self.pattern_empty_initial} omits the leading special "
                              f"step (MAGNeT's non-autoregressive layout); MusicGen's causal LM predicts each step "
                              f"from the ones before it and needs that step")
        if not 0 < self.extend_stride < self.max_duration:
            raise ConfigError(f"lm.extend_stride={self.extend_stride} must lie in (0, lm.max_duration="
                              f"{self.max_duration})")
        if self.weight_format not in ("float32", "int8"):
            raise ConfigError(f"lm.weight_format must be 'float32' or 'int8', got {self.weight_format!r}")
        if self.effective_remat_policy not in REMAT_POLICIES and not self.effective_remat_policy.startswith("names:"):
            raise ConfigError(f"lm.remat_policy must be one of {', '.join(REMAT_POLICIES)} or names:<name,...>, "
                              f"got {self.remat_policy!r}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(f"lm.attention must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}, "
                              f"got {self.attention!r}")
        if self.kernels not in KERNELS:
            raise ConfigError(f"lm.kernels must be one of {', '.join(KERNELS)}, got {self.kernels!r}")
        if not 1 <= self.scan_unroll <= self.num_layers:
            raise ConfigError(f"lm.scan_unroll must lie in [1, lm.num_layers={self.num_layers}], got "
                              f"{self.scan_unroll}")
        if self.compute_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"lm.compute_dtype must be float32, bfloat16 or float16, got {self.compute_dtype!r}")
        if self.audio_channels not in (1, 2) or self.num_codebooks % self.audio_channels:
            raise ConfigError(f"lm.audio_channels must be 1 or 2 and divide lm.num_codebooks={self.num_codebooks}, "
                              f"got {self.audio_channels}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation, data and mesh settings for `train.py`."""

    seed: int = 0
    batch_size: int = 8
    segment_duration: float = 10.0
    learning_rate: float = 1e-4
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    weight_decay: float = 0.1
    warmup_steps: int = 100
    total_steps: int = 1000
    grad_clip: float = 1.0
    grad_accum_steps: int = 1
    ema_decay: float = 0.0  # 0 disables EMA
    cfg_dropout: float = 0.1
    # Targets in the first `opening_seconds` of each segment weigh `opening_loss_weight` in the training loss (the
    # validation loss stays unweighted). At a segment's start the caption is the only source of what the audio
    # context later gives away (key, instrument), so this strengthens the prompt's hold on how a clip begins.
    opening_seconds: float = 0.0
    opening_loss_weight: float = 1.0
    train_text_encoder: bool = False
    mesh_shape: tuple[int, ...] = (-1, 1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    data_dir: str = ""
    output_dir: str = "runs/default"
    # Data (mgjax/data.py): `data_dir` is a folder of audio files with sidecar captions, a JSONL manifest, or several
    # of these joined by commas.
    synthetic: bool = False  # train on generated structured codes instead of audio (tests, benches)
    cache_dir: str = ""  # codes cache; "" means <output_dir>/code_cache
    tokenizer_dir: str = ""  # "" means <pretrained>/tokenizer when it exists, else caption ids from the metadata
    max_text_tokens: int = 64  # captions padded/truncated to this many tokens (static shapes)
    valid_fraction: float = 0.0  # share of files held out for validation (chosen by a hash of the path)
    eval_every: int = 0  # 0 disables periodic validation
    eval_batches: int = 4
    # Initialisation: a converted mgjax MusicGen checkpoint supplies the codec and T5 (and the LM when finetuning).
    pretrained: str = ""
    finetune: bool = False
    # A codec (or MusicGen) checkpoint whose codec encodes the audio, e.g. one trained by train_codec.py; takes
    # precedence over the codec of `pretrained`. Its codec config must equal the `codec` section.
    codec_checkpoint: str = ""
    # Checkpoints, logging, multi-host.
    async_checkpointing: bool = True
    tensorboard: bool = True  # skipped cleanly when tensorboard is not installed
    distributed: bool = False  # call jax.distributed.initialize() (multi-host pods)
    coordinator_address: str = ""  # "" lets JAX auto-detect (TPU pods, SLURM)
    num_processes: int = 0  # 0: auto-detect
    process_id: int = -1  # -1: auto-detect

    def validate(self) -> None:
        """Sizes, rates and fractions in their ranges, every float finite: a bad value is found when the config is
        read, before a run folder or a compiled program exists."""
        from mgjax.validation import InvalidInput, as_float, as_int

        big = 2 ** 31 - 1
        whole = {"batch_size": 1, "grad_accum_steps": 1, "total_steps": 0, "warmup_steps": 0, "checkpoint_every": 1,
                 "keep_checkpoints": 1, "log_every": 1, "eval_every": 0, "eval_batches": 1, "max_text_tokens": 1}
        fractions = {"adam_b1": (0.0, 1.0), "adam_b2": (0.0, 1.0), "ema_decay": (0.0, 1.0), "cfg_dropout": (0.0, 1.0),
                     "valid_fraction": (0.0, 1.0), "learning_rate": (0.0, 10.0), "weight_decay": (0.0, 10.0),
                     "grad_clip": (0.0, 1e9), "opening_seconds": (0.0, 3600.0)}
        try:
            for name, low in whole.items():
                as_int(f"train.{name}", getattr(self, name), low, big)
            for name, (low, high) in fractions.items():
                as_float(f"train.{name}", getattr(self, name), low, high)
            as_float("train.segment_duration", self.segment_duration, 0.0, 3600.0, low_open=True, unit=" seconds")
        except InvalidInput as err:
            raise ConfigError(f"{err}; fix it in the config file or as an override (train.KEY=VALUE)") from None


@dataclasses.dataclass(frozen=True)
class MusicGenConfig:
    """The whole model: codec, text encoder, decoder LM; `train` only matters to `train.py`."""

    codec: CodecConfig = dataclasses.field(default_factory=CodecConfig)
    text: T5Config = dataclasses.field(default_factory=T5Config)
    lm: LMConfig = dataclasses.field(default_factory=LMConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def validate(self) -> "MusicGenConfig":
        self.codec.validate()
        self.text.validate()
        self.lm.validate()
        self.train.validate()
        if self.lm.audio_channels == 2 and self.codec.channels != 1:
            raise ConfigError(f"lm.audio_channels=2 (stereo) codes each channel with a mono codec; codec.channels is "
                              f"{self.codec.channels}")
        if self.codec.n_q * self.lm.audio_channels != self.lm.num_codebooks:
            stereo = " x lm.audio_channels=2" if self.lm.audio_channels == 2 else ""
            raise ConfigError(f"codec.n_q={self.codec.n_q}{stereo} differs from lm.num_codebooks="
                              f"{self.lm.num_codebooks}; set both alike")
        if self.train.opening_seconds < 0 or self.train.opening_loss_weight <= 0:
            raise ConfigError(f"train.opening_seconds must be >= 0 and train.opening_loss_weight > 0, got "
                              f"{self.train.opening_seconds} and {self.train.opening_loss_weight}")
        if self.codec.codebook_size != self.lm.card:
            raise ConfigError(
                f"codec.codebook_size={self.codec.codebook_size} differs from lm.card={self.lm.card}; set both alike")
        return self


SECTIONS: dict[str, type] = {"codec": CodecConfig, "text": T5Config, "lm": LMConfig, "train": TrainConfig}


def _coerce(value: Any, field_type: Any, where: str) -> Any:
    """Turns a YAML/override value into the field's type (lists into tuples), or raises `ConfigError`."""
    type_name = field_type if isinstance(field_type, str) else getattr(field_type, "__name__", str(field_type))
    if type_name.startswith("tuple"):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} expects a list, got {value!r}")
        inner = int if "int" in type_name else float
        return tuple(inner(v) for v in value)
    if type_name == "bool":
        if isinstance(value, str):
            lowered = value.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ConfigError(f"{where} expects true/false, got {value!r}")
            return lowered in ("true", "1", "yes")
        return bool(value)
    try:
        if type_name == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if type_name == "float":
            return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} expects {type_name}, got {value!r}") from None
    return str(value)


def dataclass_from_dict(cls: type, values: Mapping[str, Any], where: str):
    """Builds dataclass `cls` from `values`; an unknown key raises `ConfigError` naming it."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown config key '{where}.{key}' (known: {', '.join(sorted(fields))})")
        kwargs[key] = _coerce(value, fields[key].type, f"{where}.{key}")
    return cls(**kwargs)


def from_dict(values: Mapping[str, Any]) -> MusicGenConfig:
    """`{'codec': {...}, 'text': {...}, 'lm': {...}, 'train': {...}}` -> validated `MusicGenConfig`."""
    sections = {}
    for name, section in (values or {}).items():
        if name not in SECTIONS:
            raise ConfigError(f"unknown config section '{name}' (known: {', '.join(SECTIONS)})")
        if not isinstance(section, Mapping):
            raise ConfigError(f"config section '{name}' must be a mapping, got {type(section).__name__}")
        sections[name] = dataclass_from_dict(SECTIONS[name], section, name)
    return MusicGenConfig(**sections).validate()


def to_dict(config: Any) -> dict:
    """Dataclass config -> plain nested dict (tuples as lists), ready for YAML/JSON."""
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[field.name] = value
    return out


def parse_overrides(overrides: Sequence[str]) -> dict:
    """`['lm.dim=512', 'train.mesh_shape=[2,2,2]']` -> nested dict of raw values."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(f"override key {dotted!r} must be section.key (e.g. lm.dim=512)")
        value = yaml.safe_load(raw) if raw.strip() else ""
        nested.setdefault(parts[0], {})[parts[1]] = value
    return nested


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict:
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for section, values in extra.items():
        if isinstance(values, Mapping) and isinstance(out.get(section), Mapping):
            out[section].update(values)
        else:
            out[section] = dict(values) if isinstance(values, Mapping) else values
    return out


CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def resolve_config_path(name_or_path: str) -> str:
    """A YAML path, or a bare name looked up in `configs/` (`tiny` -> configs/tiny.yaml)."""
    if os.path.isfile(name_or_path):
        return name_or_path
    candidate = os.path.join(CONFIG_DIR, name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml")
    if os.path.isfile(candidate):
        return candidate
    raise ConfigError(f"config {name_or_path!r} not found (neither a file nor a name in {CONFIG_DIR})")


def load_config(name_or_path: str, overrides: Sequence[str] = ()) -> MusicGenConfig:
    """Loads a YAML config (path or name in configs/) and applies `section.key=value` overrides."""
    path = resolve_config_path(name_or_path)
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    return from_dict(merge(raw, parse_overrides(overrides)))


def save_config(config: MusicGenConfig, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(config), f, sort_keys=False)
