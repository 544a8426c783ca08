"""CIDEr-D as a per-batch reward, with document frequencies fixed once over a reference corpus.

CIDEr-D (Vedantam et al. 2015, as in the COCO evaluation code): the captions' 1..4-gram
counts weighted by tf-idf, the cosine of hypothesis and each reference per n with the
hypothesis weights clipped at the reference's, a gaussian length penalty
exp(-delta^2 / (2 sigma^2)) with sigma = 6, the mean over n and over references, times 10.

Why not pycocoevalcap's `Cider` as is: it IS this CIDEr-D, but it computes the document
frequencies (and log N) from the references it is handed, so scoring one SCST batch would
weigh n-grams by how common they are in that batch, and a single image always scores 0
(log 1 - log 1). Self-critical training (Rennie et al. 2017) uses the frequencies of the
whole training set, computed once. pycocoevalcap's n-gram counting (`precook`) is reused
as is; its vector and similarity arithmetic are closures inside `CiderScorer.compute_cider`
that cannot be given other frequencies, so they are restated here, term for term: with the
frequencies of the same references the scores equal pycocoevalcap's (a test checks it).
One of its quirks is kept for that equality: the length in the penalty counts bigrams
(words - 1, its `n == 1`), which gives the same delta for any caption of at least one word.

Captions are tokenised with the project's tokenizer (training.vocab.tokenize), the one
the vocabulary was built with, so a model's decoded words and the references agree.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Mapping, Sequence

import numpy as np
from pycocoevalcap.cider.cider_scorer import precook

from training.vocab import tokenize

Vector = tuple[list[dict[tuple[str, ...], float]], list[float], int]  # weights per n, norms per n, length


class CiderD:
    """CIDEr-D of hypotheses against their image's references, idf from all of `references`.

    references: image id -> its reference captions (raw text). The document frequency of an
    n-gram is the number of images with at least one reference containing it, as in
    pycocoevalcap; it is computed here once, so `score` costs only the batch's own n-grams.
    """

    def __init__(self, references: Mapping[str, Sequence[str]], n: int = 4, sigma: float = 6.0) -> None:
        if not references:
            raise ValueError("CIDEr-D needs at least one image's references for its document frequencies")
        self.n, self.sigma = n, sigma
        # kept as token strings: precooked counts of 30k+ captions would cost far more memory
        self.references = {key: [" ".join(tokenize(c)) for c in captions] for key, captions in references.items()}
        if empty := [key for key, captions in self.references.items() if not captions]:
            raise ValueError(f"image {empty[0]!r} has no reference captions")
        frequency: Counter = Counter()
        for captions in self.references.values():
            frequency.update({gram for caption in captions for gram in precook(caption, n)})
        self.log_df = {gram: math.log(count) for gram, count in frequency.items()}
        self.log_images = math.log(len(self.references))  # pycocoevalcap's ref_len

    def _vector(self, caption: str) -> Vector:
        """tf-idf weights of the caption's n-grams (pycocoevalcap's counts2vec)."""
        weights: list[dict[tuple[str, ...], float]] = [{} for _ in range(self.n)]
        norms = [0.0] * self.n
        length = 0
        for gram, count in precook(caption, self.n).items():
            k = len(gram) - 1
            weight = count * (self.log_images - self.log_df.get(gram, 0.0))  # unseen n-gram: df counts as 1
            weights[k][gram] = weight
            norms[k] += weight * weight
            if k == 1:
                length += count  # bigrams: see the module docstring
        return weights, [math.sqrt(x) for x in norms], length

    def _similarity(self, hyp: Vector, ref: Vector) -> float:
        """Sum over n of the clipped cosine, times the length penalty (pycocoevalcap's sim)."""
        (hyp_w, hyp_norm, hyp_len), (ref_w, ref_norm, ref_len) = hyp, ref
        total = 0.0
        for k in range(self.n):
            value = 0.0
            for gram, weight in hyp_w[k].items():
                if gram in ref_w[k]:
                    value += min(weight, ref_w[k][gram]) * ref_w[k][gram]  # clipping: repeats earn nothing
            if hyp_norm[k] != 0 and ref_norm[k] != 0:
                value /= hyp_norm[k] * ref_norm[k]
            total += value
        delta = float(hyp_len - ref_len)
        return total * math.exp(-(delta ** 2) / (2 * self.sigma ** 2))

    def score(self, image_ids: Sequence[str], hypotheses: Sequence[str]) -> np.ndarray:
        """float64 [B]: CIDEr-D of hypotheses[i] (raw text) against image_ids[i]'s references.

        An image repeated in the batch (the K samples of SCST) has its references vectorised once.
        """
        if len(image_ids) != len(hypotheses):
            raise ValueError(f"{len(image_ids)} image ids but {len(hypotheses)} hypotheses")
        refs: dict[str, list[Vector]] = {}
        scores = np.zeros(len(hypotheses))
        for i, (image_id, text) in enumerate(zip(image_ids, hypotheses)):
            if image_id not in refs:
                if image_id not in self.references:
                    raise ValueError(f"image {image_id!r} is not among the references CIDEr-D was built from")
                refs[image_id] = [self._vector(c) for c in self.references[image_id]]
            hyp = self._vector(" ".join(tokenize(text)))
            total = sum(self._similarity(hyp, ref) for ref in refs[image_id])
            scores[i] = 10.0 * total / self.n / len(refs[image_id])
        return scores
