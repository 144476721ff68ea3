"""EnCodec parity against transformers' PyTorch `EncodecModel` with every weight randomised, converted by our converter.

Tolerances: encoder latents max abs error <= 1e-4; codes identical; decoded audio max abs error <= 1e-4 * peak.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch oracle needs torch (pip install -e .[test])")
transformers = pytest.importorskip("transformers")

import mgjax  # noqa: E402
from mgjax.codec.encodec import Codec  # noqa: E402

torch.set_num_threads(1)

# (name, transformers EncodecConfig kwargs, n_q, codebook_size)
CONFIGS = [
    ("32khz_layout_reflect", dict(sampling_rate=32000, upsampling_ratios=[8, 5, 4, 4], num_filters=4, hidden_size=16,
                                  num_lstm_layers=2, use_causal_conv=False, pad_mode="reflect",
                                  use_conv_shortcut=False), 4, 64),
    ("other_ratios_constant_causal", dict(sampling_rate=8000, upsampling_ratios=[4, 2], num_filters=6, hidden_size=12,
                                          num_lstm_layers=1, num_residual_layers=2, use_causal_conv=True,
                                          pad_mode="constant", use_conv_shortcut=True, residual_kernel_size=5,
                                          kernel_size=5, last_kernel_size=3, dilation_growth_rate=3), 3, 32),
    ("odd_ratios_stereo_deep_lstm", dict(sampling_rate=12000, upsampling_ratios=[5, 3, 2], num_filters=4,
                                         hidden_size=10, num_lstm_layers=3, use_causal_conv=False,
                                         pad_mode="constant", use_conv_shortcut=False, audio_channels=2,
                                         compress=4), 2, 16),
]


def build_oracle(kwargs: dict, n_q: int, card: int, seed: int):
    """A transformers EncodecModel with every parameter and buffer randomised (zero codebooks and unit norms hide
    conversion bugs) and `target_bandwidths` chosen so that it really uses `n_q` codebooks."""
    hop = math.prod(kwargs["upsampling_ratios"])
    frame_rate = math.ceil(kwargs["sampling_rate"] / hop)
    bandwidth = n_q * frame_rate * math.log2(card) / 1000
    config = transformers.EncodecConfig(codebook_size=card, target_bandwidths=[bandwidth], **kwargs)
    assert config.num_quantizers == n_q
    torch.manual_seed(seed)
    model = transformers.EncodecModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("original0"):  # weight-norm gains: positive, away from the unit-norm default
                param.copy_(torch.rand_like(param) * 1.0 + 0.5)
            else:
                param.copy_(torch.randn_like(param) * 0.3)
        probe = torch.randn(2, kwargs.get("audio_channels", 1), hop * 8)
        scale = model.encoder(probe).std().item()
        for layer in model.quantizer.layers:
            layer.codebook.embed.copy_(torch.randn_like(layer.codebook.embed) * scale)
    return model


@pytest.fixture(scope="module", params=CONFIGS, ids=[c[0] for c in CONFIGS])
def converted(request, tmp_path_factory):
    name, kwargs, n_q, card = request.param
    model = build_oracle(kwargs, n_q, card, seed=len(name))
    src = tmp_path_factory.mktemp(f"hf_{name}")
    model.save_pretrained(src)
    dst = tmp_path_factory.mktemp(f"mg_{name}") / "ckpt"
    mgjax.convert_checkpoint(str(src), str(dst))
    return model, Codec.load(str(dst))


def _signal(batch: int, channels: int, length: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(length) / 1000.0
    tones = np.sin(2 * np.pi * rng.uniform(2, 40, (batch, channels, 1)) * t)
    return (0.5 * tones + 0.1 * rng.standard_normal((batch, channels, length))).astype(np.float32)


def test_codec_matches_transformers(converted):
    model, codec = converted
    hop = codec.config.hop_length
    length = hop * 7 + 13  # not a multiple of the hop
    frames = -(-length // hop)
    wav = _signal(2, codec.config.channels, length, seed=1)
    with torch.no_grad():
        ref_latents = model.encoder(torch.from_numpy(wav)).numpy()
        ref_codes = model.encode(torch.from_numpy(wav))[0][0].numpy()  # [B, K, T]
        ref_audio = model.decode(torch.from_numpy(ref_codes)[None], [None])[0].numpy()

    latents = np.asarray(codec.embed(wav))
    assert latents.shape == ref_latents.shape
    np.testing.assert_allclose(latents, ref_latents, atol=1e-4, rtol=0)

    codes = np.asarray(codec.encode(wav))
    assert codes.shape == (2, codec.config.n_q, frames) == ref_codes.shape
    assert len(np.unique(codes)) > 3, "degenerate oracle: codes must vary for the comparison to mean anything"
    np.testing.assert_array_equal(codes, ref_codes)

    audio = np.asarray(codec.decode(codes))
    assert audio.shape == ref_audio.shape == (2, codec.config.channels, frames * hop)
    peak = np.abs(ref_audio).max()
    assert np.abs(audio - ref_audio).max() <= 1e-4 * peak


def test_short_input_with_reflect_padding(converted):
    """Inputs shorter than a kernel's padding take the reference's zero-extend-then-reflect path."""
    model, codec = converted
    wav = _signal(1, codec.config.channels, 3, seed=2)
    with torch.no_grad():
        ref_codes = model.encode(torch.from_numpy(wav))[0][0].numpy()
    np.testing.assert_array_equal(np.asarray(codec.encode(wav)), ref_codes)


def test_codec_rejects_bad_input(converted):
    _, codec = converted
    channels, n_q, card = codec.config.channels, codec.config.n_q, codec.config.codebook_size
    with pytest.raises(ValueError, match="rank 3"):
        codec.encode(np.zeros((channels, 100), np.float32))
    with pytest.raises(ValueError, match="channels"):
        codec.encode(np.zeros((1, channels + 1, 100), np.float32))
    with pytest.raises(ValueError, match=r"\[0, "):
        codec.decode(np.full((1, n_q, 5), card, np.int32))
    with pytest.raises(ValueError, match="codebooks"):
        codec.decode(np.zeros((1, n_q + 1, 5), np.int32))
    with pytest.raises(ValueError, match="integers"):
        codec.decode(np.zeros((1, n_q, 5), np.float32))
