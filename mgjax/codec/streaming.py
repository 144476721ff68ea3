"""Incremental EnCodec decoding: codes arriving a few frames at a time -> audio whose concatenation is the offline
`Codec.decode` of all the codes.

Every decoder layer runs as a stateful stream (`stream_layers`): a stride-1 convolution keeps the last
`left + right` inputs it has seen (its history, initialised with the left padding the offline decode applies at the
true start), and on new inputs convolves history + inputs, so each output sees exactly the inputs it sees offline and
nothing is computed twice; a non-causal convolution lags `right` samples behind its input. A transposed convolution
keeps the partial sums its last input left in the next `kernel - stride` samples (the overlap-add tail); the LSTM
keeps `(h, c)`. At the true end each layer appends the right padding the offline decode applies (`final`).

Every call runs one compiled program (`_decode_step`, one per codec, batch and `chunk_frames`) on a chunk of
`chunk_frames` frame slots, of which a traced `count` are valid; whether the call is the stream's first (histories
start as the left padding, outputs before the true start are dropped) or last (right padding appended) is traced
too, so pushes of any size share that one program and nothing is compiled after the first audio. The layers' lags
add up to `lag_samples`; audio is handed out in whole frames, so a frame's audio waits for
`lookahead_frames = ceil(lag / hop)` further frames (the decoder's receptive field to the right: no exact stream
can emit it sooner).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mgjax.codec.encodec import Codec, EncodecModel
from mgjax.codec.seanet import conv_transpose_full, decoder_plan
from mgjax.config import CodecConfig


class StreamLayer(NamedTuple):
    """One decoder layer as a stream. `kind`: conv | res | convtr | lstm. conv/res: `left`/`right` padding (the
    history holds `left + right` inputs; the output lags `right` samples). convtr: `left` samples trimmed off the
    start of the full output (the lag), `right` off the end; the tail holds `kernel - stride` samples."""

    index: int
    kind: str
    elu: bool = False
    kernel: int = 1
    stride: int = 1
    dilation: int = 1
    left: int = 0
    right: int = 0
    lstm_layers: int = 0

    @property
    def lag(self) -> int:
        """Samples (at this layer's output rate) by which its output trails its input."""
        return 0 if self.kind == "lstm" else (self.left if self.kind == "convtr" else self.right)


def _conv_padding(cfg: CodecConfig, effective_kernel: int) -> tuple[int, int]:
    """`(left, right)` padding of a stride-1 `Conv1d` with this effective kernel, as `seanet.Conv1d` pads."""
    total = effective_kernel - 1
    left = total if cfg.causal else total - total // 2
    return left, total - left


def _transposed_trim(cfg: CodecConfig, kernel: int, stride: int) -> tuple[int, int]:
    """`(left, right)` samples `seanet.ConvTranspose1d` cuts off its full output."""
    total = kernel - stride
    right = math.ceil(total * cfg.trim_right_ratio) if cfg.causal else total // 2
    return total - right, right


@functools.lru_cache(maxsize=None)
def stream_layers(cfg: CodecConfig) -> tuple[StreamLayer, ...]:
    """`decoder_plan(cfg)` with each layer's streaming geometry."""
    layers = []
    for index, kind, kwargs in decoder_plan(cfg):
        elu = kwargs.get("elu", False)
        if kind == "conv":
            if kwargs.get("stride", 1) != 1:
                raise ValueError("a strided convolution in the decoder cannot be streamed")
            dilation = kwargs.get("dilation", 1)
            left, right = _conv_padding(cfg, (kwargs["kernel_size"] - 1) * dilation + 1)
            layers.append(StreamLayer(index, kind, elu, kwargs["kernel_size"], 1, dilation, left, right))
        elif kind == "res":
            dilation = kwargs["dilation"]
            left, right = _conv_padding(cfg, (cfg.residual_kernel_size - 1) * dilation + 1)
            layers.append(StreamLayer(index, kind, elu, cfg.residual_kernel_size, 1, dilation, left, right))
        elif kind == "convtr":
            left, right = _transposed_trim(cfg, kwargs["kernel_size"], kwargs["stride"])
            layers.append(StreamLayer(index, kind, elu, kwargs["kernel_size"], kwargs["stride"], 1, left, right))
        else:
            layers.append(StreamLayer(index, kind, elu, lstm_layers=kwargs["num_layers"]))
    return tuple(layers)


def lag_samples(cfg: CodecConfig) -> int:
    """Output samples by which the streamed audio trails the frames pushed (each layer's lag, upsampled by the
    transposed convolutions after it)."""
    lag = 0
    for layer in stream_layers(cfg):
        lag = lag * layer.stride + layer.lag
    return lag


def count_after(layer: StreamLayer, count, start, final):
    """Valid outputs of `layer` for `count` valid inputs (ints, or traced inside the program): the first call
    drops the lag's outputs (they would precede the true start), the last adds them (the right padding's)."""
    return count * layer.stride - layer.lag * start + layer.lag * final


def min_start_frames(cfg: CodecConfig) -> int:
    """Fewest frames the first call needs: every layer must get at least as many inputs as it lags, and with
    reflect padding more than it pads on either side (the reflection reads them, and the offline decode's
    zero-extension of shorter inputs never happens)."""
    reflect = cfg.pad_mode == "reflect"
    for frames in range(1, 10_000):
        count, enough = frames, True
        for layer in stream_layers(cfg):
            if layer.kind in ("conv", "res") and reflect and count < max(layer.left, layer.right) + 1:
                enough = False
            count = count_after(layer, count, start=True, final=False)
            enough = enough and count >= 0
        if enough:
            return frames
    raise ValueError("no first chunk can start this decoder")


def _valid(x_BxSxC: jax.Array, count) -> jax.Array:
    """Zeros in the slots past `count`."""
    return jnp.where(jnp.arange(x_BxSxC.shape[1])[None, :, None] < count, x_BxSxC, 0)


def _conv(x_BxNxC: jax.Array, kernel, bias, dilation: int = 1) -> jax.Array:
    """Unpadded stride-1 convolution (the op `seanet.Conv1d` runs after padding)."""
    y = jax.lax.conv_general_dilated(x_BxNxC, kernel.astype(x_BxNxC.dtype), window_strides=(1,), padding="VALID",
                                     rhs_dilation=(dilation,), dimension_numbers=("NWC", "WIO", "NWC"))
    return y + bias.astype(y.dtype)


def _padded_history(layer: StreamLayer, cfg: CodecConfig, x_BxSxC, count, history, start, final):
    """`(buffer, next history)`: what the offline decode's padded input holds around this chunk, `[B, L + R + S +
    R, C]` for left/right padding L/R: later calls put the history (the last L + R inputs) then the inputs; the
    first puts the left padding then the inputs (offset L, so its outputs start at the true start); the last puts
    the right padding after the last valid input."""
    batch, slots, channels = x_BxSxC.shape
    left, right = layer.left, layer.right
    zeros = functools.partial(jnp.zeros, dtype=x_BxSxC.dtype)
    if cfg.pad_mode == "reflect":
        pad = x_BxSxC[:, 1: left + 1][:, ::-1]
    else:
        pad = zeros((batch, left, channels))
        x_BxSxC = _valid(x_BxSxC, count)  # the slots after the last input are the right padding's zeros
    head = jnp.where(start, jnp.concatenate([pad, zeros((batch, right, channels))], axis=1), history)
    offset = jnp.where(start, left, left + right)  # buffer index of the chunk's first input
    buffer = jnp.concatenate([head, zeros((batch, slots + right, channels))], axis=1)
    buffer = jax.lax.dynamic_update_slice_in_dim(buffer, x_BxSxC, offset, axis=1)
    end = offset + count  # buffer index just past the last valid input
    if right and cfg.pad_mode == "reflect":
        mirrored = jnp.take(buffer, end - 2 - jnp.arange(right), axis=1, mode="clip")
        after = jnp.where(final, mirrored, jax.lax.dynamic_slice_in_dim(buffer, end, right, axis=1))
        buffer = jax.lax.dynamic_update_slice_in_dim(buffer, after, end, axis=1)
    return buffer, jax.lax.dynamic_slice_in_dim(buffer, end - left - right, left + right, axis=1)


def _lstm_masked(x_BxSxD, lstm_params, states, count, num_layers: int):
    """The decoder's LSTM (with its skip) over the first `count` slots from `states`; the state after the last
    valid slot. The cell is `seanet.lstm_layer_from`'s, step for step."""
    valid_S = jnp.arange(x_BxSxD.shape[1]) < count
    h_seq, after = x_BxSxD, []
    for layer in range(num_layers):
        w_ih, w_hh = lstm_params[f"w_ih_{layer}"], lstm_params[f"w_hh_{layer}"].astype(x_BxSxD.dtype)
        gates_in_SxBx4H = (jnp.einsum("bnc,cg->nbg", h_seq, w_ih.astype(x_BxSxD.dtype))
                           + lstm_params[f"bias_{layer}"].astype(x_BxSxD.dtype))

        def step(carry, inputs, w_hh=w_hh):
            gates_in, valid = inputs
            h, c = carry
            gates = gates_in + h @ w_hh
            i, f, g, o = jnp.split(gates, 4, axis=-1)
            c_new = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h_new = jax.nn.sigmoid(o) * jnp.tanh(c_new)
            return (jnp.where(valid, h_new, h), jnp.where(valid, c_new, c)), h_new

        state, h_SxBxH = jax.lax.scan(step, states[layer], (gates_in_SxBx4H, valid_S))
        h_seq = jnp.transpose(h_SxBxH, (1, 0, 2))
        after.append(state)
    return h_seq + x_BxSxD, tuple(after)


def _layer_step(layer: StreamLayer, cfg: CodecConfig, params, x, count, state, start, final):
    """One layer on a chunk `x [B, S, C]` (`count` slots valid) from its `state` (`initial_state`'s at the start):
    `(outputs [B, S', C'], state after)`; the valid outputs are the first `count_after(...)` slots."""
    if layer.kind == "lstm":  # the initial state is zeros, the LSTM's own
        return _lstm_masked(x, params, state, count, layer.lstm_layers)
    if layer.kind == "convtr":
        x = _valid(x, count)
        y = conv_transpose_full(jax.nn.elu(x) if layer.elu else x, params["kernel"].astype(x.dtype), layer.stride)
        overlap = layer.kernel - layer.stride
        y = jnp.concatenate([y[:, :overlap] + state, y[:, overlap:]], axis=1)  # the initial tail is zeros
        tail = jax.lax.dynamic_slice_in_dim(y, count * layer.stride, overlap, axis=1)
        y = y + params["bias"].astype(y.dtype)
        if layer.left:  # the first call drops the samples the offline decode trims off the start
            y = jnp.concatenate([y, jnp.zeros((y.shape[0], layer.left, y.shape[2]), y.dtype)], axis=1)
            y = jax.lax.dynamic_slice_in_dim(y, jnp.where(start, layer.left, 0), y.shape[1] - layer.left, axis=1)
        return y, tail
    buffer, history = _padded_history(layer, cfg, x, count, state, start, final)
    if layer.kind == "conv":
        y = _conv(jax.nn.elu(buffer) if layer.elu else buffer, params["kernel"], params["bias"], layer.dilation)
    else:  # residual block: shortcut + conv1x1(elu(conv_k(elu(x))))
        h = _conv(jax.nn.elu(buffer), params["block_1"]["kernel"], params["block_1"]["bias"], layer.dilation)
        h = _conv(jax.nn.elu(h), params["block_3"]["kernel"], params["block_3"]["bias"])
        shortcut = buffer[:, layer.left: layer.left + h.shape[1]]
        if not cfg.true_skip:
            shortcut = _conv(shortcut, params["shortcut"]["kernel"], params["shortcut"]["bias"])
        y = shortcut + h
    return y, history


def initial_state(params, *, cfg: CodecConfig, batch: int) -> tuple:
    """Zeros shaped as each layer's state: conv/res history `[B, L + R, C_in]` (replaced by the left padding on the
    first call), transposed-conv tail `[B, kernel - stride, C_out]`, LSTM `(h, c)` `[B, D]` per LSTM layer."""
    state = []
    for layer in stream_layers(cfg):
        p = params["decoder"][f"layers_{layer.index}"]
        if layer.kind == "lstm":
            zeros = jnp.zeros((batch, p["w_hh_0"].shape[0]), jnp.float32)
            state.append(tuple((zeros, zeros) for _ in range(layer.lstm_layers)))
        elif layer.kind == "convtr":
            state.append(jnp.zeros((batch, layer.kernel - layer.stride, p["kernel"].shape[2]), jnp.float32))
        else:
            channels = (p["kernel"] if layer.kind == "conv" else p["block_1"]["kernel"]).shape[1]
            state.append(jnp.zeros((batch, layer.left + layer.right, channels), jnp.float32))
    return tuple(state)


@functools.partial(jax.jit, static_argnames="cfg")
def _decode_step(params, state, codes_BxKxS: jax.Array, count: jax.Array, start: jax.Array, final: jax.Array, *,
                 cfg: CodecConfig):
    """Codes `[B, K, S]` (the first `count` valid) through every decoder layer from `state`; `start`/`final`:
    whether this is the stream's first/last call. `(state after, audio [B, N, C] whose first count_after(...)
    samples are valid)`."""
    x = EncodecModel(cfg).apply({"params": params}, codes_BxKxS, method=lambda m, c: m.quantizer.decode(c))
    after = []
    for position, layer in enumerate(stream_layers(cfg)):
        x, layer_state = _layer_step(layer, cfg, params["decoder"][f"layers_{layer.index}"], x, count,
                                     state[position], start, final)
        after.append(layer_state)
        count = count_after(layer, count, start, final)
    return tuple(after), x


class StreamingDecoder:
    """Decodes codes `[B, K, T]` handed over in pieces (`push`), returning each piece's audio `[B, C, n]` as soon as
    the decoder's right context is known; `push(..., final=True)` flushes the rest. The pieces' audio concatenated
    is `codec.decode(all codes)` (float32 round-off: the same convolutions on spans of other lengths).

    `chunk_frames`: the frame slots of the one compiled program (a push of up to that many frames is one call,
    a longer one several). A stream shorter than `min_start` frames is decoded offline at the end."""

    def __init__(self, codec: Codec, batch: int, chunk_frames: int = 16):
        cfg = codec.config
        self.codec, self.config, self.batch = codec, cfg, batch
        self.min_start = min_start_frames(cfg)
        self.chunk_frames = max(int(chunk_frames), self.min_start)
        self.lag = lag_samples(cfg)
        self.pending = np.zeros((batch, cfg.n_q, 0), np.int32)      # codes pushed, not yet decoded
        self.state: Optional[tuple] = None                           # None: no call made yet
        self.audio = np.zeros((batch, cfg.channels, 0), np.float32)  # decoded samples not yet returned
        self.known = 0     # frames pushed
        self.returned = 0  # frames whose audio has been returned

    @property
    def lookahead_frames(self) -> int:
        """Frames that must follow a frame before its audio can be returned (the latency the exact stream costs)."""
        return -(-self.lag // self.config.hop_length)

    def _initial_state(self) -> tuple:
        """`initial_state`, placed as the program's outputs will be (committed to the params' device when they are),
        so that the second call reuses the first call's compiled program."""
        state = initial_state(self.codec.params, cfg=self.config, batch=self.batch)
        leaf = jax.tree.leaves(self.codec.params)[0]
        if not getattr(leaf, "committed", False):
            return state
        sharding = leaf.sharding
        if isinstance(sharding, jax.sharding.NamedSharding):  # params on a mesh: the state replicated over it
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        return jax.device_put(state, sharding)

    def compile(self) -> None:
        """Compiles the one program now (a stream does it while the LM compiles on its own thread), so that the
        first push only runs it; optional (the first push compiles it otherwise)."""
        slots = np.zeros((self.batch, self.config.n_q, self.chunk_frames), np.int32)
        _decode_step.lower(self.codec.params, self._initial_state(), slots, np.int32(0), np.bool_(True),
                           np.bool_(False), cfg=self.config).compile()

    def push(self, codes_BxKxT, final: bool = False) -> np.ndarray:
        """Appends codes `[B, K, t]` (t may be 0); returns the float32 audio `[B, C, n]` now complete (n a multiple
        of the hop; 0 while the lookahead is not yet known)."""
        codes = np.asarray(self.codec._check_codes(codes_BxKxT))
        self.pending = np.concatenate([self.pending, codes], axis=-1)
        self.known += codes.shape[-1]
        if self.state is None and self.pending.shape[-1] < self.min_start:
            if not final or self.known == 0:
                return np.zeros((self.batch, self.config.channels, 0), np.float32)
            wav = np.asarray(self.codec.decode(self.pending), np.float32)  # too short to start a stream
            self.pending, self.returned = self.pending[:, :, :0], self.known
            return wav
        pieces = []
        while True:
            frames = min(self.chunk_frames, self.pending.shape[-1])
            last = final and frames == self.pending.shape[-1]
            if frames == 0 and not last:
                break
            start = self.state is None
            if start:
                self.state = self._initial_state()
            slots = np.zeros((self.batch, self.config.n_q, self.chunk_frames), np.int32)
            slots[:, :, :frames] = self.pending[:, :, :frames]
            self.state, wav = _decode_step(self.codec.params, self.state, slots, np.int32(frames), np.bool_(start),
                                           np.bool_(last), cfg=self.config)
            valid = frames
            for layer in stream_layers(self.config):
                valid = count_after(layer, valid, start, last)
            pieces.append((wav, valid))
            self.pending = self.pending[:, :, frames:]
            if last:
                break
        if pieces:
            self.audio = np.concatenate(
                [self.audio] + [np.asarray(wav)[:, :valid].transpose(0, 2, 1) for wav, valid in pieces], axis=-1)
        frames_out = self.known if final else max(self.returned, self.known - self.lookahead_frames)
        take = (frames_out - self.returned) * self.config.hop_length
        wav, self.audio = self.audio[:, :, :take], self.audio[:, :, take:]
        self.returned = frames_out
        return np.ascontiguousarray(wav)
