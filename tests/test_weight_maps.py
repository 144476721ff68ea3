"""The weight maps (`hf_lm.lm_entries`, `hf_t5.t5_entries`, `encodec_weights.codec_entries`) are complete: every tensor
of a transformers-built model belongs to exactly one entry; reading takes only the entry's own tensors, writing gives
back exactly the model's keys and shapes, and reading what was written gives the same params."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch oracle needs torch (pip install -e .[test])")
transformers = pytest.importorskip("transformers")

from oracle import TEXT, codec_config, musicgen, musicgen_melody, randomise  # noqa: E402

from mgjax.convert.encodec_weights import codec_config_from_hf, codec_entries  # noqa: E402
from mgjax.convert.hf import musicgen_config_from_hf  # noqa: E402
from mgjax.convert.hf_lm import lm_entries  # noqa: E402
from mgjax.convert.hf_t5 import t5_config_from_hf, t5_entries  # noqa: E402
from mgjax.convert.maps import to_params, to_state  # noqa: E402

torch.set_num_threads(1)

DECODER = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=24, num_codebooks=2,
               vocab_size=32)


def _musicgen_tables(model) -> list:
    cfg = musicgen_config_from_hf(model.config.to_dict())
    return [("", lm_entries(cfg.lm, text_projection=cfg.text.d_model != cfg.lm.dim)),
            ("text_encoder.", t5_entries(cfg.text)), ("audio_encoder.", codec_entries(cfg.codec))]


def _t5_tables(model) -> list:
    return [("", t5_entries(t5_config_from_hf(model.config.to_dict())))]


def _codec_tables(model) -> list:
    return [("", codec_entries(codec_config_from_hf(model.config.to_dict())))]


MODELS = {
    "musicgen": (lambda: musicgen(DECODER), _musicgen_tables),
    "musicgen_equal_widths": (lambda: musicgen(dict(DECODER, hidden_size=TEXT["d_model"])), _musicgen_tables),
    "musicgen_stereo": (lambda: musicgen(dict(DECODER, num_codebooks=4, audio_channels=2)), _musicgen_tables),
    "musicgen_melody": (lambda: musicgen_melody(DECODER, chroma_length=40), _musicgen_tables),
    "t5_gated": (lambda: transformers.T5EncoderModel(transformers.T5Config(**TEXT, feed_forward_proj="gated-gelu")),
                 _t5_tables),
    "encodec_shortcut_deep_lstm": (lambda: randomise(transformers.EncodecModel(codec_config(
        2, 32, use_conv_shortcut=True, num_lstm_layers=2, upsampling_ratios=[5, 3, 2]))), _codec_tables),
}


class _Reads(dict):
    """A state dict that records the keys read from it."""

    def __init__(self, state: dict):
        super().__init__(state)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_tensor_is_mapped_by_exactly_one_entry(name):
    build, tables_of = MODELS[name]
    model = build()
    state = {key: value.detach().numpy() for key, value in model.state_dict().items()}
    tables = tables_of(model)

    owner: dict[str, str] = {}
    for prefix, entries in tables:
        for entry in entries:
            for key in entry.torch_keys(prefix):
                assert key not in owner, f"{key} is mapped by both {owner[key]} and {entry.ours}"
                owner[key] = entry.ours
    assert set(owner) == set(state), (sorted(set(state) - set(owner)), sorted(set(owner) - set(state)))

    for prefix, entries in tables:
        for entry in entries:  # import: each entry reads only (and some of) its own tensors
            reads = _Reads(state)
            to_params([entry], reads, prefix)
            assert reads.read and reads.read <= set(entry.torch_keys(prefix)), (entry.ours, sorted(reads.read))

    params = [to_params(entries, state, prefix) for prefix, entries in tables]
    exported = {}
    for (prefix, entries), tree in zip(tables, params):  # export: exactly the model's keys and shapes
        exported.update(to_state(entries, tree, prefix))
    assert set(exported) == set(state)
    assert all(exported[key].shape == value.shape for key, value in state.items())

    for (prefix, entries), tree in zip(tables, params):  # and back: the same params (weight norm to 1 ulp)
        again = to_params(entries, exported, prefix)
        for entry in entries:
            want, got = tree, again
            for part in entry.ours.split("/"):
                want, got = want[part], got[part]
            np.testing.assert_array_max_ulp(got, want, maxulp=1)
