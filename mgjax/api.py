"""The `MusicGen` facade: load a converted checkpoint, encode/decode audio, generate music from text."""
from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mgjax import checkpoint
from mgjax.audio import channels_from_batch, channels_to_batch, codes_from_batch, codes_to_batch, conform
from mgjax.codec.encodec import Codec, EncodecModel
from mgjax.config import ConfigError, MusicGenConfig, from_dict
from mgjax.conditioning.fuser import takes_melody
from mgjax.lm.model import boxed_lm_params, quantize_lm_params, weights_for_compute
from mgjax.sampling import (SamplingConfig, generate_codes, generate_in_chunks, split_layers_by_default,
                             steps_to_sample)
from mgjax.runtime import jit_once
from mgjax.streaming import stream_generation
from mgjax.text.t5 import boxed_t5_params, encode_text
from mgjax.validation import InvalidInput, finite_audio, generation_settings, long_duration_note, sample_rate


@dataclasses.dataclass
class GenerationOutput:
    """`wav` float32 `[B, C, N]` at the model's sample rate; `codes` int32 `[B, K, T]`."""

    wav: np.ndarray
    codes: np.ndarray


class WindowChunk(NamedTuple):
    """One compiled call of a windowed generation: the window covers frames `[start, start + W)` of the piece, its
    first `prompt_frames` given; `done` of its `total` sampling steps ran (`steps_before` in earlier windows, of
    `steps_all`). `codes` `[B, K, W]`: final where `sampling.complete_frames` says so, the rest provisional."""

    start: int
    prompt_frames: int
    done: int
    total: int
    steps_before: int
    steps_all: int
    codes: np.ndarray


def boxed_init(config: MusicGenConfig, key: jax.Array) -> dict:
    """`{'codec', 'text', 'lm'}` params as `init` returns them (logically partitioned boxes), unjitted."""
    codec_key, text_key, lm_key = jax.random.split(key, 3)
    wav = jnp.zeros((1, config.codec.hop_length * 2, config.codec.channels), jnp.float32)
    return {"codec": EncodecModel(config.codec).init(codec_key, wav)["params"],
            "text": boxed_t5_params(config.text, text_key),
            "lm": boxed_lm_params(config.lm, config.text.d_model, lm_key)}


def init_lm_params(config: MusicGenConfig, seed: int = 0) -> dict:
    """Random LM params alone (plain arrays): the codec and T5 are not built."""
    return jit_once(lambda key: nn.meta.unbox(boxed_lm_params(config.lm, config.text.d_model, key)))(
        jax.random.key(seed))


def init_params(config: MusicGenConfig, seed: int = 0) -> dict:
    """Random `{'codec', 'text', 'lm'}` params (plain arrays) for `config`."""
    return jit_once(lambda key: nn.meta.unbox(boxed_init(config, key)))(jax.random.key(seed))


def abstract_params(config: MusicGenConfig, mesh: Optional[jax.sharding.Mesh] = None) -> dict:
    """The params' shapes and dtypes (`jax.ShapeDtypeStruct`), placed by the logical-axis rules on `mesh` if given."""
    boxed = jax.eval_shape(functools.partial(boxed_init, config), jax.random.key(0))
    abstract = nn.meta.unbox(boxed)
    if mesh is None:
        return abstract
    from mgjax.sharding import logical_shardings
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                        abstract, logical_shardings(boxed, mesh))


def window_plan(frames: int, window: int, stride: int, prompt_frames: int = 0) -> list[tuple[int, int]]:
    """How a generation of `frames` frames walks windows of `window` frames advancing by `stride`, as
    `(start, first_new)` per window: the window covers frames `[start, start + window)` and writes those from
    `first_new` on. The first window keeps a prompt of `prompt_frames`; each later one is prompted with the previous
    window's last `window - stride` frames. Empty when the prompt already covers `frames`."""
    plan, start, first_new = [], 0, prompt_frames
    while first_new < frames:
        plan.append((start, first_new))
        start += stride
        first_new = start + window - stride
    return plan


@functools.partial(jax.jit, static_argnums=0)
def _encode_text(config, params, input_ids, attention_mask):
    """`encode_text` jitted: T5 in float32, as in training (its docstring has the dtype rule)."""
    return encode_text(config, params, input_ids, attention_mask)


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

    def with_int8_weights(self) -> "MusicGen":
        """A copy whose LM matmul weights are stored as int8 (per-channel scales; `lm.weight_format='int8'`): about
        4x fewer bytes read per decoding step, the faster sampler on a CPU. Logits move by ~0.15 of their spread
        (bench/bench_sampling.py reports it); float32 stays the exact-parity path. Already int8: returned as is."""
        if self.config.lm.weight_format == "int8":
            return self
        lm_config = dataclasses.replace(self.config.lm, weight_format="int8")
        return MusicGen(dataclasses.replace(self.config, lm=lm_config),
                        dict(self.params, lm=quantize_lm_params(self.params["lm"])), self.tokenizer)

    def with_compute_dtype(self, dtype: str) -> "MusicGen":
        """A copy whose LM computes in `dtype` ('float32', 'bfloat16' or 'float16'; `lm.compute_dtype`). The
        half-precision dtypes are for GPUs and TPUs (half the activation, KV-cache and weight bytes): the LM's
        matmul weights are then stored in `dtype` (`weights_for_compute`: the values each matmul would cast them
        to, so the same logits), the rest of the params as they are. float32 is the exact-parity path and, on a
        CPU, the faster one (weights already cast stay at their rounded values)."""
        copy = self._with_lm_settings(compute_dtype=str(dtype))
        return MusicGen(copy.config, dict(copy.params, lm=weights_for_compute(copy.params["lm"], copy.config.lm)),
                        copy.tokenizer)

    def with_extend_stride(self, seconds: float) -> "MusicGen":
        """A copy whose generations past the model's window (`lm.max_duration`) advance by `seconds` per window
        (audiocraft's `extend_stride`, 18 s for the released models): smaller strides give each window more
        context and cost more windows. Must lie in (0, max_duration)."""
        return self._with_lm_settings(extend_stride=float(seconds))

    def _with_lm_settings(self, **changes) -> "MusicGen":
        """A copy with `changes` to `config.lm` (same params and tokenizer); a ValueError naming a bad setting."""
        try:
            lm_config = dataclasses.replace(self.config.lm, **changes)
            lm_config.validate()
        except ConfigError as err:
            raise ValueError(str(err)) from None
        return MusicGen(dataclasses.replace(self.config, lm=lm_config), self.params, self.tokenizer)

    @classmethod
    def load(cls, directory: str, mesh: Optional[jax.sharding.Mesh] = None) -> "MusicGen":
        """Loads a converted checkpoint (`python -m mgjax.convert`); refuses one whose params do not match its
        config, naming the first differing parameter. With a `mesh`, every parameter is read straight into its
        shards by the logical-axis rules of `sharding.py` (nothing is materialised whole on one device)."""
        meta = checkpoint.read_meta(directory)
        if meta["kind"] != "musicgen":
            raise checkpoint.CheckpointError(f"{directory} holds a {meta['kind']} checkpoint, not a MusicGen; "
                                             f"load it with mgjax.Codec.load")
        try:
            config = from_dict(checkpoint.read_config_dict(directory))
        except ConfigError as err:
            raise checkpoint.CheckpointError(f"{directory}/{checkpoint.CONFIG_FILE}: {err}") from None
        abstract = abstract_params(config, mesh)
        params = checkpoint.restore_params(directory, abstract, (lambda leaf: leaf.sharding) if mesh else None)
        tokenizer = None
        tokenizer_dir = os.path.join(directory, checkpoint.TOKENIZER_DIR)
        if os.path.isdir(tokenizer_dir):
            from mgjax.text.tokenizer import load_tokenizer
            tokenizer = load_tokenizer(tokenizer_dir)
        return cls(config, params, tokenizer)

    @classmethod
    def from_transformers(cls, src_dir: str) -> "MusicGen":
        """A transformers MusicGen(-melody) directory (`save_pretrained`, or a hub cache folder) converted in memory,
        nothing written: the same params `python -m mgjax.convert` would store (converting once and `load`ing the
        checkpoint is quicker for repeated use)."""
        from mgjax.convert import TOKENIZER_FILES, read_transformers_musicgen
        from mgjax.text.tokenizer import load_tokenizer

        config, params, directory = read_transformers_musicgen(src_dir)
        has_tokenizer = any(os.path.isfile(os.path.join(directory, name)) for name in TOKENIZER_FILES)
        tokenizer = load_tokenizer(directory) if has_tokenizer else None
        return cls(config, jax.tree.map(jnp.asarray, params), tokenizer)

    # --- properties ---------------------------------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return self.config.codec.sample_rate

    @property
    def frame_rate(self) -> float:
        return self.config.codec.frame_rate

    @property
    def channels(self) -> int:
        """Audio channels in and out: the codec's, or 2 for a stereo model (`lm.audio_channels=2`, mono codec)."""
        return 2 if self.config.lm.audio_channels == 2 else self.config.codec.channels

    # --- audio --------------------------------------------------------------------------------------------------
    def encode(self, wav) -> jax.Array:
        """float32 `[B, C, N]` at `sample_rate` -> int32 `[B, K, T]`. Stereo models: each channel coded on its own,
        the codebooks interleaved left/right, `[L0, R0, L1, R1, ...]` (as transformers and audiocraft do)."""
        if self.config.lm.audio_channels == 1:
            return self.codec.encode(wav)
        wav = jnp.asarray(wav)
        if wav.ndim != 3 or wav.shape[1] != 2:
            raise ValueError(f"this stereo model encodes [batch, 2, samples] audio, got shape {wav.shape}")
        return codes_from_batch(self.codec.encode(channels_to_batch(wav)), wav.shape[0])  # via [2B, K/2, T]

    def decode(self, codes) -> jax.Array:
        """int32 `[B, K, T]` -> float32 `[B, C, T * hop]`; stereo models: the even codebooks are the left channel,
        the odd ones the right."""
        if self.config.lm.audio_channels == 1:
            return self.codec.decode(codes)
        codes = jnp.asarray(codes)
        if codes.ndim != 3 or codes.shape[1] != self.config.lm.num_codebooks:
            raise ValueError(f"this stereo model decodes [batch, {self.config.lm.num_codebooks}, frames] codes, got "
                             f"shape {codes.shape}")
        return channels_from_batch(self.codec.decode(codes_to_batch(codes)), codes.shape[0])

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
                 attention_mask=None, melody=None, melody_sample_rate: Optional[int] = None, prompt_audio=None,
                 prompt_sample_rate: Optional[int] = None, top_k: int = 250, top_p: float = 0.0,
                 temperature: float = 1.0, cfg_coef: float = 3.0,
                 greedy: bool = False, seed: int = 0, progress: Optional[Callable[[int, int], None]] = None,
                 progress_every: int = 0) -> GenerationOutput:
        """Generates `duration` seconds for each prompt (strings, or `input_ids`/`attention_mask`).

        `melody` float32 `[B, C, N]` or `[B, N]` at `melody_sample_rate` (default `sample_rate`): chroma
        conditioning, melody models only. `prompt_audio` float32 `[B, C, N]` (or `[B, N]`) at `prompt_sample_rate`
        (default `sample_rate`; resampled and its channels matched as needed): continuation, its codes kept as the
        first frames of the output. Durations beyond the model's window (`lm.max_duration`) are generated window
        by window, each window prompted with the last `max_duration - extend_stride` seconds of the previous one.
        `progress(step, total)` is called on the host every `progress_every` decoding steps, counting over all
        windows: the steps then run in compiled calls of `progress_every` steps, `progress` between them (the same
        tokens). Every setting is checked first (`mgjax.validation.generation_settings`, as `sample.py` checks its
        flags).
        """
        request = self._text_request(prompts, duration, input_ids=input_ids, attention_mask=attention_mask,
                                     melody=melody, melody_sample_rate=melody_sample_rate, prompt_audio=prompt_audio,
                                     prompt_sample_rate=prompt_sample_rate, top_k=top_k, top_p=top_p,
                                     temperature=temperature, cfg_coef=cfg_coef, greedy=greedy, seed=seed)
        return self._generate_from_text_states(**request, progress=progress, progress_every=progress_every)

    def generate_stream(self, prompts: Sequence[str] | None = None, duration: float = 10.0, *, chunk_steps: int = 0,
                        progress: Optional[Callable[[int, int], None]] = None, **options) -> Iterator[np.ndarray]:
        """`generate`, heard while it is made: yields float32 audio chunks `[B, C, n]` whose concatenation is
        `generate(...).wav` for the same arguments (`options`: `generate`'s keywords; checked before this returns).

        The LM runs `chunk_steps` pattern steps per compiled call (default: half a second of frames) on a thread of
        its own; after each call the frames whose K codes are all sampled are decoded incrementally on the
        caller's thread (`mgjax.streaming`, one compiled decoder program for every chunk), the codec's right
        context (`lookahead_frames`) held back until known. `progress(step, total)` after each call."""
        request = self._text_request(prompts, duration, **options)
        steps = chunk_steps if chunk_steps > 0 else max(1, int(round(self.frame_rate / 2)))
        return stream_generation(self, **request, chunk_steps=steps, progress=progress)

    def _text_request(self, prompts, duration, *, input_ids=None, attention_mask=None, melody=None,
                      melody_sample_rate: Optional[int] = None, prompt_audio=None,
                      prompt_sample_rate: Optional[int] = None, top_k: int = 250, top_p: float = 0.0,
                      temperature: float = 1.0, cfg_coef: float = 3.0, greedy: bool = False, seed: int = 0) -> dict:
        """`generate`'s arguments checked and turned into `_generate_from_text_states`'s: T5 states, settings."""
        settings = self._checked_settings(prompt_audio, prompt_sample_rate, duration=duration, top_k=top_k, top_p=top_p,
                                          temperature=temperature, cfg_coef=cfg_coef, seed=seed, greedy=greedy)
        melody_sample_rate = sample_rate("melody_sample_rate", melody_sample_rate, self.sample_rate)
        if prompts is None and input_ids is None:
            raise InvalidInput("prompts is None: give a list of text descriptions (or input_ids=[B, L]); for clips "
                               "without a description use generate_unconditional")
        ids, mask = self.tokenize(prompts, input_ids, attention_mask)
        seed = settings.pop("seed")
        duration = settings.pop("duration")
        sampling = SamplingConfig(**settings).validate()
        melody = self._check_melody(melody, ids.shape[0])
        return dict(cond=self.encode_text(ids, mask), mask=mask, duration=duration, sampling=sampling, seed=seed,
                    melody=melody, melody_sample_rate=melody_sample_rate, prompt_audio=prompt_audio,
                    prompt_sample_rate=prompt_sample_rate)

    def generate_unconditional(self, num_samples: int = 1, duration: float = 10.0, *, prompt_audio=None,
                               prompt_sample_rate: Optional[int] = None, top_k: int = 250, top_p: float = 0.0,
                               temperature: float = 1.0, greedy: bool = False,
                               seed: int = 0, progress: Optional[Callable[[int, int], None]] = None,
                               progress_every: int = 0) -> GenerationOutput:
        """`num_samples` clips of `duration` seconds with no description: the null condition (T5 states zero, mask
        zero; the null melody for melody models), as transformers' `get_unconditional_inputs` and audiocraft's
        `generate_unconditional` build it. Both halves of classifier-free guidance would see that same condition,
        so it is skipped (same tokens, half the work). `prompt_audio` `[num_samples, C, N]`: continue it."""
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        settings = self._checked_settings(prompt_audio, prompt_sample_rate, duration=duration, top_k=top_k, top_p=top_p,
                                          temperature=temperature, cfg_coef=1.0, seed=seed, greedy=greedy)
        seed = settings.pop("seed")
        duration = settings.pop("duration")
        sampling = SamplingConfig(**settings).validate()
        states = jnp.zeros((num_samples, 1, self.config.text.d_model), jnp.float32)
        mask = np.zeros((num_samples, 1), np.int32)
        return self._generate_from_text_states(states, mask, duration, sampling, seed, prompt_audio=prompt_audio,
                                               prompt_sample_rate=prompt_sample_rate, progress=progress,
                                               progress_every=progress_every)

    def _checked_settings(self, prompt_audio, prompt_sample_rate: Optional[int], **given) -> dict:
        """`generation_settings(**given)`, the audio prompt's samples and rate checked before any work (an
        `InvalidInput` naming a bad one), with a warning for a long generation."""
        sample_rate("prompt_sample_rate", prompt_sample_rate, self.sample_rate)
        if prompt_audio is not None:
            finite_audio("prompt_audio", prompt_audio)
        settings = generation_settings(**given)
        note = long_duration_note(settings["duration"], self.config.lm.extend_stride)
        if note:
            warnings.warn(note, stacklevel=3)
        return settings

    def _generate_from_text_states(self, cond, mask, duration: float, sampling: SamplingConfig, seed: int, *,
                                   melody=None, melody_sample_rate: Optional[int] = None, prompt_audio=None,
                                   prompt_sample_rate: Optional[int] = None, progress=None,
                                   progress_every: int = 0) -> GenerationOutput:
        """`generate` from T5 states `[B, L, D]` and their mask `[B, L]` on."""
        frames = self.frames_for(duration)
        prompt_codes = self._prompt_codes(prompt_audio, prompt_sample_rate, cond.shape[0], frames)
        every = progress_every if progress is not None else 0
        codes, _ = self.generate_windows(cond, mask, prompt_codes, frames, sampling, jax.random.key(seed),
                                         melody=melody, melody_sample_rate=melody_sample_rate or self.sample_rate,
                                         progress_every=every, progress=progress)
        wav = self.decode(codes)
        return GenerationOutput(wav=np.asarray(wav), codes=np.asarray(codes))

    def window_frames(self) -> tuple[int, int]:
        """`(frames per window, frames a window advances)` from `lm.max_duration` and `lm.extend_stride`."""
        return (int(self.config.lm.max_duration * self.frame_rate),
                int(self.config.lm.extend_stride * self.frame_rate))

    def generate_windows(self, cond, mask, prompt_codes, frames: int, sampling: SamplingConfig, key, *,
                         melody=None, melody_sample_rate: int = 32000, progress_every: int = 0,
                         progress: Optional[Callable[[int, int], None]] = None):
        """`[B, K, frames]` codes, and the codes of each window (`[B, K, W]`), generated window by window.
        `progress(step, total)`: called every `progress_every` steps, the steps of all windows counted as one run.

        As audiocraft: window i starts `i * stride` frames in; its first `W - stride` frames are the previous
        window's tail, kept as an audio prompt; the first window keeps the user's prompt. Every window has the
        same length W (the last one is cut after generation, which a causal model allows), so at most two programs
        compile: the first window and the prompted ones.
        """
        pieces, windows = [prompt_codes], []
        every = progress_every if progress is not None else 0
        for chunk in self.iter_windows(cond, mask, prompt_codes, frames, sampling, key, melody=melody,
                                       melody_sample_rate=melody_sample_rate, steps_per_call=every):
            if every:
                progress(chunk.steps_before + chunk.done, chunk.steps_all)
            if chunk.done == chunk.total:
                windows.append(chunk.codes)
                pieces.append(chunk.codes[:, :, chunk.prompt_frames:])
        return np.concatenate(pieces, axis=-1)[:, :, :frames], windows

    def iter_windows(self, cond, mask, prompt_codes, frames: int, sampling: SamplingConfig, key, *, melody=None,
                     melody_sample_rate: int = 32000, steps_per_call: int = 0) -> Iterator["WindowChunk"]:
        """The window walk of `generate_windows`, one `WindowChunk` per compiled call: each window whole (one
        program) with `steps_per_call` 0, else after every `steps_per_call` steps (`sampling.generate_in_chunks`)."""
        window, stride = self.window_frames()
        window = min(window, frames)
        # Decided once: a flip between windows (available memory changing) would recompile the window program.
        split_layers = split_layers_by_default(self.params["lm"], self.config.lm.kernels)
        prompt = prompt_codes
        plan = window_plan(frames, window, stride, prompt_codes.shape[-1])
        totals = [steps_to_sample(self.config.lm, window, prompt_codes.shape[-1] if i == 0 else window - stride)
                  for i in range(len(plan))]
        for index, (start, _) in enumerate(plan):
            chroma = None
            if takes_melody(self.config.lm):
                chroma = self._window_chroma(melody, melody_sample_rate, cond.shape[0], start / self.frame_rate)
            arguments = (self.params["lm"], cond, jnp.asarray(mask), jax.random.fold_in(key, start), prompt)
            options = dict(lm_config=self.config.lm, frames=window, sampling=sampling, chroma=chroma,
                           split_layers=split_layers)
            calls = (generate_in_chunks(*arguments, steps_per_call=steps_per_call, **options) if steps_per_call > 0
                     else [(totals[index], totals[index], generate_codes(*arguments, **options))])
            for done, total, codes in calls:
                codes = np.asarray(jax.block_until_ready(codes))
                yield WindowChunk(start, prompt.shape[-1], done, total, sum(totals[:index]), sum(totals), codes)
            prompt = codes[:, :, stride:]

    def _check_melody(self, melody, batch: int):
        if melody is None:
            return None
        if not takes_melody(self.config.lm):
            raise ValueError("melody conditioning needs a MusicGen-melody checkpoint; this model conditions on text "
                             "only (lm.conditioning='cross')")
        melody = finite_audio("melody", melody)
        if melody.ndim == 2:
            melody = melody[:, None]
        if melody.ndim != 3 or melody.shape[0] != batch or melody.shape[-1] == 0:
            raise ValueError(f"melody must be [batch={batch}, channels, samples] with samples > 0, got shape "
                             f"{melody.shape}")
        return melody

    def _window_chroma(self, melody, melody_sample_rate: int, batch: int, start_seconds: float):
        """Chroma `[B, chroma_length, 12]` for a window starting at `start_seconds`: the melody read cyclically from
        that time on (audiocraft's re-indexing across windows), or the null melody."""
        from mgjax.conditioning.chroma import match_frames, null_chroma, prepare_melody

        length = self.config.lm.chroma_length
        if melody is None:
            return null_chroma(batch, length, self.config.lm.num_chroma)
        samples = melody.shape[-1]
        start = int(round(start_seconds * melody_sample_rate))
        window_samples = min(samples, int(self.config.lm.max_duration * melody_sample_rate))
        positions = (start + np.arange(window_samples)) % samples
        return match_frames(prepare_melody(melody[..., positions], melody_sample_rate), length)

    def _prompt_codes(self, prompt_audio, prompt_sample_rate: Optional[int], batch: int, frames: int) -> np.ndarray:
        """Codes `[B, K, Tp]` of the audio prompt `[B, C, N]` (or mono `[B, N]`) at `prompt_sample_rate`, mixed
        down or duplicated to the model's channels (`channels`) and resampled first, as audiocraft's
        `generate_continuation`."""
        if prompt_audio is None:
            return np.zeros((batch, self.config.lm.num_codebooks, 0), np.int32)
        audio = finite_audio("prompt_audio", prompt_audio)
        if audio.ndim == 2:
            audio = audio[:, None]
        if audio.ndim != 3 or audio.shape[-1] == 0:
            raise ValueError(f"prompt_audio must be [batch, channels, samples] (or [batch, samples]) with samples > 0, "
                             f"got shape {np.shape(prompt_audio)}")
        if audio.shape[0] != batch:
            raise ValueError(f"prompt_audio has batch {audio.shape[0]} but there are {batch} prompts")
        rate = sample_rate("prompt_sample_rate", prompt_sample_rate, self.sample_rate)
        audio = conform(audio, rate, self.sample_rate, self.channels)
        prompt_codes = np.asarray(self.encode(audio))
        limit = min(frames, self.window_frames()[0])
        if prompt_codes.shape[-1] >= limit:
            raise ValueError(f"prompt_audio ({prompt_codes.shape[-1] / self.frame_rate:.2f} s) must be shorter than "
                             f"the requested duration and the model's window ({limit / self.frame_rate:.2f} s)")
        return prompt_codes
