"""Streaming generation: the windowed, chunked sampling loop (`MusicGen.iter_windows`) feeding an incremental codec
decode (`codec.streaming.StreamingDecoder`), so audio comes out while the LM is still sampling.

After each compiled call of `chunk_steps` pattern steps, the frames whose K codes are all sampled
(`sampling.complete_frames`: with the delay pattern a frame completes K - 1 steps after its first code) are handed
to the decoder, which returns the audio whose right context is known. Windows past `lm.max_duration` chain as in
`generate` (each later window's prompt frames were already streamed). Stereo models decode left and right as two
batch rows of the mono codec, as `MusicGen.decode` does. The LM samples on a thread of its own, the decoder runs
on the caller's (`stream_generation`).
"""
from __future__ import annotations

import contextlib
import queue
import threading
from typing import Callable, Iterator, Optional

import jax
import numpy as np

from mgjax.audio import channels_from_batch, codes_to_batch
from mgjax.codec.streaming import StreamingDecoder
from mgjax.sampling import SamplingConfig, complete_frames


class AudioStream:
    """A model's codes `[B, K, t]` pushed in order -> its audio `[B, C, n]` (mono or stereo model)."""

    def __init__(self, mg, batch: int, chunk_frames: int = 16):
        self.stereo = mg.config.lm.audio_channels == 2
        self.batch = batch
        self.decoder = StreamingDecoder(mg.codec, 2 * batch if self.stereo else batch, chunk_frames)

    @property
    def lookahead_frames(self) -> int:
        return self.decoder.lookahead_frames

    def push(self, codes_BxKxT: np.ndarray, final: bool = False) -> np.ndarray:
        if not self.stereo:
            return self.decoder.push(codes_BxKxT, final)
        return channels_from_batch(self.decoder.push(codes_to_batch(codes_BxKxT), final), self.batch)


def stream_generation(mg, cond, mask, duration: float, sampling: SamplingConfig, seed: int, *, melody=None,
                      melody_sample_rate: Optional[int] = None, prompt_audio=None,
                      prompt_sample_rate: Optional[int] = None, chunk_steps: int,
                      progress: Optional[Callable[[int, int], None]] = None) -> Iterator[np.ndarray]:
    """Yields `[B, C, n]` float32 chunks (n > 0) of `mg._generate_from_text_states(...)`'s audio, from T5 states
    `cond [B, L, D]` and `mask [B, L]`; the prompt's own audio comes first (as in `generate`'s output).

    The LM samples on its own thread (`_sample_pieces`), handing each call's complete frames over a queue, and the
    decoder runs on the caller's: XLA's CPU client runs the programs one thread dispatches one after another, so
    from one thread every decode would wait for the LM call dispatched before it; from two they run side by side,
    and the LM never waits for the decoder (nor for the caller). `progress` is called on the caller's thread, as
    each call's frames are taken."""
    frames = mg.frames_for(duration)
    prompt_codes = mg._prompt_codes(prompt_audio, prompt_sample_rate, cond.shape[0], frames)
    stream = AudioStream(mg, cond.shape[0], chunk_steps)
    chunks = mg.iter_windows(cond, mask, prompt_codes, frames, sampling, jax.random.key(seed), melody=melody,
                             melody_sample_rate=melody_sample_rate or mg.sample_rate, steps_per_call=chunk_steps)
    with _sample_pieces(mg, chunks, frames) as pieces:
        stream.decoder.compile()  # while the LM compiles its first programs on its thread
        for done, total, codes in pieces:
            if progress is not None:
                progress(done, total)
            wav = stream.push(codes)
            if wav.shape[-1]:
                yield wav
    wav = stream.push(np.zeros((cond.shape[0], mg.config.lm.num_codebooks, 0), np.int32), final=True)
    if wav.shape[-1]:
        yield wav


@contextlib.contextmanager
def _sample_pieces(mg, chunks, frames: int) -> Iterator[Iterator[tuple[int, int, np.ndarray]]]:
    """Runs the window walk `chunks` (`MusicGen.iter_windows`) on a thread of its own; yields an iterator of
    `(steps done, steps total, codes [B, K, t])`: each call's newly complete frames of the piece, in order. Leaving
    the block (the stream finished, failed or abandoned) stops the thread after its current call and joins it."""
    handed: queue.Queue = queue.Queue()
    stop = threading.Event()

    def sample() -> None:
        try:
            sent = 0  # frames of the piece handed over
            for chunk in chunks:
                complete = complete_frames(mg.config.lm, chunk.codes.shape[-1], chunk.prompt_frames, chunk.done)
                known = min(frames, chunk.start + complete)
                handed.put((chunk.steps_before + chunk.done, chunk.steps_all,
                            chunk.codes[:, :, sent - chunk.start: known - chunk.start]))
                sent = max(sent, known)
                if stop.is_set():
                    return
            handed.put(None)
        except BaseException as error:  # raised again on the caller's thread
            handed.put(error)

    def taken() -> Iterator[tuple[int, int, np.ndarray]]:
        while True:
            item = handed.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    thread = threading.Thread(target=sample, name="mgjax-stream-lm")
    thread.start()
    try:
        yield taken()
    finally:
        stop.set()
        thread.join()
