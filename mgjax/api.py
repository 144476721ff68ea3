"""The `MusicGen` facade: load a converted checkpoint, encode/decode audio, generate music from text."""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mgjax import checkpoint
from mgjax.codec.encodec import Codec, init_codec_params
from mgjax.config import ConfigError, MusicGenConfig, T5Config, from_dict
from mgjax.lm.model import MusicGenLM
from mgjax.sampling import SamplingConfig, generate_codes, progress_callback
from mgjax.text.t5 import T5Encoder


@dataclasses.dataclass
class GenerationOutput:
    """`wav` float32 `[B, C, N]` at the model's sample rate; `codes` int32 `[B, K, T]`."""

    wav: np.ndarray
    codes: np.ndarray


def init_text_params(config: T5Config, seed: int = 0) -> dict:
    ids = jnp.zeros((1, 4), jnp.int32)
    return nn.meta.unbox(jax.jit(T5Encoder(config).init)(jax.random.key(seed), ids, jnp.ones_like(ids))["params"])


def init_lm_params(config: MusicGenConfig, seed: int = 0) -> dict:
    lm = MusicGenLM(config.lm)
    codes = jnp.zeros((1, config.lm.num_codebooks, 2), jnp.int32)
    cond = jnp.zeros((1, 3, config.text.d_model), jnp.float32)
    chroma = jnp.zeros((1, 2, config.lm.num_chroma), jnp.float32) if config.lm.conditioning == "prepend" else None
    init = functools.partial(lm.init, chroma=chroma)
    return nn.meta.unbox(jax.jit(init)(jax.random.key(seed), codes, cond, jnp.ones((1, 3), bool))["params"])


def init_params(config: MusicGenConfig, seed: int = 0) -> dict:
    """Random `{'codec', 'text', 'lm'}` params for `config`."""
    return {"codec": init_codec_params(config.codec, seed), "text": init_text_params(config.text, seed + 1),
            "lm": init_lm_params(config, seed + 2)}


@functools.partial(jax.jit, static_argnums=0)
def _encode_text(config: T5Config, params, input_ids, attention_mask):
    return T5Encoder(config).apply({"params": params}, input_ids, attention_mask)


class MusicGen:
    """Text (and optionally an audio prompt) in, 32 kHz music out. See DESIGN.md for the public API."""

    def __init__(self, config: MusicGenConfig, params: dict, tokenizer: Any = None):
        self.config = config.validate()
        self.params = params
        self.tokenizer = tokenizer
        self.codec = Codec(config.codec, params["codec"])

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: MusicGenConfig, seed: int = 0, tokenizer: Any = None) -> "MusicGen":
        return cls(config, init_params(config, seed), tokenizer)

    @classmethod
    def load(cls, directory: str, sharding: Optional[Callable[[Any], Any]] = None) -> "MusicGen":
        """Loads a converted checkpoint (`python -m mgjax.convert`); refuses one whose params do not match its
        config, naming the first differing parameter. `sharding(abstract_leaf)` places each leaf (default: one
        device)."""
        meta = checkpoint.read_meta(directory)
        if meta["kind"] != "musicgen":
            raise checkpoint.CheckpointError(f"{directory} holds a {meta['kind']} checkpoint, not a MusicGen; "
                                             f"load it with mgjax.Codec.load")
        try:
            config = from_dict(checkpoint.read_config_dict(directory))
        except ConfigError as err:
            raise checkpoint.CheckpointError(f"{directory}/{checkpoint.CONFIG_FILE}: {err}") from None
        abstract = jax.eval_shape(functools.partial(init_params, config))
        params = checkpoint.restore_params(directory, abstract, sharding)
        tokenizer = None
        tokenizer_dir = os.path.join(directory, checkpoint.TOKENIZER_DIR)
        if os.path.isdir(tokenizer_dir):
            from mgjax.text.tokenizer import load_tokenizer
            tokenizer = load_tokenizer(tokenizer_dir)
        return cls(config, params, tokenizer)

    # --- properties ---------------------------------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return self.config.codec.sample_rate

    @property
    def frame_rate(self) -> float:
        return self.config.codec.frame_rate

    # --- audio --------------------------------------------------------------------------------------------------
    def encode(self, wav) -> jax.Array:
        """float32 `[B, C, N]` at `sample_rate` -> int32 `[B, K, T]`."""
        return self.codec.encode(wav)

    def decode(self, codes) -> jax.Array:
        """int32 `[B, K, T]` -> float32 `[B, C, T * hop]`."""
        return self.codec.decode(codes)

    # --- text ---------------------------------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str] | None, input_ids=None, attention_mask=None):
        """Prompts (strings, through the checkpoint's tokenizer) or token ids -> `(ids [B, L], mask [B, L])`."""
        if input_ids is not None:
            input_ids = np.asarray(input_ids)
            if input_ids.ndim != 2 or input_ids.shape[1] == 0:
                raise ValueError(f"input_ids must be [batch, length] with length >= 1, got shape {input_ids.shape}")
            if input_ids.min() < 0 or input_ids.max() >= self.config.text.vocab_size:
                raise ValueError(f"input_ids must lie in [0, {self.config.text.vocab_size})")
            mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
            if mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {input_ids.shape}")
            return input_ids.astype(np.int32), mask.astype(np.int32)
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer: pass token ids (input_ids=[B, L], attention_mask) "
                             "or convert a checkpoint directory that holds tokenizer files")
        from mgjax.text.tokenizer import tokenize
        if isinstance(prompts, str):
            prompts = [prompts]
        return tokenize(self.tokenizer, prompts)

    def encode_text(self, input_ids, attention_mask) -> jax.Array:
        """T5 states `[B, L, d_model]` of token ids `[B, L]`."""
        return _encode_text(self.config.text, self.params["text"], jnp.asarray(input_ids), jnp.asarray(attention_mask))

    # --- generation ---------------------------------------------------------------------------------------------
    def frames_for(self, duration: float) -> int:
        if not duration > 0:
            raise ValueError(f"duration must be > 0 seconds, got {duration}")
        return max(1, int(round(duration * self.frame_rate)))

    def generate(self, prompts: Sequence[str] | None = None, duration: float = 10.0, *, input_ids=None,
                 attention_mask=None, melody=None, prompt_audio=None, top_k: int = 250, top_p: float = 0.0,
                 temperature: float = 1.0, cfg_coef: float = 3.0, greedy: bool = False, seed: int = 0,
                 progress: Optional[Callable[[int, int], None]] = None, progress_every: int = 0) -> GenerationOutput:
        """Generates `duration` seconds for each prompt (strings, or `input_ids`/`attention_mask`).

        `prompt_audio` float32 `[B, C, N]`: continuation, its codes kept as the first frames of the output.
        `progress(step, total)` is called every `progress_every` decoding steps from inside the compiled loop.
        """
        if melody is not None:
            raise NotImplementedError("melody conditioning needs a MusicGen-melody checkpoint and is not supported "
                                      "by this version of mgjax yet")
        ids, mask = self.tokenize(prompts, input_ids, attention_mask)
        frames = self.frames_for(duration)
        batch, num_codebooks = ids.shape[0], self.config.lm.num_codebooks
        if prompt_audio is not None:
            prompt_codes = np.asarray(self.encode(prompt_audio))
            if prompt_codes.shape[0] != batch:
                raise ValueError(f"prompt_audio has batch {prompt_codes.shape[0]} but there are {batch} prompts")
            if prompt_codes.shape[-1] > frames:
                raise ValueError(f"prompt_audio ({prompt_codes.shape[-1] / self.frame_rate:.2f} s) is longer than "
                                 f"the requested duration ({duration} s)")
        else:
            prompt_codes = np.zeros((batch, num_codebooks, 0), np.int32)
        sampling = SamplingConfig(top_k=top_k, top_p=top_p, temperature=temperature, cfg_coef=cfg_coef,
                                  greedy=greedy)
        cond = self.encode_text(ids, mask)
        every = progress_every if progress is not None else 0
        with progress_callback(progress):
            codes = generate_codes(self.params["lm"], cond, jnp.asarray(mask), jax.random.key(seed), prompt_codes,
                                   lm_config=self.config.lm, frames=frames, sampling=sampling, progress_every=every)
            codes = jax.block_until_ready(codes)
        wav = self.decode(codes)
        return GenerationOutput(wav=np.asarray(wav), codes=np.asarray(codes))
