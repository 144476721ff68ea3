"""Codebook patterns: hand-written layouts (audiocraft's semantics), round trips, masks, logits shift, and the
`lm.pattern*` config keys."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgjax.config import ConfigError, LMConfig, load_config
from mgjax.lm.patterns import (PATTERNS, CoarseFirstPattern, DelayPattern, MusicLMPattern, ParallelPattern,
                               UnrolledPattern, get_pattern, pattern_from_config)

S = 99  # special token in the hand-written examples
A = np.array([[[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]])  # [B=1, K=3, T=4]


def random_pattern(name, k, rng):
    """A pattern of kind `name` with random (valid) parameters for k codebooks."""
    if name == "delay":
        return get_pattern(name, k, delays=sorted(rng.integers(0, 4, k).tolist()),
                           flatten_first=int(rng.choice([0, 0, 1, 3])), empty_initial=int(rng.choice([0, 0, -1, 2])))
    if name == "parallel":
        return get_pattern(name, k, empty_initial=int(rng.choice([0, -1, 1])))
    if name == "unroll":
        flattening = sorted(rng.integers(0, 3, k).tolist())
        group_delay, delay = {}, 0
        for inner in sorted(set(flattening)):
            delay += int(rng.integers(0, 3))
            group_delay[inner] = delay
        return get_pattern(name, k, flattening=flattening, delays=[group_delay[f] for f in flattening])
    if name == "coarse_first":
        return get_pattern(name, k, delays=sorted(rng.integers(0, 3, k - 1).tolist()))
    if name == "musiclm":
        return get_pattern(name, k, group_size=int(rng.choice([g for g in range(1, k + 1) if k % g == 0])))
    return get_pattern(name, k)


def random_cases(name, n=6):
    rng = np.random.default_rng(sum(map(ord, name)))
    cases = [(random_pattern(name, 1, rng), 1)]
    for _ in range(n):
        k, t = int(rng.integers(1, 9)), int(rng.integers(1, 65))
        cases.append((random_pattern(name, k, rng), t))
    return cases


ALL_CASES = [case for name in PATTERNS for case in random_cases(name)]


@pytest.mark.parametrize("pattern,timesteps", ALL_CASES, ids=lambda v: str(v))
def test_round_trip(pattern, timesteps):
    k = pattern.num_codebooks
    codes = np.random.default_rng(timesteps).integers(0, 50, (2, k, timesteps))
    seq = pattern.build(codes, 50)
    assert seq.shape == (2, k, pattern.steps(timesteps))
    if pattern.starts_with_special_token(timesteps):  # always, but with empty_initial=-1
        assert (seq[:, :, 0] == 50).all()
    else:
        assert pattern.empty_initial == -1 and (seq[:, :, 0] != 50).any()
    back, mask = pattern.revert(seq, 50)
    assert mask.shape == (k, timesteps) and mask.all()
    np.testing.assert_array_equal(back, codes)
    # every code appears exactly once in the full sequence
    assert (seq != 50).sum() == codes.size
    # the training sequence is a prefix of the generation one
    valid = pattern.build(codes, 50, valid_only=True)
    np.testing.assert_array_equal(valid, seq[:, :, :pattern.steps(timesteps, valid_only=True)])


@pytest.mark.parametrize("pattern,timesteps", ALL_CASES, ids=lambda v: str(v))
def test_revert_logits_predicts_next_step(pattern, timesteps):
    """Logits at step s one-hot on the token of step s + 1 (of step s itself for a layout without the leading
    empty step, as audiocraft) must revert to one-hots on the codes."""
    k, card = pattern.num_codebooks, 51
    codes = np.random.default_rng(timesteps + 1).integers(0, 50, (2, k, timesteps))
    shift = 1 if pattern.starts_with_special_token(timesteps) else 0
    for valid_only in (False, True):
        seq = pattern.build(codes, 50, valid_only=valid_only)
        next_tokens = np.concatenate([seq[:, :, shift:], np.full_like(seq[:, :, :shift], 50)], axis=2)
        logits = np.eye(card, dtype=np.float32)[next_tokens]  # [B, K, S, card]
        reverted, mask = pattern.revert_logits(logits, timesteps=timesteps)
        assert reverted.shape == (2, k, timesteps, card)
        np.testing.assert_array_equal(mask, pattern.revert(seq, 50, timesteps=timesteps)[1])
        np.testing.assert_array_equal(reverted.argmax(-1)[:, mask], codes[:, mask])
        assert (reverted[:, ~mask] == 0).all()
        if valid_only:  # the default T of revert_logits is the training one
            np.testing.assert_array_equal(pattern.revert_logits(logits)[1], mask)
        else:
            assert mask.all()


def test_delay_worked_example():
    p = get_pattern("delay", 3)
    expected = [[S, 1, 2, 3, 4, S, S],
                [S, S, 5, 6, 7, 8, S],
                [S, S, S, 9, 10, 11, 12]]
    np.testing.assert_array_equal(p.build(A, S)[0], expected)
    np.testing.assert_array_equal(p.build(A, S, valid_only=True)[0], np.array(expected)[:, :5])
    assert (p.steps(4), p.steps(4, valid_only=True)) == (7, 5)
    np.testing.assert_array_equal(p.step_map(4), [[-1, 0, 1, 2, 3, -1, -1],
                                                  [-1, -1, 0, 1, 2, 3, -1],
                                                  [-1, -1, -1, 0, 1, 2, 3]])


def test_delay_custom_delays_example():
    p = get_pattern("delay", 3, delays=[0, 2, 2])
    np.testing.assert_array_equal(p.build(A, S)[0], [[S, 1, 2, 3, 4, S, S],
                                                     [S, S, S, 5, 6, 7, 8],
                                                     [S, S, S, 9, 10, 11, 12]])


def test_delay_training_mask_by_hand():
    p = get_pattern("delay", 3)
    logits = np.arange(5, dtype=np.float32)[None, None, :, None] * np.ones((1, 3, 5, 1), np.float32)
    reverted, mask = p.revert_logits(logits)  # 5 = valid steps for T=4
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1],
                                         [1, 1, 1, 0],
                                         [1, 1, 0, 0]])
    # code (k, t) sits at step 1 + t + k and is predicted by the output of step t + k; masked ones are 0
    np.testing.assert_array_equal(reverted[0, :, :, 0], [[0, 1, 2, 3],
                                                         [1, 2, 3, 0],
                                                         [2, 3, 0, 0]])
    # T shorter than the delays: the delayed codebooks are not trained at all
    short = get_pattern("delay", 4)
    assert short.steps(2, valid_only=True) == 3
    _, mask = short.revert_logits(np.zeros((1, 4, 3, 8), np.float32))
    np.testing.assert_array_equal(mask, [[1, 1],
                                         [1, 0],
                                         [0, 0],
                                         [0, 0]])


def test_delay_flatten_first_example():
    """The first 2 timesteps one codebook per step, then the delayed layout from timestep 2 on."""
    p = get_pattern("delay", 3, flatten_first=2)
    np.testing.assert_array_equal(p.build(A, S)[0], [[S, 1, S, S, 2, S, S, 3, 4, S, S],
                                                     [S, S, 5, S, S, 6, S, S, 7, 8, S],
                                                     [S, S, S, 9, S, S, 10, S, S, 11, 12]])
    assert p.steps(4, valid_only=True) == 9  # max_delay = 2, as without flattening


def test_empty_initial_examples():
    """`empty_initial=N` adds N empty steps after the leading one; -1 (MAGNeT's configs) omits the leading one:
    the layout starts with codes and the output at step s is taken for the codes of step s."""
    np.testing.assert_array_equal(get_pattern("delay", 3, empty_initial=1).build(A, S)[0],
                                  [[S, S, 1, 2, 3, 4, S, S],
                                   [S, S, S, 5, 6, 7, 8, S],
                                   [S, S, S, S, 9, 10, 11, 12]])
    magnet = get_pattern("parallel", 3, empty_initial=-1)
    np.testing.assert_array_equal(magnet.build(A, S)[0], A[0])
    assert not magnet.starts_with_special_token(4) and magnet.steps(4, valid_only=True) == 4
    logits = np.eye(13, dtype=np.float32)[A]  # [1, K, S=T, card]: step s predicts the codes of step s
    reverted, mask = magnet.revert_logits(logits)
    assert mask.all()
    np.testing.assert_array_equal(reverted.argmax(-1), A)
    delayed = get_pattern("delay", 3, empty_initial=-1)
    np.testing.assert_array_equal(delayed.build(A, S)[0], [[1, 2, 3, 4, S, S],
                                                           [S, 5, 6, 7, 8, S],
                                                           [S, S, 9, 10, 11, 12]])
    assert not delayed.starts_with_special_token(4)
    # audiocraft decides the shift by the layout: delays that leave the first step empty keep the usual shift
    assert get_pattern("delay", 2, delays=[1, 2], empty_initial=-1).starts_with_special_token(4)
    assert get_pattern("delay", 3).starts_with_special_token(4)
    with pytest.raises(ValueError, match="empty_initial must be >= -1"):
        get_pattern("delay", 3, empty_initial=-2)


def test_partial_sequence_revert():
    p = get_pattern("delay", 3)
    seq = p.build(A, S)[:, :, :4]
    codes, mask = p.revert(seq, -1, timesteps=4)
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(codes[0], [[1, 2, 3, -1], [5, 6, -1, -1], [9, -1, -1, -1]])
    with pytest.raises(ValueError):
        p.revert(p.build(A, S), S, timesteps=3)  # longer than that layout


def test_parallel_example():
    np.testing.assert_array_equal(get_pattern("parallel", 3).build(A, S)[0], [[S, 1, 2, 3, 4],
                                                                              [S, 5, 6, 7, 8],
                                                                              [S, 9, 10, 11, 12]])


def test_unroll_examples():
    full = get_pattern("unroll", 3).build(A, S)[0]
    np.testing.assert_array_equal(full, [[S, 1, S, S, 2, S, S, 3, S, S, 4, S, S],
                                         [S, S, 5, S, S, 6, S, S, 7, S, S, 8, S],
                                         [S, S, S, 9, S, S, 10, S, S, 11, S, S, 12]])
    partial = get_pattern("unroll", 3, flattening=[0, 1, 1]).build(A, S)[0]
    np.testing.assert_array_equal(partial, [[S, 1, S, 2, S, 3, S, 4, S],
                                            [S, S, 5, S, 6, S, 7, S, 8],
                                            [S, S, 9, S, 10, S, 11, S, 12]])
    # delayed: codebooks 1-2 run 3 timesteps behind codebook 0; on equal keys the delayed step goes first
    p = get_pattern("unroll", 3, flattening=[0, 1, 1], delays=[0, 3, 3])
    np.testing.assert_array_equal(p.build(A, S)[0], [[S, 1, 2, 3, S, 4, S, S, S, S, S, S],
                                                     [S, S, S, S, 5, S, 6, S, 7, S, 8, S],
                                                     [S, S, S, S, 9, S, 10, S, 11, S, 12, S]])
    assert p.steps(4, valid_only=True) == 9  # max_delay = 3: the last 3 steps are not fed in training
    np.testing.assert_array_equal(p.revert_logits(np.zeros((1, 3, 9, 2)))[1], [[1, 1, 1, 1],
                                                                                [1, 1, 1, 0],
                                                                                [1, 1, 1, 0]])
    # a gap in the flattening leaves an empty inner step, which audiocraft's ordering puts first in its timestep
    gap = get_pattern("unroll", 2, flattening=[0, 2]).build(A[:, :2, :2], S)[0]
    np.testing.assert_array_equal(gap, [[S, S, 1, S, S, 2, S], [S, S, S, 5, S, S, 6]])


def test_coarse_first_example():
    np.testing.assert_array_equal(get_pattern("coarse_first", 3).build(A, S)[0],
                                  [[S, 1, 2, 3, 4, S, S, S, S],
                                   [S, S, S, S, S, 5, 6, 7, 8],
                                   [S, S, S, S, S, 9, 10, 11, 12]])
    delayed = get_pattern("coarse_first", 3, delays=[0, 1]).build(A[:, :, :2], S)[0]
    np.testing.assert_array_equal(delayed, [[S, 1, 2, S, S, S], [S, S, S, 5, 6, S], [S, S, S, S, 9, 10]])


def test_musiclm_example():
    codes = np.arange(1, 9).reshape(1, 4, 2)  # rows [1 2] [3 4] [5 6] [7 8]
    np.testing.assert_array_equal(get_pattern("musiclm", 4, group_size=2).build(codes, S)[0],
                                  [[S, 1, S, 2, S, S, S, S, S],
                                   [S, S, 3, S, 4, S, S, S, S],
                                   [S, S, S, S, S, 5, S, 6, S],
                                   [S, S, S, S, S, S, 7, S, 8]])


def test_first_step_with_timestep():
    delay = get_pattern("delay", 4)
    assert [delay.first_step_with_timestep(t, 10) for t in (0, 1, 9)] == [1, 2, 10]
    assert delay.first_step_with_timestep(2, 10, codebook=3) == 6
    unroll = get_pattern("unroll", 3)
    assert unroll.first_step_with_timestep(2, 5) == 7
    coarse = get_pattern("coarse_first", 2)
    assert coarse.first_step_with_timestep(0, 5, codebook=1) == 6
    with pytest.raises(ValueError):
        delay.first_step_with_timestep(10, 10)


def test_jit_matches_numpy():
    p = get_pattern("delay", 4)
    codes = np.random.default_rng(0).integers(0, 8, (2, 4, 9)).astype(np.int32)

    @jax.jit
    def round_trip(c):
        seq = p.build(c, 8)
        return seq, p.revert(seq, 8)[0]

    seq, back = round_trip(jnp.asarray(codes))
    np.testing.assert_array_equal(np.asarray(seq), p.build(codes, 8))
    np.testing.assert_array_equal(np.asarray(back), codes)

    logits = np.random.default_rng(1).normal(size=(2, 4, p.steps(9, valid_only=True), 3)).astype(np.float32)
    reverted = jax.jit(lambda x: p.revert_logits(x)[0])(jnp.asarray(logits))
    np.testing.assert_array_equal(np.asarray(reverted), p.revert_logits(logits)[0])


def test_maps_are_cached_and_read_only():
    p = get_pattern("delay", 4)
    assert p.step_map(11) is get_pattern("delay", 4, delays=[0, 1, 2, 3]).step_map(11)
    with pytest.raises(ValueError):
        p.step_map(11)[0, 0] = 5


def test_unknown_name():
    with pytest.raises(ValueError, match="'zigzag'.*delay, parallel, unroll, coarse_first, musiclm"):
        get_pattern("zigzag", 4)


@pytest.mark.parametrize("name,kwargs", [
    ("delay", {"delays": [1, 0, 2]}),  # not sorted
    ("delay", {"delays": [0, 1]}),  # wrong length
    ("unroll", {"flattening": [0, 1, 1], "delays": [0, 1, 2]}),  # one inner step, two delays
    ("coarse_first", {"delays": [0, 0, 0]}),  # needs K-1
    ("musiclm", {"group_size": 2}),  # does not divide 3
    ("parallel", {"delays": [0, 0, 0]}),  # takes no delays
])
def test_invalid_parameters(name, kwargs):
    with pytest.raises(ValueError):
        get_pattern(name, 3, **kwargs)


def test_pattern_from_config():
    assert pattern_from_config(LMConfig()) == DelayPattern(4, (0, 1, 2, 3))
    cfg = dataclasses.replace(LMConfig(), pattern="unroll", pattern_flattening=(0, 1, 1, 2),
                              pattern_delays=(0, 1, 1, 2))
    assert pattern_from_config(cfg) == UnrolledPattern(4, (0, 1, 1, 2), (0, 1, 1, 2))
    assert pattern_from_config(dataclasses.replace(LMConfig(), pattern="coarse_first")) == CoarseFirstPattern(4)
    cfg = dataclasses.replace(LMConfig(), pattern="musiclm", pattern_group_size=4)
    assert pattern_from_config(cfg) == MusicLMPattern(4, 4)
    # audiocraft's musiclm groups codebooks by 2 unless told otherwise
    assert pattern_from_config(dataclasses.replace(LMConfig(), pattern="musiclm")) == MusicLMPattern(4, 2)
    cfg = dataclasses.replace(LMConfig(), pattern_flatten_first=2, pattern_empty_initial=1)
    assert pattern_from_config(cfg) == DelayPattern(4, (0, 1, 2, 3), flatten_first=2, empty_initial=1)
    cfg = dataclasses.replace(LMConfig(), pattern="parallel", pattern_empty_initial=2)
    assert pattern_from_config(cfg) == ParallelPattern(4, empty_initial=2)
    with pytest.raises(ValueError, match="flatten_first"):
        pattern_from_config(dataclasses.replace(LMConfig(), pattern="parallel", pattern_flatten_first=1))
    with pytest.raises(ValueError, match="flattening"):
        pattern_from_config(dataclasses.replace(LMConfig(), pattern="delay", pattern_flattening=(0, 1, 2, 3)))
    with pytest.raises(ValueError, match="nope"):
        pattern_from_config(dataclasses.replace(LMConfig(), pattern="nope"))


def test_config_checks_the_pattern_when_loaded():
    """Every `lm.pattern*` key is checked by the pattern itself when the config loads (one registry: the names
    are `PATTERNS`'), and a layout without the leading special step is refused for MusicGen's causal LM."""
    with pytest.raises(ConfigError, match=f"unknown lm.pattern 'zigzag'; choose one of {', '.join(PATTERNS)}$"):
        load_config("tiny", ["lm.pattern=zigzag"])
    with pytest.raises(ConfigError, match="lm.pattern=delay: delays needs one entry per codebook"):
        load_config("tiny", ["lm.pattern_delays=[0,1]"])
    with pytest.raises(ConfigError, match="lm.pattern=unroll: .*takes no flatten_first"):
        load_config("tiny", ["lm.pattern=unroll", "lm.pattern_flatten_first=1"])
    with pytest.raises(ConfigError, match="lm.pattern_empty_initial=-1 omits the leading special step"):
        load_config("tiny", ["lm.pattern=parallel", "lm.pattern_empty_initial=-1"])
    config = load_config("tiny", ["lm.pattern=delay", "lm.pattern_flatten_first=2", "lm.pattern_empty_initial=1"])
    assert pattern_from_config(config.lm) == DelayPattern(4, (0, 1, 2, 3), flatten_first=2, empty_initial=1)
