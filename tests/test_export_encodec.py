"""Exporting our codec params to a transformers `EncodecModel` state dict and config (`mgjax.convert.export_encodec`).

Checked against a random transformers EnCodec: reading the export back gives the same params (weight-normed kernels to
one float32 ulp, everything else bit for bit), the export loads with strict=True into a fresh `EncodecModel` that
decodes like the original (max abs error <= 1e-5) and encodes to the same codes, and the config survives the trip.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch oracle needs torch (pip install -e .[test])")
transformers = pytest.importorskip("transformers")

from oracle import codec_config, randomise  # noqa: E402

from mgjax.config import CodecConfig  # noqa: E402
from mgjax.convert.encodec_weights import codec_config_from_hf, codec_params  # noqa: E402
from mgjax.convert.export_encodec import codec_config_to_hf, codec_state_from_params  # noqa: E402
from mgjax.convert.io import ConversionError  # noqa: E402

torch.set_num_threads(1)

N_Q, CARD = 4, 32
LAYOUTS = {
    "32khz": {},
    "odd_ratios_shortcut_deep_lstm": dict(upsampling_ratios=[5, 3, 2], num_lstm_layers=2, use_conv_shortcut=True),
}


@pytest.fixture(scope="module", params=list(LAYOUTS), ids=list(LAYOUTS))
def oracle(request):
    """(random transformers EncodecModel, its CodecConfig, its state dict as numpy)."""
    config = codec_config(N_Q, CARD, **LAYOUTS[request.param])
    model = randomise(transformers.EncodecModel(config), seed=len(request.param))
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    return model, codec_config_from_hf(config.to_dict()), state


def _leaves(tree: dict, path: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{path}{key}/"))
        else:
            out[path + key] = np.asarray(value)
    return out


def _assert_same_params(actual: dict, desired: dict) -> None:
    actual, desired = _leaves(actual), _leaves(desired)
    assert actual.keys() == desired.keys()
    for path, want in desired.items():
        got = actual[path]
        assert got.dtype == np.float32 and got.shape == want.shape, path
        if path.endswith("kernel"):  # weight norm re-split: g = ||w|| is rounded to float32
            np.testing.assert_array_max_ulp(got, want, maxulp=1)
        else:
            np.testing.assert_array_equal(got, want, err_msg=path)


@pytest.mark.parametrize("prefix", ["", "audio_encoder."])
def test_params_round_trip(oracle, prefix):
    _, cfg, state = oracle
    params = codec_params(state, cfg)
    exported = codec_state_from_params(params, cfg, prefix=prefix)
    assert exported.keys() == {prefix + k for k in state}
    for key, value in exported.items():
        assert value.dtype == np.float32 and value.flags.c_contiguous, key
        assert value.shape == state[key[len(prefix):]].shape, key
    _assert_same_params(codec_params(exported, cfg, prefix=prefix), params)


def test_export_loads_strictly_and_matches_transformers(oracle):
    model, cfg, state = oracle
    exported = codec_state_from_params(codec_params(state, cfg), cfg)
    fresh = transformers.EncodecModel(model.config)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    fresh.eval()

    rng = np.random.default_rng(0)
    codes = torch.from_numpy(rng.integers(0, CARD, (2, N_Q, 9)))
    wav = torch.from_numpy((0.5 * rng.standard_normal((2, cfg.channels, cfg.hop_length * 6 + 11))).astype(np.float32))
    with torch.no_grad():
        ref_audio = model.decode(codes[None], [None])[0].numpy()
        audio = fresh.decode(codes[None], [None])[0].numpy()
        ref_codes = model.encode(wav)[0][0].numpy()
        got_codes = fresh.encode(wav)[0][0].numpy()
    assert audio.shape == ref_audio.shape == (2, cfg.channels, 9 * cfg.hop_length)
    assert np.abs(audio - ref_audio).max() <= 1e-5
    assert ref_codes.shape == (2, N_Q, 7)
    assert len(np.unique(ref_codes)) > 3, "degenerate oracle: codes must vary for the comparison to mean anything"
    np.testing.assert_array_equal(got_codes, ref_codes)


CONFIGS = [
    CodecConfig(),  # the released 32 kHz MusicGen codec
    CodecConfig(sample_rate=24000, ratios=(8, 5, 4, 2), n_q=32, codebook_size=1024, causal=True, true_skip=False),
    CodecConfig(sample_rate=12000, ratios=(5, 3, 2), n_q=7, codebook_size=16, lstm_layers=3, pad_mode="constant",
                channels=2, compress=4, dimension=10, n_filters=6, kernel_size=5, last_kernel_size=3,
                residual_kernel_size=5, dilation_base=3, n_residual_layers=2, trim_right_ratio=0.5),
]


@pytest.mark.parametrize("cfg", CONFIGS + [dataclasses.replace(CONFIGS[0], n_q=n) for n in (1, 3, 9, 13)])
def test_config_round_trip(cfg):
    hf_config = transformers.EncodecConfig(**codec_config_to_hf(cfg))
    assert hf_config.num_quantizers == cfg.n_q
    assert codec_config_from_hf(hf_config.to_dict()) == cfg


def test_config_round_trip_of_oracle(oracle):
    model, cfg, _ = oracle
    assert codec_config_from_hf(transformers.EncodecConfig(**codec_config_to_hf(cfg)).to_dict()) == cfg
    assert codec_config_to_hf(CodecConfig())["target_bandwidths"] == [2.2]  # as in facebook/encodec_32khz


def test_config_export_refuses_normalize():
    with pytest.raises(ConversionError, match="normalize"):
        codec_config_to_hf(CodecConfig(normalize=True))
