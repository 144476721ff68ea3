"""mgjax checkpoint -> transformers directory (`python -m mgjax.convert.to_transformers`): transformers loads it and
generates what the original PyTorch model generates; converting it back gives the same mgjax params."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch oracle needs torch (pip install -e .[test])")

import mgjax  # noqa: E402
from mgjax.config import load_config  # noqa: E402
from mgjax.convert.io import ConversionError  # noqa: E402
from mgjax.convert.to_transformers import export_transformers  # noqa: E402
from helpers_tokenizer import build_test_tokenizer  # noqa: E402
from oracle import musicgen, musicgen_melody, reference_generate  # noqa: E402

torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = dict(num_hidden_layers=2, num_attention_heads=4, ffn_dim=48, vocab_size=32)
CASES = {  # name: (builder, decoder kwargs)
    "text": (musicgen, dict(BASE, hidden_size=32, num_codebooks=4)),
    "equal_widths": (musicgen, dict(BASE, hidden_size=20, num_codebooks=4)),  # T5 d_model 20: no text projection
    "melody": (musicgen_melody, dict(BASE, hidden_size=32, num_codebooks=4)),
    "stereo": (musicgen, dict(BASE, hidden_size=32, num_codebooks=8, audio_channels=2)),
}
PROMPTS = ["happy rock with electric guitar and drums", "calm piano"]


def assert_same_params(a, b) -> None:
    """Equal leaf for leaf, except the codec's weight-normed kernels: exported as g = |w|, v = w, and g rounded to
    float32, they come back within one float32 step (see export_encodec.py)."""
    flat_a = dict(jax.tree_util.tree_flatten_with_path(a)[0])
    flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    assert flat_a.keys() == flat_b.keys()
    for path, leaf in flat_a.items():
        name = jax.tree_util.keystr(path)
        if name.startswith("['codec']") and name.endswith("['kernel']"):
            np.testing.assert_array_max_ulp(np.asarray(leaf), np.asarray(flat_b[path]), maxulp=1)
        else:
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat_b[path]), err_msg=name)


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_through_transformers(name, tmp_path):
    build, decoder = CASES[name]
    original = build(decoder, seed=21)
    original.save_pretrained(tmp_path / "hf")
    build_test_tokenizer(str(tmp_path / "hf"))
    ckpt = mgjax.convert_checkpoint(str(tmp_path / "hf"), str(tmp_path / "mg"))
    exported = export_transformers(ckpt, str(tmp_path / "back"))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(
        os.listdir(exported))

    again = mgjax.MusicGen.load(mgjax.convert_checkpoint(exported, str(tmp_path / "mg2")))
    first = mgjax.MusicGen.load(ckpt)
    in_memory = mgjax.MusicGen.from_transformers(str(tmp_path / "hf"))  # the conversion without writing it
    assert in_memory.config == first.config and in_memory.tokenizer is not None
    flat_memory, flat_first = jax.tree.leaves(in_memory.params), jax.tree.leaves(first.params)
    assert len(flat_memory) == len(flat_first)
    for a, b in zip(flat_memory, flat_first):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert again.config == first.config
    assert_same_params(again.params, first.params)

    model_class = type(original)
    reloaded = model_class.from_pretrained(exported).eval()
    from transformers import AutoTokenizer
    encoded = AutoTokenizer.from_pretrained(exported)(PROMPTS, padding="longest", return_tensors="np")
    frames = 9
    ref_audio, ref_codes = reference_generate(original, encoded["input_ids"], encoded["attention_mask"], frames,
                                              do_sample=False, guidance_scale=3.0)
    audio, codes = reference_generate(reloaded, encoded["input_ids"], encoded["attention_mask"], frames,
                                      do_sample=False, guidance_scale=3.0)
    np.testing.assert_array_equal(codes, ref_codes)
    assert np.abs(audio - ref_audio).max() <= 1e-5


@pytest.mark.parametrize("override, message", [("lm.pattern=parallel", "only knows the delay pattern"),
                                               ("codec.lstm_layers=0", "EnCodec always has an LSTM")])
def test_what_transformers_cannot_hold_is_refused(tmp_path, override, message):
    config = load_config("tiny", [override])
    model = mgjax.MusicGen.from_config(config, seed=0)
    from mgjax import checkpoint
    from mgjax.config import to_dict
    ckpt = checkpoint.save(str(tmp_path / "model"), "musicgen", to_dict(config), model.params)
    with pytest.raises(ConversionError, match=message):
        export_transformers(ckpt, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out") and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_cli_writes_and_refuses_to_overwrite(tmp_path):
    original = musicgen(CASES["text"][1], seed=2)
    original.save_pretrained(tmp_path / "hf")
    ckpt = mgjax.convert_checkpoint(str(tmp_path / "hf"), str(tmp_path / "mg"))
    command = [sys.executable, "-m", "mgjax.convert.to_transformers", ckpt, str(tmp_path / "back")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "wrote" in result.stdout, result.stderr
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "already exists" in result.stderr and "Traceback" not in result.stderr
