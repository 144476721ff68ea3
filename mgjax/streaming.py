"""Streaming generation: the windowed, chunked sampling loop (`MusicGen.iter_windows`) feeding an incremental codec
decode (`codec.streaming.StreamingDecoder`), so audio comes out while the LM is still sampling.

After each compiled call of `chunk_steps` pattern steps, the frames whose K codes are all sampled
(`sampling.complete_frames`: with the delay pattern a frame completes K - 1 steps after its first code) are handed
to the decoder, which returns the audio whose right context is known. Windows past `lm.max_duration` chain as in
`generate` (each later window's prompt frames were already streamed). Stereo models decode left and right as two
batch rows of the mono codec, as `MusicGen.decode` does.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
from typing import Callable, Iterator, Optional

import jax
import numpy as np

from mgjax.codec.streaming import StreamingDecoder
from mgjax.sampling import SamplingConfig, complete_frames


def stereo_to_batch(codes_BxKxT):
    """Interleaved stereo codes `[B, 2K', T]` (`[L0, R0, L1, R1, ...]`) -> `[2B, K', T]`: left rows, then right."""
    xp = np if isinstance(codes_BxKxT, np.ndarray) else jax.numpy
    return xp.concatenate([codes_BxKxT[:, ::2], codes_BxKxT[:, 1::2]], axis=0)


def channels_from_batch(wav_2BxCxN, batch: int):
    """`[2B, 1, N]` (left rows, then right) -> `[B, 2, N]`."""
    xp = np if isinstance(wav_2BxCxN, np.ndarray) else jax.numpy
    return xp.concatenate([wav_2BxCxN[:batch], wav_2BxCxN[batch:]], axis=1)


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
        return channels_from_batch(self.decoder.push(stereo_to_batch(codes_BxKxT), final), self.batch)


def stream_generation(mg, cond, mask, duration: float, sampling: SamplingConfig, seed: int, *, melody=None,
                      melody_sample_rate: Optional[int] = None, prompt_audio=None,
                      prompt_sample_rate: Optional[int] = None, chunk_steps: int,
                      progress: Optional[Callable[[int, int], None]] = None) -> Iterator[np.ndarray]:
    """Yields `[B, C, n]` float32 chunks (n > 0) of `mg._generate_from_text_states(...)`'s audio, from T5 states
    `cond [B, L, D]` and `mask [B, L]`; the prompt's own audio comes first (as in `generate`'s output).

    The decoder runs on its own thread (`decode_thread`): XLA's CPU client runs the programs one thread dispatches
    one after another, so a decode dispatched by the thread that has just dispatched the LM's next call would wait
    for that call; from another thread the two run side by side."""
    frames = mg.frames_for(duration)
    prompt_codes = mg._prompt_codes(prompt_audio, prompt_sample_rate, cond.shape[0], frames)
    stream = AudioStream(mg, cond.shape[0], chunk_steps)
    sent = 0  # frames of the piece handed to the decoder
    chunks = mg.iter_windows(cond, mask, prompt_codes, frames, sampling, jax.random.key(seed), melody=melody,
                             melody_sample_rate=melody_sample_rate or mg.sample_rate, steps_per_call=chunk_steps)
    with decode_thread() as decoder:
        for chunk in chunks:
            if progress is not None:
                progress(chunk.steps_before + chunk.done, chunk.steps_all)
            window = chunk.codes.shape[-1]
            known = min(frames, chunk.start + complete_frames(mg.config.lm, window, chunk.prompt_frames, chunk.done))
            # The LM's next call is already running (iter_windows dispatches it before handing this one out).
            wav = decoder.submit(stream.push, chunk.codes[:, :, sent - chunk.start: known - chunk.start]).result()
            sent = max(sent, known)
            if wav.shape[-1]:
                yield wav
        empty = np.zeros((cond.shape[0], mg.config.lm.num_codebooks, 0), np.int32)
        wav = decoder.submit(stream.push, empty, True).result()
        if wav.shape[-1]:
            yield wav


@contextlib.contextmanager
def decode_thread() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    """One worker thread for a stream's decoder calls, joined when the stream ends or is abandoned."""
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mgjax-stream-decode")
    try:
        yield executor
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
