"""SEANet encoder/decoder of EnCodec, channels-last (`[B, N, C]`).

Submodules are named `layers_{i}` after their index in the reference's layer list (transformers `encoder.layers.i`,
audiocraft `encoder.model.i`: the two lists agree index for index), so converters map keys without a lookup table.
ELU entries of that list hold no parameters and get no module. Weight norm is folded into plain kernels at conversion.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mgjax.config import CodecConfig

KERNEL_AXES = (None, "conv_in", "conv_out")


def _kernel_init():
    return nn.with_logical_partitioning(nn.initializers.lecun_normal(), KERNEL_AXES)


def _bias_init():
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",))


def pad1d(x_BxNxC: jax.Array, left: int, right: int, mode: str) -> jax.Array:
    """Pads the time axis. `reflect` on an input shorter than the pad first zero-extends it, as the reference does."""
    if left == 0 and right == 0:
        return x_BxNxC
    if mode != "reflect":
        return jnp.pad(x_BxNxC, ((0, 0), (left, right), (0, 0)))
    length = x_BxNxC.shape[1]
    max_pad = max(left, right)
    extra = max_pad - length + 1 if length <= max_pad else 0
    if extra:
        x_BxNxC = jnp.pad(x_BxNxC, ((0, 0), (0, extra), (0, 0)))
    padded = jnp.pad(x_BxNxC, ((0, 0), (left, right), (0, 0)), mode="reflect")
    return padded[:, : padded.shape[1] - extra]


def extra_padding_for_conv1d(length: int, kernel_size: int, stride: int, padding_total: int) -> int:
    """Right padding so that the last window is complete (no sample is dropped by the strided conv)."""
    n_frames = (length - kernel_size + padding_total) / stride + 1
    ideal_length = (math.ceil(n_frames) - 1) * stride + (kernel_size - padding_total)
    return ideal_length - length


class Conv1d(nn.Module):
    """Conv1d with the reference's asymmetric (or causal) padding, so that stride s maps N samples to ceil(N/s)."""

    features: int
    kernel_size: int
    config: CodecConfig
    stride: int = 1
    dilation: int = 1

    @nn.compact
    def __call__(self, x_BxNxC: jax.Array) -> jax.Array:
        kernel = self.param("kernel", _kernel_init(), (self.kernel_size, x_BxNxC.shape[-1], self.features))
        bias = self.param("bias", _bias_init(), (self.features,))
        effective_kernel = (self.kernel_size - 1) * self.dilation + 1
        padding_total = effective_kernel - self.stride
        extra = extra_padding_for_conv1d(x_BxNxC.shape[1], effective_kernel, self.stride, padding_total)
        if self.config.causal:
            left, right = padding_total, extra
        else:
            right = padding_total // 2
            left, right = padding_total - right, right + extra
        x_BxNxC = pad1d(x_BxNxC, left, right, self.config.pad_mode)
        y = jax.lax.conv_general_dilated(
            x_BxNxC, kernel.astype(x_BxNxC.dtype), window_strides=(self.stride,), padding="VALID",
            rhs_dilation=(self.dilation,), dimension_numbers=("NWC", "WIO", "NWC"))
        return y + bias.astype(y.dtype)


class ConvTranspose1d(nn.Module):
    """ConvTranspose1d (torch semantics) followed by the reference's fixed trimming, so T frames give T*stride samples.

    The kernel is stored as `[k, in, out]` already flipped in time, so the op is a plain convolution of the
    stride-dilated input.
    """

    features: int
    kernel_size: int
    stride: int
    config: CodecConfig

    @nn.compact
    def __call__(self, x_BxTxC: jax.Array) -> jax.Array:
        kernel = self.param("kernel", _kernel_init(), (self.kernel_size, x_BxTxC.shape[-1], self.features))
        bias = self.param("bias", _bias_init(), (self.features,))
        k = self.kernel_size
        y = conv_transpose_full(x_BxTxC, kernel.astype(x_BxTxC.dtype), self.stride)
        y = y + bias.astype(y.dtype)
        padding_total = k - self.stride
        if self.config.causal:
            right = math.ceil(padding_total * self.config.trim_right_ratio)
        else:
            right = padding_total // 2
        left = padding_total - right
        return y[:, left: y.shape[1] - right]


def conv_transpose_full(x_BxTxC: jax.Array, kernel_KxIxO: jax.Array, stride: int) -> jax.Array:
    """Untrimmed transposed conv, `[B, T, I] -> [B, (T-1)*stride + K, O]` (`kernel` stored flipped in time).

    When K is a multiple of the stride (EnCodec: K = 2 * stride) it is one matmul plus an overlap-add of K/stride
    shifted blocks, which avoids convolving the stride-dilated input (mostly zeros).
    """
    k = kernel_KxIxO.shape[0]
    if k % stride:
        return jax.lax.conv_general_dilated(
            x_BxTxC, kernel_KxIxO, window_strides=(1,), padding=[(k - 1, k - 1)], lhs_dilation=(stride,),
            dimension_numbers=("NWC", "WIO", "NWC"))
    batch, frames, _ = x_BxTxC.shape
    overlap = k // stride
    taps_BxTxKxO = jnp.einsum("btc,kco->btko", x_BxTxC, kernel_KxIxO[::-1])
    taps_BxTxMxSxO = taps_BxTxKxO.reshape(batch, frames, overlap, stride, -1)
    out = sum(jnp.pad(taps_BxTxMxSxO[:, :, i], ((0, 0), (i, overlap - 1 - i), (0, 0), (0, 0)))
              for i in range(overlap))
    return out.reshape(batch, (frames + overlap - 1) * stride, -1)


class LSTM(nn.Module):
    """Stacked LSTM over time with a skip connection around the whole stack (torch gate order i, f, g, o)."""

    num_layers: int

    @nn.compact
    def __call__(self, x_BxNxC: jax.Array) -> jax.Array:
        hidden = x_BxNxC.shape[-1]
        init = nn.initializers.lecun_normal()
        h_BxNxC = x_BxNxC
        for layer in range(self.num_layers):
            w_ih = self.param(f"w_ih_{layer}", nn.with_logical_partitioning(init, ("conv_in", "conv_out")),
                              (hidden, 4 * hidden))
            w_hh = self.param(f"w_hh_{layer}", nn.with_logical_partitioning(init, ("conv_in", "conv_out")),
                              (hidden, 4 * hidden))
            bias = self.param(f"bias_{layer}", _bias_init(), (4 * hidden,))
            h_BxNxC = lstm_layer(h_BxNxC, w_ih, w_hh, bias)
        return h_BxNxC + x_BxNxC


def lstm_layer(x_BxNxC: jax.Array, w_ih: jax.Array, w_hh: jax.Array, bias: jax.Array) -> jax.Array:
    """One LSTM layer from a zero state (see `lstm_layer_from`)."""
    batch, _, hidden = x_BxNxC.shape
    zeros = jnp.zeros((batch, hidden), x_BxNxC.dtype)
    return lstm_layer_from(x_BxNxC, w_ih, w_hh, bias, (zeros, zeros))[0]


def lstm_layer_from(x_BxNxC: jax.Array, w_ih: jax.Array, w_hh: jax.Array, bias: jax.Array,
                    state: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """One LSTM layer from `state` = (h, c) `[B, H]` each: the input projection for all steps at once, then a
    `lax.scan` over time for the recurrence. Returns the outputs `[B, N, H]` and the state after the last step,
    so a sequence fed in pieces gives the outputs of feeding it whole."""
    gates_in_NxBx4H = jnp.einsum("bnc,cg->nbg", x_BxNxC, w_ih.astype(x_BxNxC.dtype)) + bias.astype(x_BxNxC.dtype)
    w_hh = w_hh.astype(x_BxNxC.dtype)

    def step(carry, gates_in_Bx4H):
        h, c = carry
        gates = gates_in_Bx4H + h @ w_hh
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    state, h_NxBxH = jax.lax.scan(step, state, gates_in_NxBx4H)
    return jnp.transpose(h_NxBxH, (1, 0, 2)), state


class ResnetBlock(nn.Module):
    """ELU -> conv(k, dilation) -> ELU -> conv(1), plus identity or 1x1-conv shortcut. Params: block_1, block_3."""

    dilation: int
    config: CodecConfig

    @nn.compact
    def __call__(self, x_BxNxC: jax.Array) -> jax.Array:
        dim = x_BxNxC.shape[-1]
        hidden = dim // self.config.compress
        h = Conv1d(hidden, self.config.residual_kernel_size, self.config, dilation=self.dilation,
                   name="block_1")(nn.elu(x_BxNxC))
        h = Conv1d(dim, 1, self.config, name="block_3")(nn.elu(h))
        shortcut = x_BxNxC if self.config.true_skip else Conv1d(dim, 1, self.config, name="shortcut")(x_BxNxC)
        return shortcut + h


def encoder_plan(cfg: CodecConfig) -> list[tuple[int, str, dict]]:
    """The encoder's parametrised layers as `(index in the reference list, kind, kwargs)`; ELUs only take an index.

    kinds: 'conv' (Conv1d), 'convtr' (ConvTranspose1d), 'res' (ResnetBlock), 'lstm'. A conv/convtr/lstm preceded by
    an ELU in the reference has `elu=True`.
    """
    plan = [(0, "conv", dict(features=cfg.n_filters, kernel_size=cfg.kernel_size))]
    scale = 1
    for ratio in reversed(cfg.ratios):
        width = scale * cfg.n_filters
        for j in range(cfg.n_residual_layers):
            plan.append((plan[-1][0] + 1, "res", dict(dilation=cfg.dilation_base ** j)))
        plan.append((plan[-1][0] + 2, "conv", dict(features=width * 2, kernel_size=ratio * 2, stride=ratio, elu=True)))
        scale *= 2
    if cfg.lstm_layers:
        plan.append((plan[-1][0] + 1, "lstm", dict(num_layers=cfg.lstm_layers)))
    plan.append((plan[-1][0] + 2, "conv", dict(features=cfg.dimension, kernel_size=cfg.last_kernel_size, elu=True)))
    return plan


def decoder_plan(cfg: CodecConfig) -> list[tuple[int, str, dict]]:
    """The decoder's parametrised layers, as `encoder_plan`."""
    scale = 2 ** len(cfg.ratios)
    plan = [(0, "conv", dict(features=scale * cfg.n_filters, kernel_size=cfg.kernel_size))]
    if cfg.lstm_layers:
        plan.append((1, "lstm", dict(num_layers=cfg.lstm_layers)))
    for ratio in cfg.ratios:
        width = scale * cfg.n_filters
        plan.append((plan[-1][0] + 2, "convtr", dict(features=width // 2, kernel_size=ratio * 2, stride=ratio,
                                                      elu=True)))
        for j in range(cfg.n_residual_layers):
            plan.append((plan[-1][0] + 1, "res", dict(dilation=cfg.dilation_base ** j)))
        scale //= 2
    plan.append((plan[-1][0] + 2, "conv", dict(features=cfg.channels, kernel_size=cfg.last_kernel_size, elu=True)))
    return plan


def _run_plan(plan: list[tuple[int, str, dict]], cfg: CodecConfig, x: jax.Array) -> jax.Array:
    for index, kind, kwargs in plan:
        kwargs = dict(kwargs)
        if kwargs.pop("elu", False):
            x = nn.elu(x)
        name = f"layers_{index}"
        if kind == "conv":
            x = Conv1d(config=cfg, name=name, **kwargs)(x)
        elif kind == "convtr":
            x = ConvTranspose1d(config=cfg, name=name, **kwargs)(x)
        elif kind == "res":
            x = ResnetBlock(config=cfg, name=name, **kwargs)(x)
        else:
            x = LSTM(name=name, **kwargs)(x)
    return x


class SEANetEncoder(nn.Module):
    """`[B, N, C]` audio -> `[B, T, dimension]` latents with T = ceil(N / hop)."""

    config: CodecConfig

    @nn.compact
    def __call__(self, x_BxNxC: jax.Array) -> jax.Array:
        return _run_plan(encoder_plan(self.config), self.config, x_BxNxC)


class SEANetDecoder(nn.Module):
    """`[B, T, dimension]` latents -> `[B, T * hop, C]` audio."""

    config: CodecConfig

    @nn.compact
    def __call__(self, z_BxTxD: jax.Array) -> jax.Array:
        return _run_plan(decoder_plan(self.config), self.config, z_BxTxD)
