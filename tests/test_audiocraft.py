"""audiocraft-format conversion: a random transformers MusicGen, written out in audiocraft's key layout and package
format (inverse of transformers' documented conversion), converts to the same params, config and greedy generation
as its transformers-format conversion; broken, foreign or unsupported inputs fail with a clear error."""
from __future__ import annotations

import copy
import os
import re
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch oracle needs torch (pip install -e .[test])")

import jax  # noqa: E402
import yaml  # noqa: E402

import mgjax  # noqa: E402
from mgjax.convert import audiocraft  # noqa: E402
from mgjax.convert.io import ConversionError  # noqa: E402
from oracle import musicgen, musicgen_melody  # noqa: E402
from helpers_tokenizer import build_test_tokenizer  # noqa: E402

torch.set_num_threads(1)

DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48, num_codebooks=4,
               vocab_size=32)
MELODY_DECODER = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, ffn_dim=48, num_codebooks=2,
                      vocab_size=16)
D = "decoder.model.decoder."


# --- writing a transformers model out in audiocraft's layout --------------------------------------------------------

def audiocraft_lm_state(hf: dict, num_layers: int, num_codebooks: int) -> dict:
    """transformers MusicGen state dict -> audiocraft LM `best_state` (q/k/v packed into in_proj_weight, fp16)."""
    out = {}
    for k in range(num_codebooks):
        out[f"emb.{k}.weight"] = hf[f"{D}embed_tokens.{k}.weight"]
        out[f"linears.{k}.weight"] = hf[f"decoder.lm_heads.{k}.weight"]
    for n in range(num_layers):
        src, dst = f"{D}layers.{n}.", f"transformer.layers.{n}."
        for theirs, ours in (("self_attn", "self_attn"), ("encoder_attn", "cross_attention")):
            if f"{src}{theirs}.q_proj.weight" in hf:
                out[f"{dst}{ours}.in_proj_weight"] = torch.cat([hf[f"{src}{theirs}.{x}_proj.weight"] for x in "qkv"])
                out[f"{dst}{ours}.out_proj.weight"] = hf[f"{src}{theirs}.out_proj.weight"]
        for theirs, ours in (("self_attn_layer_norm", "norm1"), ("encoder_attn_layer_norm", "norm_cross"),
                             ("final_layer_norm", "norm2"), ("fc1", "linear1"), ("fc2", "linear2")):
            for p in ("weight", "bias"):
                if f"{src}{theirs}.{p}" in hf:
                    out[f"{dst}{ours}.{p}"] = hf[f"{src}{theirs}.{p}"]
    for p in ("weight", "bias"):
        out[f"out_norm.{p}"] = hf[f"{D}layer_norm.{p}"]
        out[f"condition_provider.conditioners.description.output_proj.{p}"] = hf[f"enc_to_dec_proj.{p}"]
        if f"audio_enc_to_dec_proj.{p}" in hf:
            out[f"condition_provider.conditioners.self_wav.output_proj.{p}"] = hf[f"audio_enc_to_dec_proj.{p}"]
    if "audio_enc_to_dec_proj.weight" in hf:  # the chroma extractor's buffers ride along in melody checkpoints
        out["condition_provider.conditioners.self_wav.chroma.spec.window"] = torch.hann_window(16)
    return {k: v.clone().half() for k, v in out.items()}  # released LMs are stored in fp16


def audiocraft_codec_state(model) -> dict:
    """transformers EnCodec weights -> audiocraft keys (`model.i.conv.conv.weight_g/_v`, `convtr.convtr`,
    `quantizer.vq.layers.q._codebook.*`)."""
    convtr = {i for i, layer in enumerate(model.audio_encoder.decoder.layers)
              if type(layer).__name__ == "EncodecConvTranspose1d"}
    out = {}
    for key, value in model.audio_encoder.state_dict().items():
        key = key.replace(".parametrizations.weight.original0", ".weight_g")
        key = key.replace(".parametrizations.weight.original1", ".weight_v")
        key = re.sub(r"^(encoder|decoder)\.layers\.", r"\1.model.", key)
        key = re.sub(r"\.conv\.(weight_g|weight_v|weight|bias)$", r".conv.conv.\1", key)
        key = re.sub(r"^quantizer\.layers\.(\d+)\.codebook\.", r"quantizer.vq.layers.\1._codebook.", key)
        m = re.match(r"decoder\.model\.(\d+)\.conv\.conv\.", key)
        if m and int(m[1]) in convtr:
            key = key.replace(".conv.conv.", ".convtr.convtr.", 1)
        out[key] = value.clone()
    return out


def lm_cfg(model, melody: bool = False) -> dict:
    """An LM xp.cfg with the hyperparameters of `model` (as in audiocraft's musicgen_lm.yaml)."""
    dec = model.config.decoder
    K = dec.num_codebooks
    conditioners = {"description": {"model": "t5", "t5": {"name": "t5-base", "finetune": False,
                                                          "word_dropout": 0.3, "normalize_text": False}}}
    fuser = {"cross_attention_pos_emb": False, "cross_attention_pos_emb_scale": 1, "sum": [], "prepend": [],
             "cross": ["description"], "input_interpolate": []}
    if melody:
        conditioners["self_wav"] = {"model": "chroma_stem", "chroma_stem": {
            "sample_rate": "${sample_rate}", "n_chroma": 12, "radix2_exp": 14, "argmax": True}}
        fuser.update(cross=[], prepend=["self_wav", "description"])
    channels = dec.audio_channels  # stereo: audiocraft's musicgen_stereo_finetune settings
    return {
        "sample_rate": 32000, "channels": channels, "dataset": {"segment_duration": 30}, "lm_model": "transformer_lm",
        "interleave_stereo_codebooks": {"use": channels == 2, "per_timestep": False},
        "codebooks_pattern": {"modeling": "delay", "delay": {"delays": [k // channels for k in range(K)],
                                                             "flatten_first": 0, "empty_initial": 0},
                              "unroll": {"flattening": list(range(K)), "delays": [0] * K}},
        "transformer_lm": {
            "dim": dec.hidden_size, "num_heads": dec.num_attention_heads, "num_layers": dec.num_hidden_layers,
            "hidden_scale": dec.ffn_dim / dec.hidden_size, "n_q": K, "card": dec.vocab_size, "dropout": 0.0,
            "activation": "gelu", "norm_first": True, "bias_ff": False, "bias_attn": False, "bias_proj": False,
            "past_context": None, "causal": True, "custom": False, "memory_efficient": True, "layer_scale": None,
            "positional_embedding": "sin", "xpos": False, "norm": "layer_norm", "cross_attention": False,
            "qk_layer_norm": False, "qk_layer_norm_cross": False, "kv_repeat": 1, "two_step_cfg": False},
        "conditioners": conditioners, "fuser": fuser,
        "classifier_free_guidance": {"training_dropout": 0.3, "inference_coef": 3.0},
    }


def codec_cfg(model) -> dict:
    """A compression xp.cfg with the hyperparameters of `model.audio_encoder` (as in audiocraft's encodec yaml)."""
    c = model.config.audio_encoder
    return {
        "compression_model": "encodec", "sample_rate": c.sampling_rate, "channels": c.audio_channels,
        "encodec": {"autoencoder": "seanet", "quantizer": "rvq", "sample_rate": "${sample_rate}",
                    "channels": "${channels}", "causal": c.use_causal_conv, "renormalize": False},
        "seanet": {"dimension": c.hidden_size, "channels": "${channels}", "causal": "${encodec.causal}",
                   "n_filters": c.num_filters, "n_residual_layers": c.num_residual_layers,
                   "ratios": list(c.upsampling_ratios), "activation": "ELU", "activation_params": {"alpha": 1.0},
                   "norm": "weight_norm", "norm_params": {}, "kernel_size": c.kernel_size,
                   "residual_kernel_size": c.residual_kernel_size, "last_kernel_size": c.last_kernel_size,
                   "dilation_base": c.dilation_growth_rate, "pad_mode": c.pad_mode,
                   "true_skip": not c.use_conv_shortcut, "compress": c.compress, "lstm": c.num_lstm_layers,
                   "disable_norm_outer_blocks": 0, "encoder": {},
                   "decoder": {"trim_right_ratio": c.trim_right_ratio, "final_activation": None,
                               "final_activation_params": None}},
        "rvq": {"n_q": c.num_quantizers, "bins": c.codebook_size, "q_dropout": False, "decay": 0.99},
    }


def round_to_fp16(model) -> None:
    """Rounds the LM-side weights to fp16 precision, so the fp16 audiocraft copy holds exactly the same values."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("decoder.", "enc_to_dec_proj.", "audio_enc_to_dec_proj.")):
                param.copy_(param.half().float())


def write_audiocraft(model, directory, melody: bool = False) -> str:
    """`state_dict.bin` (LM cfg as a YAML string, like an export) + `compression_state_dict.bin` (cfg as a dict,
    best_state nested under 'model', like a training checkpoint)."""
    os.makedirs(directory, exist_ok=True)
    dec = model.config.decoder
    lm_state = audiocraft_lm_state(model.state_dict(), dec.num_hidden_layers, dec.num_codebooks)
    torch.save({"best_state": lm_state, "xp.cfg": yaml.safe_dump(lm_cfg(model, melody)), "version": "1.3.0",
                "exported": True}, os.path.join(directory, "state_dict.bin"))
    torch.save({"best_state": {"model": audiocraft_codec_state(model)}, "xp.cfg": codec_cfg(model)},
               os.path.join(directory, "compression_state_dict.bin"))
    return str(directory)


def write_t5(model, directory) -> str:
    model.text_encoder.save_pretrained(directory)
    build_test_tokenizer(str(directory))
    return str(directory)


def assert_same_params(a, b) -> None:
    flat_a = dict(jax.tree_util.tree_flatten_with_path(a)[0])
    flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    assert flat_a.keys() == flat_b.keys()
    for path, leaf in flat_a.items():
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat_b[path]), err_msg=jax.tree_util.keystr(path))


# --- fixtures -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(transformers dir, audiocraft dir, T5 dir) of one random MusicGen."""
    model = musicgen(DECODER, seed=7)
    round_to_fp16(model)
    hf_dir = tmp_path_factory.mktemp("hf")
    model.save_pretrained(hf_dir)
    ac_dir = write_audiocraft(model, tmp_path_factory.mktemp("ac") / "musicgen")
    t5_dir = write_t5(model, tmp_path_factory.mktemp("t5"))
    return str(hf_dir), ac_dir, t5_dir


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    hf_dir, ac_dir, t5_dir = sources
    out = tmp_path_factory.mktemp("out")
    from_hf = mgjax.convert_checkpoint(hf_dir, str(out / "hf"))
    from_ac = mgjax.convert_checkpoint(ac_dir, str(out / "ac"), t5_dir=t5_dir)
    return mgjax.MusicGen.load(from_hf), mgjax.MusicGen.load(from_ac), from_ac


# --- parity -----------------------------------------------------------------------------------------------------------

def test_same_config_and_params_as_transformers_conversion(converted):
    mg_hf, mg_ac, _ = converted
    assert mg_ac.config == mg_hf.config
    assert_same_params(mg_ac.params, mg_hf.params)


def test_same_greedy_generation_as_transformers_conversion(converted):
    mg_hf, mg_ac, path = converted
    assert os.path.isdir(os.path.join(path, "tokenizer")), "the T5 directory's tokenizer files are copied"
    ids = np.array([[5, 9, 3, 12, 1], [7, 4, 1, 0, 0]], np.int32)  # row 1 padded
    mask = (np.arange(5)[None] < np.array([[5], [3]])).astype(np.int32)
    kwargs = dict(input_ids=ids, attention_mask=mask, duration=9 / mg_hf.frame_rate, greedy=True)
    ref, out = mg_hf.generate(**kwargs), mg_ac.generate(**kwargs)
    assert out.codes.shape == (2, DECODER["num_codebooks"], 9)
    np.testing.assert_array_equal(out.codes, ref.codes)
    np.testing.assert_allclose(out.wav, ref.wav, atol=1e-6)


def test_melody_checkpoint_matches_transformers_conversion(tmp_path):
    model = musicgen_melody(MELODY_DECODER, seed=11)
    round_to_fp16(model)
    model.save_pretrained(tmp_path / "hf")
    ac_dir = write_audiocraft(model, tmp_path / "ac", melody=True)
    t5_dir = write_t5(model, tmp_path / "t5")
    from_hf = mgjax.convert_checkpoint(str(tmp_path / "hf"), str(tmp_path / "out_hf"))
    from_ac = mgjax.convert_checkpoint(ac_dir, str(tmp_path / "out_ac"), t5_dir=t5_dir)
    mg_hf, mg_ac = mgjax.MusicGen.load(from_hf), mgjax.MusicGen.load(from_ac)
    assert mg_ac.config.lm.conditioning == "prepend" and mg_ac.config.lm.chroma_length == 235
    assert mg_ac.config == mg_hf.config
    assert_same_params(mg_ac.params, mg_hf.params)


def test_stereo_checkpoint_matches_transformers_conversion(tmp_path):
    """musicgen-stereo as audiocraft stores it (interleave_stereo_codebooks, 8 codebooks with delays 0,0,1,1,...,
    a mono codec): the same config, params and greedy tokens as the transformers conversion."""
    model = musicgen(dict(DECODER, num_codebooks=8, audio_channels=2), seed=13)
    round_to_fp16(model)
    model.save_pretrained(tmp_path / "hf")
    ac_dir = write_audiocraft(model, tmp_path / "ac")
    t5_dir = write_t5(model, tmp_path / "t5")
    mg_hf = mgjax.MusicGen.load(mgjax.convert_checkpoint(str(tmp_path / "hf"), str(tmp_path / "out_hf")))
    mg_ac = mgjax.MusicGen.load(mgjax.convert_checkpoint(ac_dir, str(tmp_path / "out_ac"), t5_dir=t5_dir))
    assert mg_ac.config.lm.audio_channels == 2 and mg_ac.config.codec.n_q == 4 and mg_ac.config == mg_hf.config
    assert_same_params(mg_ac.params, mg_hf.params)
    ids, mask = np.array([[5, 9, 3]], np.int32), np.ones((1, 3), np.int32)
    kwargs = dict(input_ids=ids, attention_mask=mask, duration=9 / mg_hf.frame_rate, greedy=True)
    np.testing.assert_array_equal(mg_ac.generate(**kwargs).codes, mg_hf.generate(**kwargs).codes)
    cfg = lm_cfg(model)
    cfg["interleave_stereo_codebooks"]["per_timestep"] = True
    with pytest.raises(ConversionError, match="per_timestep=True"):
        audiocraft.lm_config_from_audiocraft(cfg)
    cfg["interleave_stereo_codebooks"] = {"use": False}
    with pytest.raises(ConversionError, match="channels=2 with interleave_stereo_codebooks.use=False"):
        audiocraft.lm_config_from_audiocraft(cfg)


# --- configs ----------------------------------------------------------------------------------------------------------

def test_config_reading():
    model = musicgen(DECODER, seed=0)
    cfg = codec_cfg(model)
    cfg["seanet"]["pad_mode"] = "constant"  # audiocraft's own default; the checkpoint's config decides
    cfg["rvq"]["n_q"] = 8  # a codec with more codebooks than the LM uses: the first n_q are taken
    codec = audiocraft.codec_config_from_audiocraft(yaml.safe_load(yaml.safe_dump(cfg)), n_q=4)
    assert codec.pad_mode == "constant" and codec.n_q == 4 and codec.sample_rate == 32000 and not codec.causal
    lm = lm_cfg(model)
    lm["codebooks_pattern"]["modeling"] = "unroll"
    assert audiocraft.lm_config_from_audiocraft(lm).pattern == "unroll"
    with pytest.raises(ConversionError, match="interpolation"):
        audiocraft.cfg_get({"a": "${missing.key}"}, "a")


@pytest.mark.parametrize("setting, value", [("bias_attn", True), ("bias_ff", True), ("norm_first", False),
                                            ("positional_embedding", "rope"), ("layer_scale", 0.1)])
def test_unsupported_lm_settings_are_refused_by_name(setting, value):
    cfg = lm_cfg(musicgen(DECODER, seed=0))
    cfg["transformer_lm"][setting] = value
    with pytest.raises(ConversionError, match=f"transformer_lm.{setting}"):
        audiocraft.lm_config_from_audiocraft(cfg)


# --- broken inputs ----------------------------------------------------------------------------------------------------

def test_missing_t5_is_a_clear_error(sources, tmp_path):
    _, ac_dir, _ = sources
    with pytest.raises(ConversionError, match="--t5 DIR"):
        mgjax.convert_checkpoint(ac_dir, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_truncated_state_dict_leaves_nothing(sources, tmp_path):
    _, ac_dir, t5_dir = sources
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("state_dict.bin", "compression_state_dict.bin"):
        data = open(os.path.join(ac_dir, name), "rb").read()
        (broken / name).write_bytes(data[: len(data) // 2] if name == "state_dict.bin" else data)
    with pytest.raises(ConversionError, match="state_dict.bin.*truncated or corrupt"):
        mgjax.convert_checkpoint(str(broken), str(tmp_path / "out"), t5_dir=t5_dir)
    assert sorted(os.listdir(tmp_path)) == ["broken"]  # no output and no temporary directory


def test_foreign_and_incomplete_directories(sources, tmp_path):
    _, ac_dir, t5_dir = sources
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("hello")
    with pytest.raises(ConversionError, match="neither a transformers checkpoint"):
        mgjax.convert_checkpoint(str(tmp_path / "foreign"), str(tmp_path / "out"), t5_dir=t5_dir)
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    os.symlink(os.path.join(ac_dir, "state_dict.bin"), lonely / "state_dict.bin")
    with pytest.raises(ConversionError, match="no compression_state_dict.bin"):
        mgjax.convert_checkpoint(str(lonely), str(tmp_path / "out"), t5_dir=t5_dir)
    plain = tmp_path / "plain"  # torch files, but plain state dicts rather than audiocraft packages
    plain.mkdir()
    for name in ("state_dict.bin", "compression_state_dict.bin"):
        torch.save({"emb.0.weight": torch.zeros(3, 2)}, plain / name)
    with pytest.raises(ConversionError, match="not an audiocraft package"):
        mgjax.convert_checkpoint(str(plain), str(tmp_path / "out"), t5_dir=t5_dir)
    with pytest.raises(ConversionError, match="not a transformers T5 directory"):
        mgjax.convert_checkpoint(ac_dir, str(tmp_path / "out"), t5_dir=str(tmp_path / "foreign"))
    assert not os.path.exists(tmp_path / "out")


def test_hub_cache_folder_stands_for_its_snapshot(sources, converted, tmp_path):
    """`models--org--name` as huggingface_hub caches it (snapshots/<revision>/ of links to blobs/) converts as its
    one snapshot; with two snapshots the error lists them."""
    hf_dir, _, _ = sources
    mg_hf, _, _ = converted
    cache = tmp_path / "models--facebook--musicgen-tiny"
    (cache / "blobs").mkdir(parents=True)
    (cache / "refs").mkdir()
    snapshot = cache / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for name in os.listdir(hf_dir):
        os.symlink(os.path.join(hf_dir, name), snapshot / name)
    out = mgjax.convert_checkpoint(str(cache), str(tmp_path / "out"))
    from_cache = mgjax.MusicGen.load(out)
    assert from_cache.config == mg_hf.config
    assert_same_params(from_cache.params, mg_hf.params)
    (cache / "snapshots" / "4567efgh").mkdir()
    with pytest.raises(ConversionError, match="hub cache with 2 snapshots \\(0123abcd, 4567efgh\\); pass one"):
        mgjax.convert_checkpoint(str(cache), str(tmp_path / "out2"))


def test_pretrained_codec_reference_and_omegaconf_cfg_are_explained(sources, tmp_path):
    _, ac_dir, t5_dir = sources
    src = tmp_path / "src"
    src.mkdir()
    os.symlink(os.path.join(ac_dir, "state_dict.bin"), src / "state_dict.bin")
    torch.save({"pretrained": "facebook/encodec_32khz", "exported": True}, src / "compression_state_dict.bin")
    with pytest.raises(ConversionError, match="facebook/encodec_32khz"):
        mgjax.convert_checkpoint(str(src), str(tmp_path / "out"), t5_dir=t5_dir)

    # an xp.cfg pickled as an omegaconf object is refused unread, omegaconf installed or not: unpickling objects
    # can run code (pickled here under a stand-in)
    fake = types.ModuleType("omegaconf")
    DictConfig = type("DictConfig", (dict,), {"__module__": "omegaconf", "__qualname__": "DictConfig"})
    fake.DictConfig = DictConfig
    sys.modules["omegaconf"] = fake
    try:
        package = torch.load(os.path.join(ac_dir, "compression_state_dict.bin"), weights_only=False)
        package["xp.cfg"] = DictConfig(copy.deepcopy(package["xp.cfg"]))
        torch.save(package, src / "compression_state_dict.bin")
    finally:
        del sys.modules["omegaconf"]
    with pytest.raises(ConversionError, match="pickled omegaconf object.*OmegaConf.to_yaml"):
        mgjax.convert_checkpoint(str(src), str(tmp_path / "out"), t5_dir=t5_dir)


def test_pattern_settings_map_to_the_lm_pattern_keys():
    """audiocraft's `flatten_first` / `empty_initial` become `lm.pattern_flatten_first` / `lm.pattern_empty_initial`
    (they were refused before those keys existed); delays equal to the default are stored empty."""
    from mgjax.convert.audiocraft_config import _pattern

    delay = {"codebooks_pattern": {"modeling": "delay",
                                   "delay": {"delays": [0, 1, 2, 3], "flatten_first": 2, "empty_initial": 1}}}
    assert _pattern(delay, 4) == dict(pattern="delay", pattern_delays=(), pattern_flatten_first=2,
                                      pattern_empty_initial=1)
    parallel = {"codebooks_pattern": {"modeling": "parallel", "parallel": {"empty_initial": 3}}}
    assert _pattern(parallel, 4) == dict(pattern="parallel", pattern_empty_initial=3)
