"""Incremental EnCodec decoding: codes arriving a few frames at a time -> audio whose concatenation is the offline
`Codec.decode` of all the codes.

The decoder is cut where its one recurrent layer sits (`decoder_plan`): quantizer sum -> `pre` convolutions (frame
rate) -> LSTM -> `post` (transposed convolutions up to the sample rate, residual blocks, last conv). The LSTM is
causal: its state `(h, c)` per layer is carried from piece to piece. The convolutions are not (EnCodec 32 kHz is
non-causal): each piece is computed on a span widened by the convolutions' receptive field on both sides
(`context_frames`, exact integer bookkeeping of every layer's padding, kernel and stride) and the widened edges
are cut off, so every emitted sample saw exactly the inputs it sees offline. Only the true start and end of the
stream are padded as the offline decode pads them. The cost is latency: a frame's audio is emitted once
`right` further frames are known (`StreamingDecoder.lookahead_frames`).
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mgjax.codec.encodec import Codec, EncodecModel
from mgjax.codec.seanet import _run_plan, decoder_plan, lstm_layer_from
from mgjax.config import CodecConfig


def _conv_padding(cfg: CodecConfig, effective_kernel: int) -> int:
    """Left padding of a stride-1 `Conv1d` with this effective kernel (the rest of `kernel - 1` goes right)."""
    total = effective_kernel - 1
    return total if cfg.causal else total - total // 2


def _transposed_trim(cfg: CodecConfig, kernel: int, stride: int) -> int:
    """Samples `ConvTranspose1d` cuts off the left of its full output."""
    total = kernel - stride
    right = math.ceil(total * cfg.trim_right_ratio) if cfg.causal else total // 2
    return total - right


def needed_input(kind: str, kwargs: dict, cfg: CodecConfig, lo: int, hi: int) -> tuple[int, int]:
    """The input positions `[lo', hi']` (inclusive) that output positions `[lo, hi]` of one decoder layer read."""
    if kind in ("conv", "res"):
        kernel = kwargs["kernel_size"] if kind == "conv" else cfg.residual_kernel_size
        effective = (kernel - 1) * kwargs.get("dilation", 1) + 1
        left = _conv_padding(cfg, effective)
        return lo - left, hi - left + effective - 1
    if kind == "convtr":
        kernel, stride = kwargs["kernel_size"], kwargs["stride"]
        trim = _transposed_trim(cfg, kernel, stride)
        return -((kernel - 1 - lo - trim) // stride), (hi + trim) // stride
    raise ValueError(f"no receptive field for a '{kind}' layer (recurrent layers carry state instead)")


def context_frames(plan: list[tuple[int, str, dict]], cfg: CodecConfig) -> tuple[int, int]:
    """`(left, right)`: the frames before and after a frame that a stack of non-recurrent decoder layers reads to
    compute that frame's samples (walked back layer by layer from the last)."""
    upsampling = math.prod(kwargs["stride"] for _, kind, kwargs in plan if kind == "convtr")
    lo, hi = 0, upsampling - 1
    for _, kind, kwargs in reversed(plan):
        lo, hi = needed_input(kind, kwargs, cfg, lo, hi)
    return max(0, -lo), max(0, hi)


def split_decoder(cfg: CodecConfig) -> tuple[int, int]:
    """`(pre_stop, post_start)` indices into `decoder_plan`: `plan[:pre_stop]` runs before the LSTM,
    `plan[post_start:]` after it. Without an LSTM everything is `post`: (0, 0)."""
    kinds = [kind for _, kind, _ in decoder_plan(cfg)]
    if "lstm" not in kinds:
        return 0, 0
    position = kinds.index("lstm")
    return position, position + 1


class _DecoderSpan(nn.Module):
    """Layers `decoder_plan[start:stop]`, named as in `SEANetDecoder` (so its params apply): `[B, N, C]` in and out."""

    config: CodecConfig
    start: int
    stop: int

    @nn.compact
    def __call__(self, x_BxNxC: jax.Array) -> jax.Array:
        return _run_plan(decoder_plan(self.config)[self.start: self.stop], self.config, x_BxNxC)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _latents_through(cfg: CodecConfig, start: int, stop: int, params, codes_BxKxT: jax.Array) -> jax.Array:
    """Quantizer sum of codes `[B, K, T]`, then decoder layers `[start, stop)`: `[B, T, D']`."""
    latents = EncodecModel(cfg).apply({"params": params}, codes_BxKxT, method=lambda m, c: m.quantizer.decode(c))
    return _DecoderSpan(cfg, start, stop).apply({"params": params["decoder"]}, latents)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _span(cfg: CodecConfig, start: int, stop: int, params, x_BxNxC: jax.Array) -> jax.Array:
    """Decoder layers `[start, stop)` on `[B, N, C]`."""
    return _DecoderSpan(cfg, start, stop).apply({"params": params["decoder"]}, x_BxNxC)


@functools.partial(jax.jit, static_argnums=0)
def _lstm_from(num_layers: int, lstm_params, x_BxTxD: jax.Array, states):
    """The decoder's LSTM (with its skip connection) from per-layer `states`: `([B, T, D], states after)`."""
    h, after = x_BxTxD, []
    for layer in range(num_layers):
        h, state = lstm_layer_from(h, lstm_params[f"w_ih_{layer}"], lstm_params[f"w_hh_{layer}"],
                                   lstm_params[f"bias_{layer}"], states[layer])
        after.append(state)
    return h + x_BxTxD, tuple(after)


class StreamingDecoder:
    """Decodes codes `[B, K, T]` handed over in pieces (`push`), returning each piece's audio `[B, C, n]` as soon as
    the decoder's right context is known; `push(..., final=True)` flushes the rest. The pieces' audio concatenated
    is `codec.decode(all codes)` (float32 round-off: the same convolutions on spans of other lengths)."""

    def __init__(self, codec: Codec, batch: int):
        cfg = codec.config
        self.codec, self.config, self.batch = codec, cfg, batch
        self.pre_stop, self.post_start = split_decoder(cfg)
        plan = decoder_plan(cfg)
        self.pre_context = context_frames(plan[: self.pre_stop], cfg) if self.pre_stop else (0, 0)
        self.post_context = context_frames(plan[self.post_start:], cfg)
        self.codes = np.zeros((batch, cfg.n_q, 0), np.int32)   # every code pushed so far
        self.emitted = 0           # frames whose audio has been returned
        self.lstm_done = 0         # frames the LSTM has consumed
        self.lstm_out = None       # [B, F, D] LSTM outputs of frames [lstm_offset, lstm_done)
        self.lstm_offset = 0
        self.states = None
        if self.pre_stop:
            lstm = plan[self.pre_stop]
            self.lstm_params = codec.params["decoder"][f"layers_{lstm[0]}"]
            self.lstm_layers = lstm[2]["num_layers"]

    @property
    def lookahead_frames(self) -> int:
        """Frames that must follow a frame before its audio can be emitted (the latency the exact stream costs)."""
        return self.pre_context[1] + self.post_context[1]

    def push(self, codes_BxKxT, final: bool = False) -> np.ndarray:
        """Appends codes `[B, K, t]` (t may be 0); returns the float32 audio `[B, C, n]` now complete (n a multiple
        of the hop; 0 while the lookahead is not yet known)."""
        codes_BxKxT = self.codec._check_codes(codes_BxKxT)
        self.codes = np.concatenate([self.codes, np.asarray(codes_BxKxT)], axis=-1)
        known = self.codes.shape[-1]
        if self.pre_stop:
            ready = known if final else max(self.lstm_done, known - self.pre_context[1])
            self._advance_lstm(ready)
            post_source = ready
        else:
            post_source = known
        until = post_source if final else max(self.emitted, post_source - self.post_context[1])
        if until <= self.emitted:
            return np.zeros((self.batch, self.config.channels, 0), np.float32)
        wav = self._post(self.emitted, until, post_source)
        self.emitted = until
        return wav

    def _advance_lstm(self, ready: int) -> None:
        """Runs the `pre` layers and the LSTM over frames `[lstm_done, ready)`, keeping the outputs `post` needs."""
        if ready <= self.lstm_done:
            return
        left, right = self.pre_context
        lo, hi = max(0, self.lstm_done - left), min(self.codes.shape[-1], ready + right)
        x = _latents_through(self.config, 0, self.pre_stop, self.codec.params, jnp.asarray(self.codes[:, :, lo:hi]))
        x = x[:, self.lstm_done - lo: ready - lo]
        if self.states is None:
            zeros = jnp.zeros((self.batch, x.shape[-1]), x.dtype)
            self.states = tuple((zeros, zeros) for _ in range(self.lstm_layers))
        y, self.states = _lstm_from(self.lstm_layers, self.lstm_params, x, self.states)
        self.lstm_out = np.asarray(y) if self.lstm_out is None else np.concatenate([self.lstm_out, np.asarray(y)], 1)
        self.lstm_done = ready
        keep_from = max(0, self.emitted - self.post_context[0])  # older outputs are never read again
        self.lstm_out = self.lstm_out[:, keep_from - self.lstm_offset:]
        self.lstm_offset = keep_from

    def _post(self, start: int, stop: int, available: int) -> np.ndarray:
        """Audio `[B, C, (stop - start) * hop]` of frames `[start, stop)`, from the span widened by `post_context`
        within the `available` frames."""
        left, right = self.post_context
        lo, hi = max(0, start - left), min(available, stop + right)
        if self.pre_stop:
            source = jnp.asarray(self.lstm_out[:, lo - self.lstm_offset: hi - self.lstm_offset])
            wav_BxNxC = _span(self.config, self.post_start, len(decoder_plan(self.config)), self.codec.params, source)
        else:
            wav_BxNxC = _latents_through(self.config, 0, len(decoder_plan(self.config)), self.codec.params,
                                         jnp.asarray(self.codes[:, :, lo:hi]))
        hop = self.config.hop_length
        wav_BxNxC = wav_BxNxC[:, (start - lo) * hop: (stop - lo) * hop]
        return np.asarray(jnp.transpose(wav_BxNxC, (0, 2, 1)), np.float32)
