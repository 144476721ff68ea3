"""A web page for mgjax: `python app.py` (or `make app`) serves a Gradio app on localhost.

Prompts (one per line), duration, seed, top-k / top-p / temperature / CFG, optional melody and continuation uploads,
a model picker (the shipped demo model and every converted checkpoint in `--checkpoints`). The first prompt's audio
plays while it is generated (`MusicGen.generate_stream`); when done, each prompt's clip is offered as a file,
levelled and written as `sample.py` writes it. Settings are checked by `mgjax.validation` (as the CLI checks its
flags) and a bad one is shown on the page. One generation runs at a time (Gradio's queue, concurrency 1).

Usage: python app.py [--port 7860] [--host 127.0.0.1] [--checkpoints checkpoints/]   (needs `pip install -e .[app]`)
"""
from __future__ import annotations

import argparse
import functools
import os
import tempfile

import numpy as np

from mgjax.audio import CONTAINERS, NORMALIZE_STRATEGIES, conform, normalize_audio, read_audio, write_audio
from mgjax.checkpoint import META_FILE

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mgjax", "assets", "demo")
DEMO_NAME = "demo (mgjax/assets/demo)"


def list_models(folder: str | None) -> dict[str, str]:
    """`{name shown: checkpoint directory}`: the demo model, then each converted checkpoint directly in `folder`."""
    models = {DEMO_NAME: DEMO}
    if folder and os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if os.path.isfile(os.path.join(path, META_FILE)):
                models[name] = path
    return models


@functools.lru_cache(maxsize=1)
def load_model(path: str):
    """The model last picked (one kept in memory)."""
    import mgjax
    return mgjax.MusicGen.load(path)


def read_upload(path: str | None, label: str, sample_rate: int, channels: int) -> np.ndarray | None:
    """An uploaded file as `[channels, N]` at `sample_rate` (as `sample.py` reads --continue / --melody)."""
    if not path:
        return None
    from mgjax.validation import InvalidInput
    try:
        return conform(*read_audio(path), sample_rate, channels)
    except (ValueError, FileNotFoundError) as err:
        raise InvalidInput(f"{label}: {err}") from None


def parse_prompts(text: str) -> list[str]:
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        from mgjax.validation import InvalidInput
        raise InvalidInput("prompts: write at least one description (one per line)")
    return prompts


def pcm_chunk(wav_CxN: np.ndarray) -> np.ndarray:
    """Float `[C, N]` -> int16 `[N, C]`, Gradio's audio layout (clipped, no levelling: the piece is not yet whole)."""
    return (np.clip(wav_CxN, -1.0, 1.0) * 32767).astype(np.int16).T


def write_clips(wavs: np.ndarray, sample_rate: int, normalize: str, container: str) -> list[str]:
    """Each `[C, N]` of `wavs [B, C, N]` levelled and written as `sample.py` does; the paths."""
    folder = tempfile.mkdtemp(prefix="mgjax-app-")
    paths = []
    for index, wav in enumerate(wavs):
        wav = normalize_audio(wav, sample_rate, normalize, compressor=True)
        paths.append(write_audio(os.path.join(folder, f"clip-{index + 1}{container}"), wav, sample_rate))
    return paths


def generate(model_name, prompts_text, duration, seed, top_k, top_p, temperature, cfg, melody_path, continue_path,
             normalize, container, *, models: dict[str, str]):
    """The page's generator: yields `(audio chunk, files, status)` updates while the music is made."""
    import gradio as gr

    from mgjax.validation import InvalidInput

    try:
        prompts = parse_prompts(prompts_text)
        mg = load_model(models[model_name])
        prompt_audio = read_upload(continue_path, "continuation", mg.sample_rate, mg.channels)
        melody = read_upload(melody_path, "melody", mg.sample_rate, 1)
        batch = len(prompts)
        stream = mg.generate_stream(
            prompts, duration, seed=seed, top_k=top_k, top_p=top_p, temperature=temperature, cfg_coef=cfg,
            prompt_audio=None if prompt_audio is None else np.repeat(prompt_audio[None], batch, axis=0),
            melody=None if melody is None else np.repeat(melody[None], batch, axis=0))
    except (InvalidInput, ValueError) as err:
        raise gr.Error(str(err), print_exception=False) from None
    chunks, seconds = [], 0.0
    for chunk in stream:
        chunks.append(chunk)
        seconds += chunk.shape[-1] / mg.sample_rate
        yield (mg.sample_rate, pcm_chunk(chunk[0])), None, f"Generating: {seconds:.1f} of {duration:g} s"
    paths = write_clips(np.concatenate(chunks, axis=-1), mg.sample_rate, normalize, container)
    yield None, paths, f"Finished: {len(paths)} clip(s) of {seconds:.1f} s"


def build_app(checkpoints: str | None = None):
    import gradio as gr

    models = list_models(checkpoints)
    with gr.Blocks(title="mgjax MusicGen") as page:
        gr.Markdown("# mgjax MusicGen\nText (and optionally a melody or an audio start) to music, heard while it "
                    "is made. The demo model knows the words of its synthetic corpus: instruments (sine pad, "
                    "chiptune lead, sawtooth bass, plucked string), keys, tempos, drums.")
        with gr.Row():
            with gr.Column():
                model = gr.Dropdown(list(models), value=DEMO_NAME, label="Model")
                prompts = gr.Textbox(label="Prompts (one per line)", lines=3,
                                     placeholder="a plucked string arpeggio in e minor with drums, 140 bpm")
                with gr.Row():
                    duration = gr.Number(value=8.0, label="Duration (s)")
                    seed = gr.Number(value=0, label="Seed", precision=0)
                with gr.Row():
                    top_k = gr.Number(value=250, label="Top-k", precision=0)
                    top_p = gr.Number(value=0.0, label="Top-p")
                    temperature = gr.Number(value=1.0, label="Temperature")
                    cfg = gr.Number(value=3.0, label="CFG")
                melody = gr.Audio(label="Melody (melody models)", type="filepath", sources=["upload"])
                continuation = gr.Audio(label="Continue this audio", type="filepath", sources=["upload"])
                with gr.Row():
                    normalize = gr.Dropdown(list(NORMALIZE_STRATEGIES), value="loudness", label="Levelling")
                    container = gr.Dropdown(list(CONTAINERS), value=".wav", label="File format")
                button = gr.Button("Generate", variant="primary")
            with gr.Column():
                status = gr.Textbox(label="Status", interactive=False)
                player = gr.Audio(label="Listen (streamed)", streaming=True, autoplay=True, interactive=False)
                files = gr.File(label="Download", file_count="multiple")
        inputs = [model, prompts, duration, seed, top_k, top_p, temperature, cfg, melody, continuation, normalize,
                  container]
        button.click(functools.partial(generate, models=models), inputs, [player, files, status],
                     concurrency_limit=1, concurrency_id="model")
    return page.queue(default_concurrency_limit=1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--checkpoints", default="checkpoints", help="folder of converted checkpoints to offer")
    args = parser.parse_args(argv)
    build_app(args.checkpoints).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
