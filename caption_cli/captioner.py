"""Captioner: the encoder and decoder sessions, loaded once, and one batched search per batch.

With `overlap`, the encoder runs ahead on a helper thread while the beam search runs on
the caller's (onnxruntime releases the GIL): `caption_stream` starts each batch's encoder
as soon as the batch arrives, so it runs while the batch before is searched, stored and
the next one gathered; `caption(pixels)` does the same chunk by chunk within one batch.
On CUDA the decoder step binds features and keys to the device once per set of running
rows instead of copying them in at every step (onnxruntime IO binding). A bundle with a confidence scorer gets one
more pass per batch: the scorer reads the chosen captions (caption_cli.scoring).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnxruntime as ort

from caption_cli.beam import Hypothesis, SearchOptions, beam_search, never_emitted
from caption_cli.bundle import Bundle
from caption_cli.confidence import caption_features
from caption_cli.errors import BundleError
from caption_cli.results import Alternative, Caption
from caption_cli.scoring import sequence_logprobs
from caption_cli import session as sessions
from caption_cli.session import default_threads, open_session, session_device

Context = TypeVar("Context")  # what a caller pairs with each batch in caption_stream

# Images per encoder call on a CPU. Measured on EfficientNet-Lite2 (2 cores): chunks of 8
# run as fast as 16 (59 vs 52 img/s) with 300 MB less peak memory, because onnxruntime's
# arena grows with the largest activation it has held. A GPU takes the whole batch.
CPU_ENCODER_CHUNK = 8
# Images per encoder call on CUDA: large enough to fill the GPU, small enough that a batch
# of several chunks overlaps the encoder of one with the (CPU) search of the one before.
CUDA_ENCODER_CHUNK = 64
# What the pipeline's --batch-size should be on each device (images per caption() call).
PREFERRED_BATCH = {"cpu": 16, "cuda": 256}


@dataclass
class CaptionTimes:
    """Seconds spent inside the Captioner, summed over calls (what a profile reads).

    encoder: encoder.onnx runs (on the helper thread when pipelined, so it can overlap
    search); steps: decoder.onnx runs; search: beam_search wall time, steps included, so
    search - steps is the search's own Python/numpy work; scoring: the confidence
    scorer's teacher-forced pass (0 without a scorer); encoder_wait: how long the caller
    waited for an encoder running ahead (the part of it the overlap did not hide).
    """

    encoder: float = 0.0
    encoder_wait: float = 0.0
    steps: float = 0.0
    search: float = 0.0
    scoring: float = 0.0
    images: int = 0
    steps_run: int = 0

    def reset(self) -> None:
        for field in fields(self):
            setattr(self, field.name, type(getattr(self, field.name))())


class Captioner:
    """Captions batches of model pixels with one bundle.

    device is what really runs ("cuda" or "cpu"), read back from onnxruntime;
    options are the search options with the bundle's defaults filled in.
    encoder_chunk: images per encoder call (None: CPU_ENCODER_CHUNK on a CPU,
    CUDA_ENCODER_CHUNK on a GPU). overlap: the encoder runs ahead on a helper thread, one
    batch ahead in caption_stream and one chunk ahead in caption (None: on CUDA only; the
    annotate command asks for it on every device). Without it the encoder and the search take
    turns. On a CPU, caption() with overlap searches each chunk on its own, and the int8
    steps quantise their activations per call, so a caption can differ slightly from the
    whole batch's; caption_stream searches whole batches and gives the same captions either
    way. threads: onnxruntime threads per session (None: every CPU this process may use);
    on a CPU with overlap the decoder and scorer sessions get half of them, since the
    encoder runs beside them (search_threads; benchmarks/README.md, issue #13).
    times: where the time went, summed over calls (CaptionTimes).
    cpu_decoder: on a CPU, use the bundle's int8 decoder step (files.decoder_cpu) when it has
    one; `bundle` is then that view (Bundle.for_device), so model_id names what really ran.
    """

    def __init__(self, bundle: Bundle, device: str = "auto", options: SearchOptions | None = None,
                 *, threads: int | None = None, encoder_chunk: int | None = None,
                 overlap: bool | None = None, cpu_decoder: bool = True) -> None:
        if encoder_chunk is not None and encoder_chunk < 1:
            raise ValueError(f"encoder_chunk must be at least 1, got {encoder_chunk}")
        self.options = (options or SearchOptions()).resolved(bundle.search_defaults)
        self._encoder, self._decoder, self._scorer, self.bundle = _open_sessions(bundle, device, threads, cpu_decoder,
                                                                                  overlap)
        inputs, outputs = bundle.tensor_names("encoder")
        self._encoder_io = (inputs, outputs + bundle.scorer_encoder_outputs)
        self._decoder_io = bundle.tensor_names("decoder")
        _check_names(bundle.encoder_path, self._encoder, self._encoder_io)
        _check_names(self.bundle.decoder_path, self._decoder, self._decoder_io)
        if self._scorer is not None:
            self._scorer_io = bundle.tensor_names("scorer")
            _check_names(bundle.scorer_path, self._scorer, self._scorer_io)
        special = bundle.special_tokens
        self._start, self._end = special["start"], special["end"]
        self._banned = never_emitted(special)
        self._no_end_after = bundle.no_end_after
        self._no_next_after = bundle.no_next_after
        self._calibration = bundle.calibration
        on_cuda = self.device == "cuda"
        self.encoder_chunk = encoder_chunk or (CUDA_ENCODER_CHUNK if on_cuda else CPU_ENCODER_CHUNK)
        self.overlap = on_cuda if overlap is None else overlap
        self.times = CaptionTimes()
        self._helper: ThreadPoolExecutor | None = None  # the encoder's thread when overlapping
        self._bound: tuple | None = None  # CUDA: (features, keys) arrays and their device copies

    @property
    def preferred_batch(self) -> int:
        """Images per caption() call that suit this device (for the pipeline's batch size)."""
        return PREFERRED_BATCH[self.device]

    def close(self) -> None:
        """Stop the encoder's helper thread (a later pipelined caption() starts a new one)."""
        if self._helper is not None:
            self._helper.shutdown(wait=True)
            self._helper = None
        self._bound = None

    @property
    def device(self) -> str:
        return session_device(self._decoder)

    @property
    def providers(self) -> list[str]:
        return self._decoder.get_providers()

    def encode(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """pixels uint8 [N, S, S, 3] -> features [N, L, E], keys [N, L, A], hidden0 [N, H]."""
        features, keys, hidden0 = self._encode_all(pixels)[:3]
        return features, keys, hidden0

    def _encode_all(self, pixels: np.ndarray) -> tuple[np.ndarray, ...]:
        """encode()'s three arrays, then, with a scorer, the scorer's own three (one encoder run)."""
        size = self.bundle.image_size
        if not (isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.ndim == 4
                and pixels.shape[1:] == (size, size, 3)):
            got = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
            raise ValueError(f"pixels must be uint8 [N, {size}, {size}, 3] (preprocess.model_pixels), got {got}")
        (name,), outputs = self._encoder_io
        chunk = self.encoder_chunk or len(pixels)
        started = time.perf_counter()
        parts = [self._encoder.run(outputs, {name: np.ascontiguousarray(pixels[start:start + chunk])})
                 for start in range(0, len(pixels), chunk)]
        self.times.encoder += time.perf_counter() - started
        encoded = tuple(parts[0] if len(parts) == 1 else (np.concatenate(p) for p in zip(*parts)))
        h, w = self.bundle.grid
        if encoded[0].shape[1] != h * w:
            raise BundleError(f"{self.bundle.encoder_path}: gives {encoded[0].shape[1]} grid cells, "
                              f"but model.json grid {h}x{w} has {h * w}")
        return encoded

    def step(self, token: np.ndarray, hidden: np.ndarray, features: np.ndarray,
             keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One decoder step over B rows: -> logprobs [B, V], hidden_out [B, H], attention [B, L]."""
        started = time.perf_counter()
        if self.device == "cuda":
            logprobs, hidden_out, attention = self._step_bound(token, hidden, features, keys)
        else:
            inputs, outputs = self._decoder_io
            logprobs, hidden_out, attention = self._decoder.run(
                outputs, dict(zip(inputs, (token, hidden, features, keys))))
        self.times.steps += time.perf_counter() - started
        self.times.steps_run += 1
        return logprobs, hidden_out, attention

    def _step_bound(self, token: np.ndarray, hidden: np.ndarray, features: np.ndarray,
                    keys: np.ndarray) -> list[np.ndarray]:
        """The step through IO binding: features and keys ([B, L, E] and [B, L, A], the
        largest inputs by far) go to the GPU once and stay there for every step that gets
        the same arrays; beam_search hands the same objects until images leave the batch.
        token and hidden change every step and are small; the outputs come back to the
        host, where the search picks the next words."""
        (token_name, hidden_name, features_name, keys_name), outputs = self._decoder_io
        if self._bound is None or self._bound[0] is not features or self._bound[1] is not keys:
            self._bound = (features, keys, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(features), "cuda", 0),
                           ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(keys), "cuda", 0))
        binding = self._decoder.io_binding()
        binding.bind_cpu_input(token_name, np.ascontiguousarray(token))
        binding.bind_cpu_input(hidden_name, np.ascontiguousarray(hidden))
        binding.bind_ortvalue_input(features_name, self._bound[2])
        binding.bind_ortvalue_input(keys_name, self._bound[3])
        for name in outputs:
            binding.bind_output(name, "cpu")
        self._decoder.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def caption(self, pixels: np.ndarray) -> list[Caption]:
        """Caption a batch: the encoder, then one beam search over every image; with
        `overlap`, chunk by chunk, the encoder one chunk ahead of the search."""
        if isinstance(pixels, np.ndarray) and pixels.ndim == 4 and pixels.shape[0] == 0:
            return []
        chunk = self.encoder_chunk or len(pixels)
        if not self.overlap or len(pixels) <= chunk:
            found = self._search_and_score(self._encode_all(pixels))
        else:
            found = [scored for encoded in self._encoded_ahead(pixels, chunk)
                     for scored in self._search_and_score(encoded)]
        return self._captions(found)

    def _captions(self, found: list[tuple[list[Hypothesis], list[float] | None]]) -> list[Caption]:
        """The Caption of each image searched (and scored), counted."""
        self.times.images += len(found)
        self._bound = None  # the device copies of the last rows are not needed any more
        return [self._caption(hypotheses, scorer_sums) for hypotheses, scorer_sums in found]

    def caption_stream(self, batches: Iterable[tuple[Context, np.ndarray | None]]
                       ) -> Iterator[tuple[Context, list[Caption]]]:
        """Caption a stream of batches in order: (context, pixels) in, (context, captions) out.

        With `overlap`, each batch's encoder starts on the helper thread when the batch
        arrives and runs while the batch before it is searched here, then stored by the
        caller, and while the next batch is gathered: the encoder's threads fill the cores
        that the search (one thread) and the caller leave idle. pixels None or empty: no
        captions, the context still comes back in its place. The pixels of a batch are read
        later, on the helper thread: a caller must not reuse their buffer for the next batch.
        """
        if not self.overlap:
            for context, pixels in batches:
                yield context, [] if _empty(pixels) else self.caption(pixels)
            return
        waiting: deque[tuple[Context, Future | None]] = deque()
        for context, pixels in batches:
            waiting.append((context, None if _empty(pixels) else self._start_encoder(pixels)))
            if len(waiting) > 1:
                yield self._finish(*waiting.popleft())
        while waiting:
            yield self._finish(*waiting.popleft())

    def _start_encoder(self, pixels: np.ndarray) -> Future:
        if self._helper is None:
            self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="caption-cli-encoder")
        return self._helper.submit(self._encode_all, pixels)

    def _wait_for(self, encoding: Future) -> tuple[np.ndarray, ...]:
        started = time.perf_counter()
        try:
            return encoding.result()
        finally:
            self.times.encoder_wait += time.perf_counter() - started

    def _finish(self, context: Context, encoding: Future | None) -> tuple[Context, list[Caption]]:
        if encoding is None:
            return context, []
        return context, self._captions(self._search_and_score(self._wait_for(encoding)))

    def _encoded_ahead(self, pixels: np.ndarray, chunk: int) -> Iterator[tuple[np.ndarray, ...]]:
        """encode() of each chunk in order, the next one already running on the helper
        thread while the caller searches this one."""
        ahead = self._start_encoder(pixels[:chunk])
        for start in range(0, len(pixels), chunk):
            encoded = self._wait_for(ahead)
            if start + chunk < len(pixels):
                ahead = self._start_encoder(pixels[start + chunk:start + 2 * chunk])
            yield encoded

    def _search_and_score(self, encoded: tuple[np.ndarray, ...]) -> list[tuple[list[Hypothesis], list[float] | None]]:
        """Each image's hypotheses, with the scorer's log-probability sum of each (None without a scorer)."""
        started = time.perf_counter()
        try:
            found = beam_search(self.step, *encoded[:3], self.options, start_id=self._start, end_id=self._end,
                                banned_ids=self._banned, no_end_after=self._no_end_after,
                                no_next_after=self._no_next_after)
        finally:
            self.times.search += time.perf_counter() - started
        if self._scorer is None:
            return [(hypotheses, None) for hypotheses in found]
        return list(zip(found, self._score(found, *encoded[3:])))

    def _score(self, found: list[list[Hypothesis]], features: np.ndarray, keys: np.ndarray,
               hidden0: np.ndarray) -> list[list[float]]:
        """The scorer's log-probability of every hypothesis, over the tokens the search scored
        (the words, and <end> when the caption ended), so both means share a length."""
        sequences, image_of = [], []
        for image, hypotheses in enumerate(found):
            for hyp in hypotheses:
                ended = hyp.length > len(hyp.tokens)
                sequences.append(list(hyp.tokens) + ([self._end] if ended else []))
                image_of.append(image)
        started = time.perf_counter()
        inputs, outputs = self._scorer_io

        def step(*feeds: np.ndarray) -> list[np.ndarray]:
            return self._scorer.run(outputs, dict(zip(inputs, feeds)))

        sums = sequence_logprobs(step, sequences, image_of, features, keys, hidden0, start_id=self._start)
        self.times.scoring += time.perf_counter() - started
        out, row = [], 0
        for hypotheses in found:
            out.append([float(v) for v in sums[row:row + len(hypotheses)]])
            row += len(hypotheses)
        return out

    def _caption(self, hypotheses: list[Hypothesis], scorer_sums: list[float] | None) -> Caption:
        best = hypotheses[0]
        words = [self.bundle.vocab[t] for t in best.tokens]
        h, w = self.bundle.grid
        values = [caption_features(hyp.logprob, hyp.length, len(hyp.tokens),
                                   None if scorer_sums is None else scorer_sums[i])
                  for i, hyp in enumerate(hypotheses)]
        alternatives = [Alternative(" ".join(self.bundle.vocab[t] for t in hyp.tokens), hyp.score,
                                    self._confidence(features)) for hyp, features in zip(hypotheses, values)]
        return Caption(
            text=" ".join(words), score=best.score, words=words,
            attention=best.attention.reshape(len(words), h, w).astype(np.float32),
            alternatives=alternatives, confidence=alternatives[0].confidence,
            mean_logprob=values[0]["mean_logprob"], scorer_mean_logprob=values[0].get("scorer_mean_logprob"))

    def _confidence(self, values: dict[str, float]) -> float | None:
        if self._calibration is None:
            return None
        return round(self._calibration.confidence(values), 4)


Sessions = tuple[ort.InferenceSession, ort.InferenceSession, "ort.InferenceSession | None", Bundle]


def _open_sessions(bundle: Bundle, device: str, threads: int | None, cpu_decoder: bool,
                   overlap: bool | None) -> Sessions:
    """The encoder and decoder sessions, on the same device, and the scorer's (when the
    bundle has one) always on the CPU: its step is int8, whose matrix products onnxruntime's
    CUDA provider runs on the host (onnxruntime#7745) with copies at every node, and its
    inputs are host arrays anyway. On a CPU the decoder is the bundle's int8 step when it
    has one (and with it that step's model id, hence the returned bundle). Where only the
    CPU can be meant, the sessions are built at once on threads (onnxruntime lets go of the
    GIL for part of it): 0.054 s instead of 0.07 for two; where CUDA may start, the decoder
    waits to follow the device the encoder really got. With overlap asked for, the search's
    sessions on a CPU get half the threads (search_threads); on CUDA the scorer keeps them all,
    beside a GPU that does the rest."""
    scorer_path = bundle.scorer_path
    if device == "cpu" or (device == "auto" and not sessions.cuda_built_in()):
        chosen = bundle.for_device("cpu") if cpu_decoder else bundle
        searching = search_threads(threads, overlap)
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="caption-cli-session") as pool:
            decoder = pool.submit(open_session, chosen.decoder_path, "cpu", threads=searching)
            scorer = pool.submit(open_session, scorer_path, "cpu", threads=searching) if scorer_path else None
            encoder = open_session(bundle.encoder_path, "cpu", threads=threads)
            return encoder, decoder.result(), scorer.result() if scorer else None, chosen
    encoder = open_session(bundle.encoder_path, device, threads=threads)
    on = session_device(encoder)
    chosen = bundle.for_device(on) if cpu_decoder else bundle
    searching = search_threads(threads, overlap) if on == "cpu" else threads
    scorer = open_session(scorer_path, "cpu", threads=searching) if scorer_path else None
    return encoder, open_session(chosen.decoder_path, on, threads=searching), scorer, chosen


def search_threads(threads: int | None, overlap: bool | None) -> int | None:
    """onnxruntime threads for the decoder and scorer sessions on a CPU. Beside an encoder
    running ahead on its own thread they get half the cores: their steps are small (tens of
    rows) and gain little from a second thread (a 48-row scorer step: 2.00 ms on 1 thread,
    1.72 ms on 2), while the encoder scales (63.7 -> 121.8 img/s), so the cores are better
    spent on both at once than on each in turn (benchmarks/README.md, issue #13). Only an
    overlap asked for counts (None is off on a CPU)."""
    if not overlap:
        return threads
    return max(1, (threads or default_threads()) // 2)


def _empty(pixels: np.ndarray | None) -> bool:
    return pixels is None or len(pixels) == 0


def _check_names(path: Path, session: ort.InferenceSession, names: tuple[list[str], list[str]]) -> None:
    """model.json's tensor names must be the graph's, or every run would fail later."""
    have_in = {i.name for i in session.get_inputs()}
    have_out = {o.name for o in session.get_outputs()}
    for kind, wanted, have in (("input", names[0], have_in), ("output", names[1], have_out)):
        missing = [n for n in wanted if n not in have]
        if missing:
            raise BundleError(f"{path}: has no {kind} {missing[0]!r} named in model.json "
                              f"(the graph's {kind}s: {', '.join(sorted(have))})")
