"""Caption metrics from pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr.

The PTB tokenizer and METEOR are Java programs. Without Java we say so and score
with the Python-only metrics on our own tokenisation instead of failing.
"""

from __future__ import annotations

import shutil
from typing import Mapping, Sequence

from training.vocab import tokenize


def java_available() -> bool:
    return shutil.which("java") is not None


def _simple_tokenize(captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    return {key: [" ".join(tokenize(c)) for c in values] for key, values in captions.items()}


def _tokenized(references: Mapping[str, Sequence[str]], hypotheses: Mapping[str, str],
               ptb: bool) -> tuple[dict, dict, list[str]]:
    """(refs, hyps, notes) tokenised for pycocoevalcap: PTB when Java is there, ours otherwise."""
    ids = sorted(hypotheses)
    refs = {i: list(references[i]) for i in ids}
    hyps = {i: [hypotheses[i]] for i in ids}
    notes = []
    if ptb and java_available():
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenizer = PTBTokenizer()
        refs = tokenizer.tokenize({i: [{"caption": c} for c in refs[i]] for i in ids})
        hyps = tokenizer.tokenize({i: [{"caption": c} for c in hyps[i]] for i in ids})
    else:
        if ptb:
            notes.append("java not found: PTB tokenizer replaced by the project's tokenizer")
        refs, hyps = _simple_tokenize(refs), _simple_tokenize(hyps)
    return refs, hyps, notes


def per_image_cider(references: Mapping[str, Sequence[str]], hypotheses: Mapping[str, str],
                    *, ptb: bool = True) -> tuple[list[str], "np.ndarray"]:
    """(ids sorted, CIDEr of each image's hypothesis) with document frequencies over these images,
    as pycocoevalcap computes the corpus CIDEr (its mean is the corpus score)."""
    import numpy as np
    from pycocoevalcap.cider.cider import Cider

    refs, hyps, _ = _tokenized(references, hypotheses, ptb)
    ids = sorted(hyps)
    _, scores = Cider().compute_score({i: refs[i] for i in ids}, {i: hyps[i] for i in ids})
    return ids, np.asarray(scores, dtype=np.float64)


def score_captions(references: Mapping[str, Sequence[str]], hypotheses: Mapping[str, str],
                   *, meteor: bool = True, ptb: bool = True) -> dict[str, float]:
    """Corpus scores for hypotheses[id] against references[id] (several each).

    `ptb`/`meteor` need Java; they are skipped (and the result says so under
    "notes") when it is missing. Fast per-epoch validation passes both False.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    has_java = java_available()
    refs, hyps, notes = _tokenized(references, hypotheses, ptb)
    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    for n, value in enumerate(bleu, start=1):
        scores[f"BLEU-{n}"] = float(value)
    if meteor and has_java:
        from pycocoevalcap.meteor.meteor import Meteor

        scores["METEOR"] = float(Meteor().compute_score(refs, hyps)[0])
    elif meteor:
        notes.append("java not found: METEOR skipped (install a JRE, e.g. apt-get install default-jre-headless)")
    scores["ROUGE-L"] = float(Rouge().compute_score(refs, hyps)[0])
    scores["CIDEr"] = float(Cider().compute_score(refs, hyps)[0])
    if notes:
        scores["notes"] = notes  # type: ignore[assignment]
    return scores
