"""Stereo MusicGen (musicgen-stereo-*: `audio_channels=2`, 2 x 4 codebooks interleaved left/right over a mono
EnCodec): converted from transformers and compared with its `generate`, greedy and token exact."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch oracle needs torch (pip install -e .[test])")

import mgjax  # noqa: E402
from mgjax.conditioning.chroma import prepare_melody  # noqa: E402
from mgjax.config import ConfigError  # noqa: E402
from helpers_tokenizer import build_test_tokenizer  # noqa: E402
from oracle import musicgen, musicgen_melody, reference_generate, reference_generate_from  # noqa: E402

torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48, num_codebooks=8,
               vocab_size=32, audio_channels=2)
PROMPTS = ["happy rock with electric guitar and drums", "calm piano"]  # different lengths: row 1 is padded


def convert(model, tmp_path_factory, name: str):
    src = tmp_path_factory.mktemp(name)
    model.save_pretrained(src)
    build_test_tokenizer(str(src))
    dst = tmp_path_factory.mktemp(name + "_mg") / "ckpt"
    mgjax.convert_checkpoint(str(src), str(dst))
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(src)), str(dst)


@pytest.fixture(scope="module")
def stereo(tmp_path_factory):
    model = musicgen(DECODER, seed=3)
    tokenizer, directory = convert(model, tmp_path_factory, "stereo")
    return model, tokenizer, mgjax.MusicGen.load(directory), directory


def test_stereo_config_is_read(stereo):
    _, _, mg, _ = stereo
    assert mg.config.lm.audio_channels == 2 and mg.config.lm.num_codebooks == 8 and mg.config.codec.n_q == 4
    assert mg.channels == 2 and mg.config.codec.channels == 1


@pytest.mark.parametrize("frames", [7, 17])  # transformers applies its delay mask from 2 x 4 - 1 frames
def test_greedy_stereo_generation_matches_transformers(stereo, frames):
    model, tokenizer, mg, _ = stereo
    encoded = tokenizer(PROMPTS, padding="longest", return_tensors="np")
    ref_audio, ref_codes = reference_generate(model, encoded["input_ids"], encoded["attention_mask"], frames,
                                              do_sample=False, guidance_scale=3.0)
    out = mg.generate(PROMPTS, duration=frames / mg.frame_rate, greedy=True, cfg_coef=3.0)
    assert out.codes.shape == ref_codes.shape == (2, 8, frames) and out.wav.shape == ref_audio.shape == \
        (2, 2, frames * mg.config.codec.hop_length)
    np.testing.assert_array_equal(out.codes, ref_codes)
    assert np.abs(out.wav - ref_audio).max() <= 1e-3
    assert not np.array_equal(out.codes[:, 0::2], out.codes[:, 1::2])  # the channels really differ


def test_stereo_continuation_and_unconditional_match_transformers(stereo):
    """A stereo audio prompt (each channel encoded apart, codes interleaved) continued as transformers does, and
    unconditional generation from its null inputs."""
    model, tokenizer, mg, _ = stereo
    encoded = tokenizer(PROMPTS, padding="longest", return_tensors="np")
    t = np.arange(3200) / 32000
    prompt = np.stack([np.stack([np.sin(2 * np.pi * f * t), 0.5 * np.sin(2 * np.pi * 1.5 * f * t)])
                       for f in (220.0, 330.0)]).astype(np.float32)  # [2, 2, 3200]
    inputs = dict(input_ids=torch.as_tensor(encoded["input_ids"]), attention_mask=torch.as_tensor(
        encoded["attention_mask"]), input_values=torch.from_numpy(prompt))
    ref_audio, ref_codes = reference_generate_from(model, inputs, 12, do_sample=False, guidance_scale=3.0)
    out = mg.generate(PROMPTS, duration=ref_codes.shape[-1] / mg.frame_rate, greedy=True, cfg_coef=3.0,
                      prompt_audio=prompt)
    np.testing.assert_array_equal(out.codes, ref_codes)
    assert np.abs(out.wav - ref_audio).max() <= 1e-3
    ref_audio, ref_codes = reference_generate_from(model, dict(model.get_unconditional_inputs(num_samples=2)), 9,
                                                   do_sample=False)
    out = mg.generate_unconditional(2, duration=9 / mg.frame_rate, greedy=True)
    np.testing.assert_array_equal(out.codes, ref_codes)


def test_stereo_encode_decode_split_the_channels(stereo):
    """`encode`: left and right coded apart by the mono codec and interleaved; `decode`: even codebooks left, odd
    right; swapping the channels swaps the codebook pairs."""
    _, _, mg, _ = stereo
    rng = np.random.default_rng(0)
    wav = (0.3 * rng.standard_normal((2, 2, 3200))).astype(np.float32)
    codes = np.asarray(mg.encode(wav))
    assert codes.shape == (2, 8, 5)
    np.testing.assert_array_equal(codes[:, 0::2], np.asarray(mg.codec.encode(wav[:, :1])))
    np.testing.assert_array_equal(codes[:, 1::2], np.asarray(mg.codec.encode(wav[:, 1:])))
    np.testing.assert_array_equal(np.asarray(mg.encode(wav[:, ::-1])), codes.reshape(2, 4, 2, 5)[:, :, ::-1]
                                  .reshape(2, 8, 5))
    audio = np.asarray(mg.decode(codes))
    np.testing.assert_allclose(audio[:, :1], np.asarray(mg.codec.decode(codes[:, 0::2])), atol=1e-6)
    np.testing.assert_allclose(audio[:, 1:], np.asarray(mg.codec.decode(codes[:, 1::2])), atol=1e-6)
    with pytest.raises(ValueError, match=r"stereo model encodes \[batch, 2, samples\]"):
        mg.encode(wav[:, :1])
    with pytest.raises(ValueError, match=r"stereo model decodes \[batch, 8, frames\]"):
        mg.decode(codes[:, :4])


def test_stereo_melody_matches_transformers(tmp_path_factory):
    model = musicgen_melody(DECODER, seed=5, chroma_length=40)
    tokenizer, directory = convert(model, tmp_path_factory, "stereo_melody")
    mg = mgjax.MusicGen.load(directory)
    encoded = tokenizer(PROMPTS, padding="longest", return_tensors="np")
    t = np.arange(48000) / 32000
    melody = np.stack([np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 330 * t)])[:, None].astype(np.float32)
    ref_audio, ref_codes = reference_generate(model, encoded["input_ids"], encoded["attention_mask"], 9,
                                              do_sample=False, guidance_scale=3.0,
                                              input_features=torch.from_numpy(np.array(prepare_melody(melody,
                                                                                                      32000))))
    out = mg.generate(PROMPTS, duration=9 / mg.frame_rate, greedy=True, cfg_coef=3.0, melody=melody)
    np.testing.assert_array_equal(out.codes, ref_codes)
    assert out.wav.shape == ref_audio.shape and np.abs(out.wav - ref_audio).max() <= 1e-3


def test_stereo_config_errors_name_the_fix(stereo):
    _, _, mg, _ = stereo
    config = mg.config
    with pytest.raises(ConfigError, match=r"codec.n_q=4 x lm.audio_channels=2 differs from lm.num_codebooks=4"):
        dataclasses.replace(config, lm=dataclasses.replace(config.lm, num_codebooks=4)).validate()
    with pytest.raises(ConfigError, match="lm.audio_channels must be 1 or 2"):
        dataclasses.replace(config.lm, audio_channels=3).validate()
    with pytest.raises(ConfigError, match="stereo.*mono codec; codec.channels is 2"):
        dataclasses.replace(config, codec=dataclasses.replace(config.codec, channels=2)).validate()


def test_sample_cli_writes_stereo(stereo, tmp_path):
    soundfile = pytest.importorskip("soundfile")
    _, _, _, directory = stereo
    prompt = tmp_path / "intro.wav"
    soundfile.write(prompt, 0.5 * np.sin(2 * np.pi * 220 * np.arange(3200) / 32000), 32000)  # mono: duplicated
    out = tmp_path / "stereo.ogg"
    result = subprocess.run([sys.executable, "sample.py", "--checkpoint", directory, "--prompt", "calm piano",
                             "--duration", "0.3", "--continue", str(prompt), "--out", str(out), "--no-progress",
                             "--compile-cache", ""], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    data, rate = soundfile.read(out)
    assert rate == 32000 and data.shape[1] == 2 and abs(len(data) - 0.3 * 32000) <= 32000 / 50
