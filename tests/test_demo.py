"""The demo-model path: caption tokenizer, training on audio encoded by a trained codec, export to a sampling
checkpoint, and the shipped demo checkpoint that `sample.py` uses by default."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import soundfile

from mgjax import checkpoint, sharding, synth
from mgjax.audio import loudness_lufs
from mgjax.api import MusicGen
from mgjax.codec.encodec import Codec
from mgjax.config import ConfigError, load_config, to_dict
from mgjax.text.tokenizer import load_tokenizer, tokenize, train_word_tokenizer

from helpers_scripts import load_script  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "mgjax", "assets", "demo")
BASE = ["train.batch_size=4", "train.max_text_tokens=24", "train.segment_duration=0.6", "train.log_every=1000",
        "train.warmup_steps=0", "train.total_steps=2", "train.train_text_encoder=true", "text.vocab_size=256",
        "train.tensorboard=false"]


def test_word_tokenizer_folds_case_and_keeps_t5_conventions(tmp_path):
    tok = load_tokenizer(train_word_tokenizer(["A calm pad in A minor", "an upbeat lead in C# major"],
                                              str(tmp_path / "tok")))
    ids, mask = tokenize(tok, ["a Calm lead in Bb minor", "unheard words"])
    words = tok.convert_ids_to_tokens(ids[0].tolist())
    assert words == ["a", "calm", "lead", "in", "<unk>", "minor", "</s>"]
    assert tok.convert_ids_to_tokens(ids[1].tolist()) == ["<unk>", "<unk>", "</s>"] + ["<pad>"] * 4
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1 and tok.unk_token_id == 2
    assert mask[1].tolist() == [1, 1, 1, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="no texts"):
        train_word_tokenizer(["", "  "], str(tmp_path / "empty"))


def test_word_tokenizer_key_styles_split_join_or_both(tmp_path):
    captions = ["A calm pad in A minor", "an upbeat lead in C# major, 120 bpm", "a bass in the key of Bb minor"]

    def words(keys, prompt):
        tok = load_tokenizer(train_word_tokenizer(captions, str(tmp_path / keys), keys=keys))
        ids, _ = tokenize(tok, [prompt])
        return [w for w in tok.convert_ids_to_tokens(ids[0].tolist()) if w != "<pad>"]

    assert words("split", "a pad in c# minor") == ["a", "pad", "in", "c", "#", "minor", "</s>"]
    assert words("word", "a pad in A Minor") == ["a", "pad", "in", "a minor", "</s>"]
    assert words("word", "a pad in a major") == ["a", "pad", "in", "<unk>", "</s>"]  # unseen key, not "a" "major"
    assert words("word", "a bad minor bass") == ["a", "<unk>", "<unk>", "bass", "</s>"]  # "bad minor" is no key
    assert words("both", "a pad in C# major") == ["a", "pad", "in", "c", "#", "major", "c#major", "</s>"]
    assert words("both", "a bad minor bass in bb minor") == ["a", "<unk>", "minor", "bass", "in", "bb", "minor",
                                                             "bbminor", "</s>"]
    with pytest.raises(ValueError, match="keys='joined'"):
        train_word_tokenizer(captions, str(tmp_path / "bad"), keys="joined")


def _train_cli():
    return load_script("train.py", "train_cli")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A 6-clip synth corpus (1 s clips), its tokenizer, and a codec checkpoint of train-tiny's codec."""
    root = tmp_path_factory.mktemp("demo")
    manifest = synth.generate_corpus(str(root / "corpus"), 6, seed=3, seconds=1.0)
    tokenizer_dir = train_word_tokenizer(_captions(manifest), str(root / "tokenizer"))
    codec_config = load_config("train-tiny").codec
    codec = Codec.from_config(codec_config, seed=7)
    codec_dir = checkpoint.save(str(root / "codec"), "codec", {"codec": to_dict(codec_config)},
                                {"codec": jax.tree.map(np.asarray, codec.params)})
    return {"root": root, "manifest": manifest, "tokenizer": tokenizer_dir, "codec": codec_dir,
            "codec_params": codec.params}


def _captions(manifest: str) -> list[str]:
    import json
    with open(manifest) as f:
        return [json.loads(line)["description"] for line in f]


def test_train_on_codec_checkpoint_and_export_a_sampling_checkpoint(corpus, tmp_path):
    cli = _train_cli()
    jax.set_mesh(sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    config = load_config("train-tiny", BASE + [f"train.data_dir={corpus['manifest']}",
                                               f"train.codec_checkpoint={corpus['codec']}",
                                               f"train.tokenizer_dir={corpus['tokenizer']}",
                                               f"train.output_dir={tmp_path / 'run'}"])
    result = cli.train_run(config, quiet=True, checkpoints=False)
    trainer = result["trainer"]
    assert trainer.step_count == 2 and all(np.isfinite(result["losses"]))
    assert result["codec"].config == config.codec  # the codec of train.codec_checkpoint encoded the data
    cli.export(config, trainer, result["codec"], str(tmp_path / "exported"), use_ema=False)

    mg = MusicGen.load(str(tmp_path / "exported"))
    assert mg.config.codec == config.codec and mg.config.lm == config.lm and mg.config.text == config.text
    for name, tree in (("lm", trainer.state.params["lm"]), ("text", trainer.state.params["text"]),
                       ("codec", corpus["codec_params"])):
        diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), tree, mg.params[name])
        assert max(jax.tree.leaves(diffs)) == 0.0, name
    out = mg.generate(["A calm sine pad in C major"], duration=0.4, greedy=True)
    assert out.codes.shape == (1, 4, 20) and np.isfinite(out.wav).all()


def test_train_refuses_a_codec_checkpoint_of_another_config(corpus, tmp_path):
    cli = _train_cli()
    config = load_config("train-tiny", BASE + [f"train.codec_checkpoint={corpus['codec']}", "codec.n_filters=8",
                                               f"train.data_dir={corpus['manifest']}",
                                               f"train.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="differs from the config's codec section"):
        cli.load_codec(config)


def test_train_cli_names_a_missing_codec_checkpoint(corpus, tmp_path, capsys):
    missing = tmp_path / "no-codec"
    status = _train_cli().main(["--config", "train-tiny", *BASE, f"train.codec_checkpoint={missing}",
                                f"train.data_dir={corpus['manifest']}", f"train.output_dir={tmp_path / 'run'}",
                                f"train.tokenizer_dir={corpus['tokenizer']}"])
    err = capsys.readouterr().err
    assert status == 2 and f"train.codec_checkpoint={missing} is not a directory" in err and "train_codec.py" in err


def test_tokenizer_cli_names_a_missing_or_captionless_manifest(tmp_path, capsys):
    from mgjax.text.tokenizer import main
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing.jsonl"), str(tmp_path / "tok")])
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"path": "a.wav"}\n')
    with pytest.raises(SystemExit):
        main([str(empty), str(tmp_path / "tok")])
    assert "no 'description'" in capsys.readouterr().err and not (tmp_path / "tok").exists()


# ----------------------------------------------------------------------------------------------- the shipped model

def test_shipped_demo_checkpoint_loads_and_follows_its_prompt():
    """The checkpoint in the repository loads, has its tokenizer, and generates audio that depends on the prompt."""
    mg = MusicGen.load(DEMO)
    assert mg.tokenizer is not None and mg.sample_rate == 32000
    ids, _ = tokenize(mg.tokenizer, ["in F# minor"])  # the `--keys both` tokenizer: key words and one key word
    assert mg.tokenizer.convert_ids_to_tokens(ids[0].tolist()) == ["in", "f", "#", "minor", "f#minor", "</s>"]
    prompts = ["A calm sine pad melody in C major, slow, 80 bpm",
               "An upbeat chiptune lead arpeggio in A minor with drums, 150 bpm"]
    out = mg.generate(prompts, duration=1.0, seed=0)
    assert out.wav.shape == (2, 1, 32000) and np.isfinite(out.wav).all()
    assert out.codes.min() >= 0 and out.codes.max() < mg.config.lm.card
    assert np.sqrt(np.mean(out.wav ** 2)) > 1e-3  # not silence
    assert not np.array_equal(out.codes[0], out.codes[1])
    again = mg.generate(prompts, duration=1.0, seed=0)
    np.testing.assert_array_equal(again.codes, out.codes)


def test_int8_copy_of_the_demo_model_samples_close_to_float32():
    """`with_int8_weights` leaves the float model untouched and greedy decoding mostly picks the same tokens."""
    mg = MusicGen.load(DEMO)
    fast = mg.with_int8_weights()
    assert fast.config.lm.weight_format == "int8" and fast.with_int8_weights() is fast
    assert fast.params["lm"]["layers"]["ffn"]["fc1"].dtype == np.int8
    assert mg.params["lm"]["layers"]["ffn"]["fc1"].dtype == np.float32 and mg.config.lm.weight_format != "int8"
    prompt = ["A calm sine pad melody in C major, slow, 80 bpm"]
    exact = mg.generate(prompt, duration=0.5, greedy=True)
    quick = fast.generate(prompt, duration=0.5, greedy=True)
    assert quick.wav.shape == exact.wav.shape and np.isfinite(quick.wav).all()
    agree = float(np.mean(quick.codes[:, 0] == exact.codes[:, 0]))
    assert agree >= 0.5, agree  # greedy paths may part after a near-tie; they start the same


def test_sample_cli_plays_the_demo_model_by_default(tmp_path):
    out = tmp_path / "demo.wav"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--prompt",
                             "a plucked string scale run in D major, 120 bpm", "--duration", "2", "--out", str(out),
                             "--no-progress"], capture_output=True, text=True, cwd=str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stderr
    wav, rate = soundfile.read(str(out))
    assert rate == 32000 and len(wav) == 64000 and np.abs(wav).max() > 0
    # written as audiocraft writes MusicGen's samples: -14 LUFS, then a tanh soft clip that only lowers it
    assert -16.0 < loudness_lufs(wav[None], rate) <= -13.99


def test_adherence_eval_runs_on_the_shipped_model(tmp_path, capsys):
    """bench/eval_adherence.py end to end on three held-out captions: the table, the ceiling, the speed and the
    caption sensitivity."""
    import json

    module = load_script(os.path.join("bench", "eval_adherence.py"), "eval_adherence")
    report = tmp_path / "adherence.json"
    assert module.main(["--clips", "3", "--batch", "3", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "| key |" in out and "real clips (ceiling)" in out and "s of audio per s" in out
    results = json.loads(report.read_text())["results"]
    assert set(results) == {"generated", "real clips (ceiling)", "real through the codec"}
    assert results["real clips (ceiling)"]["instrument"] == 1.0  # the estimators read clean clips right
    assert "major/minor swapped" in out
    losses = json.loads(report.read_text())["caption_sensitivity"]
    assert losses["another clip's caption"] > losses["as written"]  # the caption matters to the trained model
    assert list(json.loads(report.read_text())["loss_by_window"]) == ["s 0-4"]


def test_window_plan_writes_each_frame_once():
    """`window_plan`, which both `MusicGen.generate_windows` and the adherence eval's teacher-forced loss walk: window
    starts a stride apart, each frame written exactly once, a prompt's frames never."""
    from mgjax.api import window_plan
    assert window_plan(400, 200, 100) == [(0, 0), (100, 200), (200, 300)]
    assert window_plan(350, 200, 150) == [(0, 0), (150, 200)]
    assert window_plan(120, 200, 100) == [(0, 0)]
    assert window_plan(300, 200, 100, prompt_frames=50) == [(0, 50), (100, 200)]
    assert window_plan(40, 200, 100, prompt_frames=40) == []
    for frames, prompt in ((200, 0), (201, 0), (299, 0), (300, 30), (517, 0), (517, 150)):
        plan = window_plan(frames, 200, 100, prompt)
        ends = [min(start + 200, frames) for start, _ in plan]
        written = np.concatenate([np.arange(first, end) for (_, first), end in zip(plan, ends)])
        np.testing.assert_array_equal(written, np.arange(prompt, frames))
        assert [start for start, _ in plan] == list(range(0, 100 * len(plan), 100))


def test_adherence_eval_scores_long_clips_window_by_window():
    """Clips past the model's window are cut into whole windows (a short tail dropped); short clips give none."""
    module = load_script(os.path.join("bench", "eval_adherence.py"), "eval_adherence")
    wavs = np.arange(2 * 1 * 90, dtype=np.float32).reshape(2, 1, 90)  # 9 s at 10 Hz, 4 s window
    segments = module.window_segments(wavs, 10, 4.0)
    assert list(segments) == ["generated, s 0-4", "generated, s 4-8"]  # 1 s tail < half a window: dropped
    np.testing.assert_array_equal(segments["generated, s 4-8"], wavs[..., 40:80])
    assert list(module.window_segments(wavs[..., :70], 10, 4.0)) == ["generated, s 0-4", "generated, s 4-7"]
    assert module.window_segments(wavs[..., :40], 10, 4.0) == {}
