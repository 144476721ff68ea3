"""MusicGen decoder LM: teacher-forced parity with transformers (random weights), cached decoding, converter."""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mgjax.config import ConfigError, LMConfig
from mgjax.convert.hf_lm import lm_config_from_hf, lm_params_from_hf
from mgjax.kernels.cpu import gelu_mlp, split_for_decoding
from mgjax.lm.kv_cache import stack_layers
from mgjax.lm.model import MusicGenLM
from mgjax.lm.patterns import pattern_from_config
from mgjax.lm.transformer import sinusoidal_positions
import oracle
from oracle import TEXT

torch.set_num_threads(1)
TOL = 1e-4

# Decoder shapes vary in depth, width, heads, codebooks and card (odd included).
DECODERS = {
    "d32_l2_h4_k4": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48, num_codebooks=4,
                         vocab_size=24),
    "d36_l3_h3_k2": dict(hidden_size=36, num_hidden_layers=3, num_attention_heads=3, ffn_dim=40, num_codebooks=2,
                         vocab_size=17),
}


def _oracle(dec: dict, melody: bool = False, **top):
    """The oracle (`tests/oracle.py`) for decoder `dec`: `oracle.musicgen` / `oracle.musicgen_melody`, but with a
    codec of 16 codes, since oracle's codec takes the decoder's card and these cards (24, 17) are no power of
    two; every weight drawn by `oracle.randomise`."""
    text = transformers.T5Config(**TEXT)
    audio = oracle.codec_config(1, 16)
    decoder_cls = transformers.MusicgenMelodyDecoderConfig if melody else transformers.MusicgenDecoderConfig
    decoder = decoder_cls(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, max_position_embeddings=64,
                          pad_token_id=dec["vocab_size"], bos_token_id=dec["vocab_size"], **dec)
    if melody:
        config = transformers.MusicgenMelodyConfig(text_encoder=text, audio_encoder=audio, decoder=decoder, **top)
        return oracle.randomise(transformers.MusicgenMelodyForConditionalGeneration(config))
    config = transformers.MusicgenConfig(text_encoder=text, audio_encoder=audio, decoder=decoder, **top)
    return oracle.randomise(transformers.MusicgenForConditionalGeneration(config))


def _inputs(card: int, num_codebooks: int, seq: int, text_len: int = 7, seed: int = 1):
    """Codes `[2, K, S]` with the special token in column 0 and sprinkled elsewhere; text ids with row 1 padded."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, card, size=(2, num_codebooks, seq))
    codes = np.where(rng.random(codes.shape) < 0.15, card, codes)
    codes[:, :, 0] = card
    ids = rng.integers(1, TEXT["vocab_size"], size=(2, text_len))
    mask = np.ones((2, text_len), np.int64)
    mask[1, text_len - 3:] = 0
    return codes.astype(np.int64), np.where(mask, ids, 0), mask


def _ours(model: torch.nn.Module, melody: bool = False):
    cfg = lm_config_from_hf(model.config.to_dict())
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return cfg, lm_params_from_hf(state, cfg)


def _text_states(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        return model.text_encoder(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_cross_parity_with_transformers(name):
    dec = DECODERS[name]
    model = _oracle(dec)
    K, card = dec["num_codebooks"], dec["vocab_size"]
    codes, ids, mask = _inputs(card, K, seq=11)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    decoder_input_ids=torch.tensor(codes.reshape(2 * K, -1))).logits.numpy()
    ref = ref.reshape(2, K, codes.shape[-1], card)

    cfg, params = _ours(model)
    assert cfg.num_codebooks == K and cfg.card == card and cfg.conditioning == "cross"
    cond = _text_states(model, ids, mask)
    logits = MusicGenLM(cfg).apply({"params": params}, jnp.asarray(codes, jnp.int32), jnp.asarray(cond),
                                   jnp.asarray(mask))
    assert logits.shape == (2, K, codes.shape[-1], card) and logits.dtype == jnp.float32
    err = float(np.abs(np.asarray(logits) - ref).max())
    print(f"{name}: max abs err {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize("chroma_frames", [None, 3])
def test_melody_prepend_parity_with_transformers(chroma_frames):
    dec = DECODERS["d32_l2_h4_k4"]
    model = _oracle(dec, melody=True, num_chroma=12, chroma_length=8)
    K, card = dec["num_codebooks"], dec["vocab_size"]
    codes, ids, mask = _inputs(card, K, seq=9, text_len=6)
    chroma = None
    if chroma_frames:
        chroma = np.eye(12, dtype=np.float32)[np.random.default_rng(3).integers(0, 12, (2, chroma_frames))]
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    input_features=None if chroma is None else torch.tensor(chroma),
                    decoder_input_ids=torch.tensor(codes.reshape(2 * K, -1))).logits.numpy()
    prefix = 8 + ids.shape[1]
    assert ref.shape[1] == prefix + codes.shape[-1]
    ref = ref[:, prefix:].reshape(2, K, codes.shape[-1], card)

    cfg, params = _ours(model, melody=True)
    assert cfg.conditioning == "prepend" and cfg.chroma_length == 8 and cfg.num_chroma == 12
    cond = _text_states(model, ids, mask)
    logits = MusicGenLM(cfg).apply({"params": params}, jnp.asarray(codes, jnp.int32), jnp.asarray(cond),
                                   jnp.asarray(mask), chroma=None if chroma is None else jnp.asarray(chroma))
    err = float(np.abs(np.asarray(logits) - ref).max())
    print(f"melody chroma={chroma_frames}: max abs err {err:.2e}")
    assert err <= TOL


def _random_lm(conditioning: str, remat: bool = False):
    cfg = LMConfig(dim=32, num_layers=2, num_heads=4, ffn_dim=48, num_codebooks=3, card=20,
                   conditioning=conditioning, chroma_length=5, remat=remat)
    model = MusicGenLM(cfg)
    codes, _, mask = _inputs(cfg.card, cfg.num_codebooks, seq=9, text_len=6)
    cond = np.random.default_rng(2).normal(size=(2, 6, 24)).astype(np.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.asarray(codes, jnp.int32),
                                                  jnp.asarray(cond), jnp.asarray(mask)))
    # random numpy params of the init's shapes (eager init compiles one op per shape: slow); norms not at 1/0
    rng = np.random.default_rng(4)
    params = jax.tree.map(lambda x: (rng.normal(size=x.shape) * x.shape[-1] ** -0.5).astype(np.float32),
                          flax.linen.meta.unbox(variables["params"]))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 1.0 if jax.tree_util.keystr(p).endswith("['scale']") else x, params)
    return model, params, jnp.asarray(codes, jnp.int32), jnp.asarray(cond), jnp.asarray(mask)


def _decode_all(model, params, codes, cache, layer_params=None):
    """A 3-column prompt in one call, then one column per step -> (logits `[B, K, S, card]`, final cache)."""
    step = jax.jit(lambda c, x: model.apply({"params": params}, x, c, layer_params, method=MusicGenLM.decode_step))
    logits, cache = step(cache, codes[:, :, :3])
    outs = [logits]
    for t in range(3, codes.shape[-1]):
        logits, cache = step(cache, codes[:, :, t:t + 1])
        outs.append(logits)
    return jnp.concatenate(outs, axis=2), cache


@pytest.mark.parametrize("split", [False, True], ids=["scanned", "split"])
@pytest.mark.parametrize("conditioning", ["cross", "prepend"])
def test_cached_decoding_matches_teacher_forcing(conditioning, split):
    model, params, codes, cond, mask = _random_lm(conditioning)
    full = model.apply({"params": params}, codes, cond, mask)
    seq = codes.shape[-1]
    cache = model.apply({"params": params}, cond, mask, max_length=seq, method=MusicGenLM.prefill)
    layer_params = None
    if split:
        layer_params, cache = split_for_decoding(params["layers"], cache)
        assert len(layer_params) == len(cache["k"]) == model.config.num_layers
    logits, cache = _decode_all(model, params, codes, cache, layer_params)
    err = float(jnp.abs(logits - full).max())
    print(f"cached {conditioning} ({'split' if split else 'scanned'}): max abs err {err:.2e}")
    assert err <= 1e-5
    assert int(cache["index"]) == seq + (0 if conditioning == "cross" else 5 + cond.shape[1])


def test_split_decoding_in_bfloat16_is_within_its_rounding():
    model, params, codes, cond, mask = _random_lm("cross")
    bf16 = MusicGenLM(model.config.__class__(**{**model.config.__dict__, "compute_dtype": "bfloat16"}))
    cache = bf16.apply({"params": params}, cond, mask, max_length=codes.shape[-1], method=MusicGenLM.prefill)
    scanned, _ = _decode_all(bf16, params, codes, cache)
    layer_params, split_cache = split_for_decoding(params["layers"], cache)
    split, _ = _decode_all(bf16, params, codes, split_cache, layer_params)
    assert split.dtype == scanned.dtype == jnp.float32
    assert float(jnp.abs(split - scanned).max()) <= 2 ** -6 * float(jnp.abs(scanned).max())


@pytest.mark.parametrize("conditioning", ["cross", "prepend"])
def test_split_decoding_writes_the_same_cache(conditioning):
    """Layers run one by one on split weights leave the KV cache the scan leaves, layer by layer."""
    model, params, codes, cond, mask = _random_lm(conditioning)
    cache = model.apply({"params": params}, cond, mask, max_length=codes.shape[-1], method=MusicGenLM.prefill)
    _, scanned = _decode_all(model, params, codes, cache)
    layer_params, split_cache = split_for_decoding(params["layers"], cache)
    _, split = _decode_all(model, params, codes, split_cache, layer_params)
    restacked = stack_layers(split)
    for name in ("k", "v"):
        assert float(jnp.abs(restacked[name] - scanned[name]).max()) <= 1e-5
        assert float(jnp.abs(scanned[name]).max()) > 0  # the decoding steps wrote the cache


def test_null_condition_and_remat():
    model, params, codes, cond, mask = _random_lm("cross")
    remat_model = MusicGenLM(model.config.__class__(**{**model.config.__dict__, "remat": True}))
    a = model.apply({"params": params}, codes, cond, mask)
    b = remat_model.apply({"params": params}, codes, cond, mask)
    assert float(jnp.abs(a - b).max()) <= 1e-6
    # CFG's null condition (zero states, zero mask) gives finite logits equal to zero cross-attention output
    null = model.apply({"params": params}, codes, jnp.zeros_like(cond), jnp.zeros_like(mask))
    assert bool(jnp.isfinite(null).all())
    zeroed = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if "cross_attn" in jax.tree_util.keystr(p) and "out_proj" in
        jax.tree_util.keystr(p) else x, params)
    no_cross = model.apply({"params": zeroed}, codes, cond, mask)
    assert float(jnp.abs(null - no_cross).max()) <= 1e-5


def test_bfloat16_compute_runs():
    model, params, codes, cond, mask = _random_lm("cross")
    bf16 = MusicGenLM(model.config.__class__(**{**model.config.__dict__, "compute_dtype": "bfloat16"}))
    out = bf16.apply({"params": params}, codes, cond, mask)
    ref = model.apply({"params": params}, codes, cond, mask)
    assert out.dtype == jnp.float32
    assert float(jnp.abs(out - ref).max()) < 0.1 * float(jnp.abs(ref).max())


def test_feed_forward_gradients_match_torch_autograd():
    """`gelu_mlp` writes its backward by hand: its value and its gradients in x, fc1, fc2 must be torch's."""
    rng = np.random.default_rng(0)
    x, fc1, fc2 = (rng.standard_normal(shape).astype(np.float32) for shape in ((2, 5, 8), (8, 16), (16, 8)))
    fc1, fc2 = fc1 * 0.5, fc2 * 0.5
    cotangent = rng.standard_normal((2, 5, 8)).astype(np.float32)
    value, grads = jax.value_and_grad(lambda *a: jnp.sum(gelu_mlp(*a) * cotangent), argnums=(0, 1, 2))(x, fc1, fc2)
    leaves = [torch.tensor(a, requires_grad=True) for a in (x, fc1, fc2)]
    ref = (torch.nn.functional.gelu(leaves[0] @ leaves[1]) @ leaves[2] * torch.from_numpy(cotangent)).sum()
    ref.backward()
    assert abs(float(value) - ref.item()) <= 1e-4
    for grad, leaf in zip(grads, leaves):
        assert grad.shape == leaf.shape
        assert np.max(np.abs(np.asarray(grad) - leaf.grad.numpy())) <= 1e-5


def test_sinusoidal_positions_match_transformers():
    from transformers.models.musicgen.modeling_musicgen import MusicgenSinusoidalPositionalEmbedding
    for dim in (32, 7):
        ref = MusicgenSinusoidalPositionalEmbedding.get_embedding(40, dim).numpy()
        ours = np.asarray(sinusoidal_positions(jnp.arange(40), dim))
        np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_converted_tree_matches_init_and_errors_name_keys():
    dec = DECODERS["d36_l3_h3_k2"]
    model = _oracle(dec)
    cfg, params = _ours(model)
    variables = jax.eval_shape(lambda: MusicGenLM(cfg).init(
        jax.random.key(0), jnp.zeros((1, cfg.num_codebooks, 4), jnp.int32), jnp.zeros((1, 3, TEXT["d_model"])),
        jnp.ones((1, 3), jnp.int32)))
    expected = flax.linen.meta.unbox(variables["params"])
    assert jax.tree.structure(expected) == jax.tree.structure(params)
    assert jax.tree.map(lambda x: x.shape, expected) == jax.tree.map(lambda x: x.shape, params)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))

    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    missing = "decoder.model.decoder.layers.1.encoder_attn.k_proj.weight"
    with pytest.raises(KeyError, match=missing.replace(".", r"\.")):
        lm_params_from_hf({k: v for k, v in state.items() if k != missing}, cfg)
    with pytest.raises(KeyError, match="enc_to_dec_proj.weight"):
        lm_params_from_hf({k: v for k, v in state.items() if not k.startswith("enc_to_dec")}, cfg)


def test_config_from_hf_dict():
    full = {"model_type": "musicgen", "decoder": {"hidden_size": 1024, "num_hidden_layers": 24,
                                                  "num_attention_heads": 16, "ffn_dim": 4096, "vocab_size": 2048,
                                                  "num_codebooks": 8, "audio_channels": 2}}
    cfg = lm_config_from_hf(full)
    assert (cfg.dim, cfg.num_layers, cfg.num_heads, cfg.ffn_dim, cfg.card) == (1024, 24, 16, 4096, 2048)
    assert cfg.audio_channels == 2 and cfg.pattern_delays == () and cfg.conditioning == "cross"
    assert pattern_from_config(cfg).delays == (0, 0, 1, 1, 2, 2, 3, 3)  # stereo's default: both channels alike
    melody = lm_config_from_hf({"model_type": "musicgen_melody", "num_chroma": 12, "chroma_length": 235,
                                "decoder": full["decoder"] | {"num_codebooks": 4, "audio_channels": 1}})
    assert melody.conditioning == "prepend" and melody.chroma_length == 235 and melody.pattern_delays == ()
    with pytest.raises(ConfigError, match="activation_function"):
        lm_config_from_hf({"decoder": {"activation_function": "relu"}})


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_parameter_gradients_match_transformers(name):
    """The train step's backward (hand-written for the projections, the feed-forward and the heads) against torch
    autograd: the gradient of sum(logits * cotangent) in every decoder parameter. Torch's gradients go through the
    weight converter (linear in the weights, so it maps gradients as it maps weights)."""
    dec = DECODERS[name]
    model = _oracle(dec)
    K, card = dec["num_codebooks"], dec["vocab_size"]
    codes, ids, mask = _inputs(card, K, seq=11)
    cotangent = np.random.default_rng(5).standard_normal((2, K, codes.shape[-1], card)).astype(np.float32)
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                decoder_input_ids=torch.tensor(codes.reshape(2 * K, -1))).logits
    (out.reshape(cotangent.shape) * torch.from_numpy(cotangent)).sum().backward()
    grads = {key: np.zeros(value.shape, np.float32) for key, value in model.state_dict().items()}
    grads.update({key: p.grad.numpy() for key, p in model.named_parameters() if p.grad is not None})

    cfg, params = _ours(model)
    ref = lm_params_from_hf(grads, cfg)
    cond = jnp.asarray(_text_states(model, ids, mask))

    def objective(p):
        logits = MusicGenLM(cfg).apply({"params": p}, jnp.asarray(codes, jnp.int32), cond, jnp.asarray(mask))
        return jnp.sum(logits * cotangent)

    ours = jax.grad(objective)(params)
    flat_ours, flat_ref = flax.traverse_util.flatten_dict(ours), flax.traverse_util.flatten_dict(ref)
    assert flat_ours.keys() == flat_ref.keys()
    for key, expected in flat_ref.items():
        scale = max(1.0, float(np.abs(expected).max()))
        err = float(np.abs(np.asarray(flat_ours[key]) - expected).max())
        print(f"{name} {'/'.join(key)}: max |grad| {scale:.1f}, max abs err {err:.2e}")
        assert err <= TOL * scale, key


@pytest.mark.parametrize("spec, x_shape, w_shape", [
    ("btd,dhk->bthk", (2, 5, 6), (6, 3, 4)),    # one contracted axis: a rows_matmul
    ("bthk,hkd->btd", (2, 5, 3, 4), (3, 4, 6)),  # two contracted axes, flattened
    ("btd,kdc->bktc", (2, 5, 6), (3, 6, 7)),    # weight axis ahead of the contracted one: the einsum
])
def test_float_project_is_the_einsum_with_its_gradients(spec, x_shape, w_shape):
    from mgjax.kernels.cpu import einsum as float_project
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(x_shape).astype(np.float32), rng.standard_normal(w_shape).astype(np.float32)
    out_shape = jnp.einsum(spec, x, w).shape
    cotangent = rng.standard_normal(out_shape).astype(np.float32)
    ours = jax.value_and_grad(lambda a, b: jnp.sum(float_project(spec, a, b) * cotangent), argnums=(0, 1))(x, w)
    ref = jax.value_and_grad(lambda a, b: jnp.sum(jnp.einsum(spec, a, b) * cotangent), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5)
    for got, expected in zip(ours[1], ref[1]):
        np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("spec, x_shape, w_shape, contracted", [
    ("btd,dhk->bthk", (2, 5, 6), (6, 3, 4), (0,)),       # q/k/v projections
    ("bthk,hkd->btd", (2, 5, 3, 4), (3, 4, 6), (0, 1)),  # output projection: two contracted axes
    ("btd,kdc->btkc", (2, 1, 6), (3, 6, 7), (1,)),       # heads (codebook axis first), one decoding position
])
def test_int8_project_is_the_quantised_einsum(spec, x_shape, w_shape, contracted):
    """int8 weights are stored with their contracted axes last; `project` gives what the float-layout einsum of the
    dequantised weight and the per-row quantised x gives."""
    from mgjax.lm.transformer import project, quantize_weight
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(x_shape).astype(np.float32), rng.standard_normal(w_shape).astype(np.float32)
    quantized, scale = quantize_weight(w, contracted)
    assert quantized.shape == tuple(np.delete(w_shape, contracted)) + tuple(np.take(w_shape, contracted))
    dequantised = np.moveaxis(np.asarray(quantized, np.float32), range(-len(contracted), 0), contracted)
    dequantised = dequantised * np.expand_dims(np.asarray(scale), contracted)
    assert np.abs(dequantised - w).max() <= np.abs(w).max() / 127  # the float layout comes back
    x_axes = tuple(range(len(x_shape) - len(contracted), len(x_shape)))
    x_scale = np.abs(x).max(axis=x_axes, keepdims=True) / 127.0 + 1e-30
    expected = np.einsum(spec, np.round(x / x_scale) * x_scale, dequantised)
    got = np.asarray(project(spec, jnp.asarray(x), (quantized, scale), jnp.float32))
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    assert np.abs(got - np.einsum(spec, x, w)).max() <= 0.05 * np.abs(expected).max()  # and close to float32


def test_int8_project_refuses_a_spec_it_cannot_flatten():
    from mgjax.lm.transformer import project, quantize_weight
    with pytest.raises(ValueError, match="int8 projection 'btd,kdc->bktc'"):
        project("btd,kdc->bktc", jnp.ones((2, 1, 6)), quantize_weight(jnp.ones((3, 6, 7)), (1,)), jnp.float32)
