"""Teacher-forced scoring: a second model's log-probability of captions already chosen.

The confidence scorer (docs/bundle.md) reads each caption the beam search picked, word
by word, and sums its own log-probability of every word and of the ending. It needs no
search: one decoder step per token position over all captions at once. Rows are sorted
longest first, so the captions still being read at step t are always a leading slice of
the arrays and each step runs on views, without copying the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# (token [R], hidden [R, H], features [R, L, E], keys [R, L, A]) -> (logprobs [R, V], hidden [R, H], attention)
StepFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def sequence_logprobs(step: StepFn, sequences: Sequence[Sequence[int]], image_of: Sequence[int],
                      features: np.ndarray, keys: np.ndarray, hidden0: np.ndarray, *, start_id: int) -> np.ndarray:
    """Sum of log p(token_t | tokens before, image) over each sequence, float64 [R].

    sequences: the tokens to score, one row each (words, then <end> when the caption ended);
    image_of: the image (row of features / keys / hidden0) each sequence describes.
    """
    count = len(sequences)
    if len(image_of) != count:
        raise ValueError(f"{count} sequences but {len(image_of)} image indices")
    totals = np.zeros(count, dtype=np.float64)
    if count == 0:
        return totals
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")  # longest first: the active rows are a prefix
    longest = int(lengths[order[0]])
    targets = np.zeros((count, max(longest, 1)), dtype=np.int64)
    for row, index in enumerate(order):
        targets[row, :lengths[index]] = sequences[index]
    images = np.asarray(image_of, dtype=np.int64)[order]
    features, keys, hidden = features[images], keys[images], hidden0[images]
    token = np.full(count, start_id, dtype=np.int64)
    sorted_lengths = lengths[order]
    sums = np.zeros(count, dtype=np.float64)
    for t in range(longest):
        active = int(np.count_nonzero(sorted_lengths > t))
        logprobs, hidden, _ = step(token[:active], hidden[:active], features[:active], keys[:active])
        token = targets[:active, t]
        sums[:active] += logprobs[np.arange(active), token]
    totals[order] = sums
    return totals
