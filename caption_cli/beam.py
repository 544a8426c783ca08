"""Batched beam search over a one-step decoder.

Three things are kept apart, as in onnxruntime-genai and transformers' BeamSearchScorer:
- the decoder step, any callable with the decoder.onnx signature (the Captioner passes
  its onnxruntime session, tests pass a numpy fake);
- `SearchOptions`, a frozen dataclass checked when it is built;
- the search state: the running beams of every image as one (B_active*K, ...) array,
  and one `NBest` holder per image with its finished hypotheses.

Each step makes ONE decoder call for the beams of every unfinished image. An image
leaves the batch (its K rows are dropped, so later steps run on fewer rows) once its
holder has K hypotheses that the running beams cannot beat, or at max_length.

Rules (the tests check them against a per-image reference search):
- scores: sum of log-probabilities / length ** length_penalty, where length counts
  the words including <end> (a caption cut at max_length has no <end>);
- each step looks at the 2K best (beam, word) pairs of an image, best first: an <end>
  among the first K finishes that beam into the holder; the first K that are not
  <end> become the next running beams, so an image always keeps K running beams;
- at step 0 the K beams of an image are identical, so the decoder runs one row per image
  and only beam 0 is expanded (the others start at -inf): no duplicate hypotheses appear;
- banned ids (the runtime passes `never_emitted`: <pad>, <start>, <unk>) are never emitted,
  nor <end> as the first word (no empty caption), nor <end> right after a word of
  `no_end_after` (the bundle's words that almost never end a training caption: "a", "the",
  "of"; a caption cut at "playing in a" is worse alt text than a longer one), nor a word
  right after a word that `no_next_after` pairs it with (pairs the training captions never
  hold although their words are common: "a in", "a and"; SCST models learn to skip the noun);
- an image is done when its holder is full and its worst score is >= the best running
  sum normalised at the current length (transformers' default `early_stopping=False`
  rule). With K = 1 this makes the search exactly the greedy argmax chain.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np

from caption_cli.errors import CaptionCliError

# step(token [B] int64, hidden [B, H], features [B, L, E], keys [B, L, A])
#   -> (logprobs [B, V] float32, hidden_out [B, H], attention [B, L])
StepFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]

BEAM_SIZE_RANGE = (1, 32)
MAX_LENGTH_RANGE = (1, 100)
LENGTH_PENALTY_RANGE = (0.0, 2.0)


class SearchOptionsError(CaptionCliError, ValueError):
    """A search option is out of range; the message names the valid range."""


def _check_int(name: str, value: object, low: int, high: int, *, high_text: str | None = None,
               unit: str = "", hint: str = "") -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, Integral) or not low <= value <= high:
        raise SearchOptionsError(f"{name} must be an integer from {low} to {high_text or high}{unit}, "
                                 f"got {value!r}{hint}")


@dataclass(frozen=True)
class SearchOptions:
    """How to search. None means "the bundle's default" (model.json `search`, `max_length`).

    beam_size: beams per image (K); 1 is greedy search.
    alternatives: how many captions to return per image, best first (at most beam_size).
    max_length: most tokens in a caption, counting <end> (so the decoder runs at most
        max_length steps).
    length_penalty: score = sum log-prob / length ** length_penalty; 0 ranks by total
        log-probability (favours short captions), 1 by the mean per word.
    """

    beam_size: int | None = None
    alternatives: int | None = None
    max_length: int | None = None
    length_penalty: float | None = None

    def __post_init__(self) -> None:
        _check_int("beam_size", self.beam_size, *BEAM_SIZE_RANGE)
        if self.beam_size is None:
            _check_int("alternatives", self.alternatives, *BEAM_SIZE_RANGE)
        else:
            _check_int("alternatives", self.alternatives, 1, self.beam_size, high_text=f"beam_size ({self.beam_size})",
                       hint="; raise beam_size to get more alternatives")
        _check_int("max_length", self.max_length, *MAX_LENGTH_RANGE, unit=" tokens (counting <end>)")
        penalty = self.length_penalty
        low, high = LENGTH_PENALTY_RANGE
        if penalty is not None and (isinstance(penalty, bool) or not isinstance(penalty, Real)
                                    or not math.isfinite(penalty) or not low <= penalty <= high):
            raise SearchOptionsError(
                f"length_penalty must be a number from {low} to {high} "
                f"(0 ranks by total log-probability, 1 by mean per word), got {penalty!r}")

    @property
    def complete(self) -> bool:
        """True when no option is left to a default."""
        return None not in (self.beam_size, self.alternatives, self.max_length, self.length_penalty)

    def resolved(self, defaults: SearchOptions) -> SearchOptions:
        """Fill unset options from `defaults` (the bundle's). A default number of
        alternatives is capped at the beam size; an explicit one is not (it is an error)."""
        beam_size = self.beam_size if self.beam_size is not None else defaults.beam_size
        alternatives = self.alternatives
        if alternatives is None and defaults.alternatives is not None and beam_size is not None:
            alternatives = min(defaults.alternatives, beam_size)
        result = SearchOptions(
            beam_size=beam_size, alternatives=alternatives,
            max_length=self.max_length if self.max_length is not None else defaults.max_length,
            length_penalty=self.length_penalty if self.length_penalty is not None else defaults.length_penalty)
        if not result.complete:
            raise SearchOptionsError(f"search options are incomplete after applying defaults: {result}")
        return result


@dataclass
class Hypothesis:
    """One finished caption of one image."""

    tokens: list[int]  # word ids, without <start>/<end>
    score: float  # sum log-prob / length ** length_penalty
    attention: np.ndarray  # float32 [T, L]: one row per word in tokens
    logprob: float = 0.0  # sum of the token log-probabilities (what the confidence reads)
    length: int = 0  # tokens scored: the words, plus <end> when the caption has one


class NBest:
    """The best `size` finished hypotheses of one image (transformers' BeamHypotheses)."""

    def __init__(self, size: int, length_penalty: float) -> None:
        self.size = size
        self.length_penalty = length_penalty
        self.hypotheses: list[Hypothesis] = []  # best first

    def normalise(self, sum_logprob: float, length: int) -> float:
        return sum_logprob / (length ** self.length_penalty)

    def add(self, tokens: list[int], sum_logprob: float, length: int, attention: np.ndarray) -> None:
        """Offer a finished hypothesis; keeps only the best `size` (ties: the earlier stays ahead)."""
        score = self.normalise(sum_logprob, length)
        if self.full and score <= self.hypotheses[-1].score:
            return
        at = len(self.hypotheses)
        while at > 0 and self.hypotheses[at - 1].score < score:
            at -= 1
        self.hypotheses.insert(at, Hypothesis(tokens, float(score), attention, float(sum_logprob), length))
        del self.hypotheses[self.size:]

    @property
    def full(self) -> bool:
        return len(self.hypotheses) >= self.size

    def cannot_improve(self, best_running_sum: float, length: int) -> bool:
        """True when a full holder's worst beats the best running beam normalised now."""
        if best_running_sum == -math.inf:
            return True  # nothing left running
        return self.full and self.hypotheses[-1].score >= self.normalise(best_running_sum, length)


def never_emitted(special_tokens: Mapping[str, int]) -> tuple[int, ...]:
    """Token ids no caption may contain: <pad>, <start> and <unk>.

    "a dog plays with a <unk>" helps no one in alt text or a photo's metadata, and no
    reference caption contains the literal token, so the search takes the best real
    word instead. <end> is not here: it finishes a caption.
    """
    return tuple(sorted({special_tokens["pad"], special_tokens["start"], special_tokens["unk"]}))


def _best_expansions(logprobs: np.ndarray, sums: np.ndarray, n_top: int,
                     forbidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The n_top best (beam, word) expansions of each image: flat indices beam * V + word
    [B, n_top] and their float64 score sums [B, n_top], in no particular order.

    An image's best expansions are among each of its beams' own best words, so the
    [B*K, V] log-probs are scanned once in float32 for n_top (+ forbidden) words per beam,
    and only those candidates are scored; this is exact, and most of the search's numpy
    time was spent scoring all K*V expansions in float64.
    """
    vocab = logprobs.shape[1]
    b, k = sums.shape
    per_beam = min(vocab, n_top + len(forbidden))  # a forbidden word can take a slot: take more
    words = np.argpartition(logprobs, vocab - per_beam, axis=1)[:, vocab - per_beam:]  # [B*K, P], no negated copy
    word_scores = np.take_along_axis(logprobs, words, axis=1).astype(np.float64)
    word_scores[np.isin(words, forbidden)] = -np.inf
    scores = (sums.reshape(-1, 1) + word_scores).reshape(b, k * per_beam)  # [B, K*P]
    flat = (np.arange(k).reshape(1, k, 1) * vocab + words.reshape(b, k, per_beam)).reshape(b, k * per_beam)
    best = np.argpartition(-scores, n_top - 1, axis=1)[:, :n_top]  # [B, n_top]
    return np.take_along_axis(flat, best, axis=1), np.take_along_axis(scores, best, axis=1)


def _no_end_after(logprobs: np.ndarray, token: np.ndarray, unfinished: np.ndarray, end_id: int) -> np.ndarray:
    """logprobs with <end> at -inf on the rows whose last word is one of `unfinished`."""
    rows = np.isin(token, unfinished)
    if not rows.any():
        return logprobs
    if not logprobs.flags.writeable:  # a buffer onnxruntime still owns
        logprobs = logprobs.copy()
    logprobs[rows, end_id] = -np.inf
    return logprobs


def _no_next_after(logprobs: np.ndarray, token: np.ndarray, rules: Mapping[int, np.ndarray]) -> np.ndarray:
    """logprobs with the words `rules[w]` at -inf on the rows whose last word is w."""
    hits = [(row, rules[t]) for row, t in enumerate(token.tolist()) if t in rules]
    if not hits:
        return logprobs
    if not logprobs.flags.writeable:  # a buffer onnxruntime still owns
        logprobs = logprobs.copy()
    for row, banned in hits:
        logprobs[row, banned] = -np.inf
    return logprobs


def _drop_finished(done: np.ndarray, k: int, feats: np.ndarray,
                   kys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shrink the per-row features and keys to the images still running, moving as little as
    possible: the running images behind the first finished one move into the finished
    images' slots (K rows each), and the arrays become a leading slice, a contiguous view.
    Copying every remaining row each time an image finished was 13% of the search's time.

    Returns `order` (new slot -> old slot of each running image) and the two views; the
    caller reorders its small per-row arrays by `order`. Images change places, which no
    score or tie-break depends on (both are within one image)."""
    running = np.flatnonzero(~done)
    kept = len(running)
    holes = np.flatnonzero(done[:kept])  # finished images in the slots that stay
    movers = running[running >= kept]  # running images in the slots that go, as many
    order = np.arange(kept)
    order[holes] = movers
    if len(holes):
        destination = (holes[:, None] * k + np.arange(k)).reshape(-1)
        source = (movers[:, None] * k + np.arange(k)).reshape(-1)
        feats[destination] = feats[source]
        kys[destination] = kys[source]
    return order, feats[:kept * k], kys[:kept * k]


def beam_search(step: StepFn, features: np.ndarray, keys: np.ndarray, hidden0: np.ndarray,
                options: SearchOptions, *, start_id: int, end_id: int,
                banned_ids: Sequence[int] = (), no_end_after: Sequence[int] = (),
                no_next_after: Mapping[int, Sequence[int]] | None = None) -> list[list[Hypothesis]]:
    """Caption N images at once.

    features: float32 [N, L, E]; keys: float32 [N, L, A]; hidden0: float32 [N, H]
    (the encoder's outputs). banned_ids: tokens never emitted (<pad>, <start>).
    no_end_after: tokens after which <end> may not come (a caption never ends on them).
    no_next_after: token -> tokens that may not come right after it.
    Returns, per image, its best `options.alternatives` hypotheses, best first.
    """
    if not options.complete:
        raise SearchOptionsError("beam_search needs complete options; call SearchOptions.resolved(defaults) first")
    n_images = features.shape[0]
    if not (keys.shape[0] == hidden0.shape[0] == n_images):
        raise ValueError(f"batch sizes differ: features {features.shape}, keys {keys.shape}, hidden0 {hidden0.shape}")
    if n_images == 0:
        return []
    k = options.beam_size
    holders = [NBest(k, options.length_penalty) for _ in range(n_images)]
    forbidden = np.array(sorted({*banned_ids, start_id}), dtype=np.int64)
    forbidden_first = np.union1d(forbidden, [end_id])  # the first step must say at least one word
    unfinished = np.array(sorted(set(no_end_after)), dtype=np.int64)
    pair_rules = {int(w): np.array(sorted(set(after)), dtype=np.int64) for w, after in (no_next_after or {}).items()
                  if len(after)}

    active = np.arange(n_images)  # [B]: image index of each active image (B shrinks)
    feats = np.repeat(features, k, axis=0)  # [B*K, L, E]
    kys = np.repeat(keys, k, axis=0)  # [B*K, L, A]
    hidden = np.repeat(hidden0, k, axis=0)  # [B*K, H]
    token = np.full(n_images * k, start_id, dtype=np.int64)  # [B*K]
    sums = np.full((n_images, k), -np.inf)  # [B, K] float64 sum of log-probs
    sums[:, 0] = 0.0  # only beam 0 is expanded at step 0: the K beams start identical
    words = np.zeros((n_images * k, 0), dtype=np.int64)  # [B*K, t]
    looks = np.zeros((n_images * k, 0, features.shape[1]), dtype=np.float32)  # [B*K, t, L]

    for t in range(options.max_length):
        if t == 0:  # the K rows of an image are the same: one each, repeated (a K-th of the work)
            first = step(token[:n_images], hidden0, features, keys)
            logprobs, hidden_out, attention = (np.repeat(part, k, axis=0) for part in first)
        else:
            logprobs, hidden_out, attention = step(token, hidden, feats, kys)  # [B*K, V], [B*K, H], [B*K, L]
        if unfinished.size:
            logprobs = _no_end_after(logprobs, token, unfinished, end_id)
        if pair_rules:
            logprobs = _no_next_after(logprobs, token, pair_rules)
        b, vocab = len(active), logprobs.shape[1]
        n_top = 2 * k  # at most K of them are <end> (one per beam), so >= K continue
        top, top_scores = _best_expansions(logprobs, sums, n_top, forbidden if t > 0 else forbidden_first)
        order = np.lexsort((top, -top_scores), axis=1)  # best first; ties: lower flat index first
        top = np.take_along_axis(top, order, axis=1)
        top_scores = np.take_along_axis(top_scores, order, axis=1)
        top_beam = top // vocab  # [B, 2K] explicit integer division: beam within the image
        top_word = top % vocab  # [B, 2K] word id
        source = np.arange(b)[:, None] * k + top_beam  # [B, 2K] row in the (B*K) arrays
        is_end = top_word == end_id

        # <end> among the first K: that beam is finished (words exclude <end>, length counts it)
        for i, r in zip(*np.nonzero(is_end[:, :k] & np.isfinite(top_scores[:, :k]))):
            row = source[i, r]
            holders[active[i]].add(words[row].tolist(), float(top_scores[i, r]), t + 1, looks[row].copy())

        # the first K candidates that are not <end> run on (stable sort keeps score order)
        keep = np.argsort(is_end, axis=1, kind="stable")[:, :k]  # [B, K]
        rows = np.take_along_axis(source, keep, axis=1).reshape(-1)  # [B*K]
        token = np.take_along_axis(top_word, keep, axis=1).reshape(-1).astype(np.int64)  # [B*K]
        sums = np.take_along_axis(top_scores, keep, axis=1)  # [B, K]
        hidden = hidden_out[rows]  # [B*K, H]
        words = np.concatenate([words[rows], token[:, None]], axis=1)  # [B*K, t+1]
        looks = np.concatenate([looks[rows], attention[rows, None].astype(np.float32)], axis=1)  # [B*K, t+1, L]

        if t == options.max_length - 1:  # out of steps: running beams finish without <end>
            for i in range(b):
                for j in range(k):
                    if np.isfinite(sums[i, j]):
                        row = i * k + j
                        holders[active[i]].add(words[row].tolist(), float(sums[i, j]), t + 1, looks[row].copy())
            break

        done = np.array([holders[active[i]].cannot_improve(float(sums[i].max()), t + 1) for i in range(b)])
        if done.all():
            break
        if done.any():  # finished images leave the batch: later steps run on fewer rows
            order, feats, kys = _drop_finished(done, k, feats, kys)
            rows = (order[:, None] * k + np.arange(k)).reshape(-1)  # [B'*K]
            active, sums = active[order], sums[order]
            token, hidden, words, looks = token[rows], hidden[rows], words[rows], looks[rows]

    return [holder.hypotheses[:options.alternatives] for holder in holders]
