"""Captioner: the encoder and decoder sessions, loaded once, and one batched search per batch."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from caption_cli.beam import Hypothesis, SearchOptions, beam_search, never_emitted
from caption_cli.bundle import Bundle
from caption_cli.confidence import caption_features
from caption_cli.errors import BundleError
from caption_cli.results import Alternative, Caption
from caption_cli.session import open_session, session_device

# Images per encoder call on a CPU. Measured on EfficientNet-Lite2 (2 cores): chunks of 8
# run as fast as 16 (59 vs 52 img/s) with 300 MB less peak memory, because onnxruntime's
# arena grows with the largest activation it has held. A GPU takes the whole batch.
CPU_ENCODER_CHUNK = 8


class Captioner:
    """Captions batches of model pixels with one bundle.

    device is what really runs ("cuda" or "cpu"), read back from onnxruntime;
    options are the search options with the bundle's defaults filled in.
    encoder_chunk: images per encoder call (None: CPU_ENCODER_CHUNK on a CPU, all on a GPU);
    the beam search still runs over the whole batch at once.
    """

    def __init__(self, bundle: Bundle, device: str = "auto", options: SearchOptions | None = None,
                 *, threads: int | None = None, encoder_chunk: int | None = None) -> None:
        if encoder_chunk is not None and encoder_chunk < 1:
            raise ValueError(f"encoder_chunk must be at least 1, got {encoder_chunk}")
        self.bundle = bundle
        self.options = (options or SearchOptions()).resolved(bundle.search_defaults)
        self._encoder = open_session(bundle.encoder_path, device, threads=threads)
        # the decoder follows the encoder, so both run on the same device
        self._decoder = open_session(bundle.decoder_path, session_device(self._encoder), threads=threads)
        self._encoder_io = bundle.tensor_names("encoder")
        self._decoder_io = bundle.tensor_names("decoder")
        _check_names(bundle, "encoder", self._encoder, self._encoder_io)
        _check_names(bundle, "decoder", self._decoder, self._decoder_io)
        special = bundle.special_tokens
        self._start, self._end = special["start"], special["end"]
        self._banned = never_emitted(special)
        self._calibration = bundle.calibration
        self.encoder_chunk = encoder_chunk or (CPU_ENCODER_CHUNK if self.device == "cpu" else None)

    @property
    def device(self) -> str:
        return session_device(self._decoder)

    @property
    def providers(self) -> list[str]:
        return self._decoder.get_providers()

    def encode(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """pixels uint8 [N, S, S, 3] -> features [N, L, E], keys [N, L, A], hidden0 [N, H]."""
        size = self.bundle.image_size
        if not (isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.ndim == 4
                and pixels.shape[1:] == (size, size, 3)):
            got = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
            raise ValueError(f"pixels must be uint8 [N, {size}, {size}, 3] (preprocess.model_pixels), got {got}")
        (name,), outputs = self._encoder_io
        chunk = self.encoder_chunk or len(pixels)
        parts = [self._encoder.run(outputs, {name: np.ascontiguousarray(pixels[start:start + chunk])})
                 for start in range(0, len(pixels), chunk)]
        features, keys, hidden0 = parts[0] if len(parts) == 1 else (np.concatenate(p) for p in zip(*parts))
        h, w = self.bundle.grid
        if features.shape[1] != h * w:
            raise BundleError(f"{self.bundle.encoder_path}: gives {features.shape[1]} grid cells, "
                              f"but model.json grid {h}x{w} has {h * w}")
        return features, keys, hidden0

    def step(self, token: np.ndarray, hidden: np.ndarray, features: np.ndarray,
             keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One decoder step over B rows: -> logprobs [B, V], hidden_out [B, H], attention [B, L]."""
        inputs, outputs = self._decoder_io
        logprobs, hidden_out, attention = self._decoder.run(outputs, dict(zip(inputs, (token, hidden, features, keys))))
        return logprobs, hidden_out, attention

    def caption(self, pixels: np.ndarray) -> list[Caption]:
        """Caption a batch: one encoder call, then one beam search over every image."""
        if isinstance(pixels, np.ndarray) and pixels.ndim == 4 and pixels.shape[0] == 0:
            return []
        features, keys, hidden0 = self.encode(pixels)
        found = beam_search(self.step, features, keys, hidden0, self.options,
                            start_id=self._start, end_id=self._end, banned_ids=self._banned)
        return [self._caption(hypotheses) for hypotheses in found]

    def _caption(self, hypotheses: list[Hypothesis]) -> Caption:
        best = hypotheses[0]
        words = [self.bundle.vocab[t] for t in best.tokens]
        h, w = self.bundle.grid
        alternatives = [Alternative(" ".join(self.bundle.vocab[t] for t in hyp.tokens), hyp.score,
                                    self._confidence(hyp)) for hyp in hypotheses]
        return Caption(
            text=" ".join(words), score=best.score, words=words,
            attention=best.attention.reshape(len(words), h, w).astype(np.float32),
            alternatives=alternatives, confidence=alternatives[0].confidence,
            mean_logprob=caption_features(best.logprob, best.length, len(words))["mean_logprob"])

    def _confidence(self, hypothesis: Hypothesis) -> float | None:
        if self._calibration is None:
            return None
        values = caption_features(hypothesis.logprob, hypothesis.length, len(hypothesis.tokens))
        return round(self._calibration.confidence(values), 4)


def _check_names(bundle: Bundle, graph: str, session: ort.InferenceSession,
                 names: tuple[list[str], list[str]]) -> None:
    """model.json's tensor names must be the graph's, or every run would fail later."""
    path = bundle.encoder_path if graph == "encoder" else bundle.decoder_path
    have_in = {i.name for i in session.get_inputs()}
    have_out = {o.name for o in session.get_outputs()}
    for kind, wanted, have in (("input", names[0], have_in), ("output", names[1], have_out)):
        missing = [n for n in wanted if n not in have]
        if missing:
            raise BundleError(f"{path}: has no {kind} {missing[0]!r} named in model.json "
                              f"(the graph's {kind}s: {', '.join(sorted(have))})")
