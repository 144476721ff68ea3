"""`mgjax.convert.export_t5` (our T5 params -> transformers weights) against transformers' `T5EncoderModel`."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch oracle needs torch (pip install -e .[test])")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mgjax.config import T5Config  # noqa: E402
from mgjax.convert.export_t5 import t5_config_to_hf, t5_state_from_params  # noqa: E402
from mgjax.convert.hf_t5 import t5_config_from_hf, t5_params_from_hf  # noqa: E402

torch.set_num_threads(1)

HF_CONFIGS = {
    "relu": dict(vocab_size=64, d_model=20, d_kv=6, num_heads=3, d_ff=24, num_layers=2,
                 relative_attention_num_buckets=8, relative_attention_max_distance=16,
                 feed_forward_proj="relu", layer_norm_epsilon=1e-6),
    "gated-gelu": dict(vocab_size=64, d_model=20, d_kv=6, num_heads=3, d_ff=24, num_layers=2,
                       feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-5),
}
PREFIXES = ("", "text_encoder.")


def _oracle(name: str) -> transformers.T5EncoderModel:
    """A `T5EncoderModel` with every parameter drawn from torch.randn: no weight left at its 1/0 init."""
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(transformers.T5Config(dropout_rate=0.0, **HF_CONFIGS[name])).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape)
            if "layer_norm" in pname:
                p.copy_(1.5 + 0.3 * noise)  # away from the all-ones init
            elif p.ndim == 2 and "shared" not in pname and "relative_attention_bias" not in pname:
                p.copy_(noise * p.shape[1] ** -0.5)
            else:
                p.copy_(noise)
    return model


def _flatten(tree, path: str = "") -> dict:
    """A nested dict of arrays -> {'a/b/c': array}."""
    if not isinstance(tree, dict):
        return {path.rstrip("/"): tree}
    return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{path}{key}/").items()}


def _hf_state(model: transformers.T5EncoderModel, prefix: str) -> dict[str, np.ndarray]:
    return {prefix + key: value.detach().numpy().copy() for key, value in model.state_dict().items()}


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_state_round_trip(name, prefix):
    """HF state -> params -> state reproduces every tensor bit for bit, with transformers' exact key set."""
    model = _oracle(name)
    cfg = t5_config_from_hf(model.config.to_dict())
    original = _hf_state(model, prefix)
    params = t5_params_from_hf(original, cfg, prefix)
    exported = t5_state_from_params(params, cfg, prefix)
    assert set(exported) == set(original)
    for key, value in original.items():
        assert exported[key].dtype == np.float32 and exported[key].flags["C_CONTIGUOUS"], key
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    # and params -> state -> params is the identity
    want, got = _flatten(params), _flatten(t5_params_from_hf(exported, cfg, prefix))
    assert set(got) == set(want)
    for path, value in want.items():
        np.testing.assert_array_equal(got[path], value, err_msg=path)


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_exported_state_loads_and_matches(name):
    """Exported weights (from jax params) load strictly into a fresh model and reproduce the oracle's outputs."""
    model = _oracle(name)
    cfg = t5_config_from_hf(model.config.to_dict())
    params = t5_params_from_hf(_hf_state(model, ""), cfg)
    exported = t5_state_from_params(jax.tree.map(jnp.asarray, params), cfg)

    torch.manual_seed(1)  # a different random init, so nothing matches unless every weight was loaded
    fresh = transformers.T5EncoderModel(transformers.T5Config(**t5_config_to_hf(cfg), dropout_rate=0.0)).eval()
    fresh.load_state_dict({key: torch.from_numpy(value) for key, value in exported.items()}, strict=True)

    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(1, cfg.vocab_size, size=(2, 9)).astype(np.int64))
    mask = torch.from_numpy((np.arange(9)[None, :] < np.array([[9], [5]])).astype(np.int64))
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
        got = fresh(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    assert np.abs(got - want).max() <= 1e-5


@pytest.mark.parametrize("cfg", [
    T5Config(),
    T5Config(vocab_size=64, d_model=20, d_kv=6, d_ff=24, num_layers=2, num_heads=3, relative_attention_num_buckets=8,
             relative_attention_max_distance=16, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-5,
             pad_token_id=3),
])
def test_config_round_trip(cfg):
    """T5Config -> transformers.T5Config kwargs -> config dict -> T5Config is the identity."""
    hf = transformers.T5Config(**t5_config_to_hf(cfg))
    assert t5_config_from_hf(hf.to_dict()) == cfg
    gated = cfg.feed_forward_proj == "gated-gelu"
    assert hf.is_gated_act == gated and hf.dense_act_fn == ("gelu_new" if gated else "relu")


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_config_matches_oracle(name):
    """The exported kwargs rebuild every field of the original transformers config that the encoder depends on."""
    original = transformers.T5Config(dropout_rate=0.0, **HF_CONFIGS[name]).to_dict()
    rebuilt = transformers.T5Config(**t5_config_to_hf(t5_config_from_hf(original))).to_dict()
    for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
                "relative_attention_max_distance", "feed_forward_proj", "layer_norm_epsilon", "dense_act_fn",
                "is_gated_act", "pad_token_id"):
        assert rebuilt[key] == original[key], key


def test_wrong_shape_is_named():
    model = _oracle("relu")
    cfg = t5_config_from_hf(model.config.to_dict())
    params = t5_params_from_hf(_hf_state(model, ""), cfg)
    with pytest.raises(ValueError, match="layers/attention/query"):
        t5_state_from_params(params, dataclasses.replace(cfg, d_kv=cfg.d_kv + 1))
