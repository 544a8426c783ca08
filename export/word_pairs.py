"""Word pairs a caption must not hold, learnt from the training captions, written into a bundle.

    python -m export.word_pairs BUNDLE --data flickr8k [--min-expected 50] [--max-ratio 0.005] [--dry-run]

Why: a model fine-tuned with a CIDEr reward (SCST) learns that the nouns after an article
earn little, and skips them: "a man is sitting on a train in a with a and a car". Such text
is broken alt text even when the confidence holds it back. A pair of common words that
chance alone would put side by side at least `min_expected` times (count(first) *
count(second) / all words) but that the training captions hold at most `max_ratio` times as
often (never, or in a typo or two: "rides a on a playground toy") is not English the model
learnt ("a in", "a and", "a on", "the is"); model.json
`search.no_next_after` lists them and the runtime's beam search never emits the second
word right after the first (caption_cli/beam.py). Rare words are never involved: their
expected counts are small. Only the train split is read; `min_expected` is chosen on val
(docs/training.md).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from export.endings import data_arguments, train_captions
from training.vocab import SPECIALS, tokenize

DEFAULT_MIN_EXPECTED = 50.0
DEFAULT_MAX_RATIO = 0.005


def unlikely_pairs(captions: Iterable[str], vocab: Iterable[str], *, min_expected: float = DEFAULT_MIN_EXPECTED,
                   max_ratio: float = DEFAULT_MAX_RATIO) -> dict[str, list[str]]:
    """first word -> second words: pairs whose independent expected count in `captions`,
    count(first) * count(second) / words, is at least `min_expected`, and that are adjacent
    there at most `max_ratio` times that often (0: never)."""
    if min_expected <= 0:
        raise ValueError(f"min_expected must be positive, got {min_expected}")
    if not 0.0 <= max_ratio < 1.0:
        raise ValueError(f"max_ratio must be in [0, 1), got {max_ratio}")
    uses: Counter[str] = Counter()
    pairs: Counter[tuple[str, str]] = Counter()
    for caption in captions:
        words = tokenize(caption)
        uses.update(words)
        pairs.update(zip(words, words[1:]))
    total = sum(uses.values())
    if not total:
        return {}
    known = set(vocab) - set(SPECIALS)
    top = max(uses.values())
    # only a word used at least min_expected * total / top times can reach min_expected with any partner
    common = sorted(w for w, count in uses.items() if w in known and count * top >= min_expected * total)
    rules: dict[str, list[str]] = {}
    for first in common:
        after = [second for second in common
                 if uses[first] * uses[second] >= min_expected * total
                 and pairs[(first, second)] <= max_ratio * uses[first] * uses[second] / total]
        if after:
            rules[first] = after
    return rules


def set_no_next_after(bundle_dir: Path, rules: dict[str, list[str]]) -> Path:
    """Write `search.no_next_after` into a bundle's model.json; a word outside its vocabulary is refused.

    The ONNX files are untouched, so the model id stays; captions that held one of these pairs
    change (re-run `calibrate` afterwards: the confidence map reads them). The bundle's
    format_version becomes 2, so a caption-cli that would ignore the rule refuses the bundle
    ("upgrade caption-cli") instead of captioning differently under the same model id.
    """
    from caption_cli.bundle import FORMAT_VERSION
    from export.bundle_writer import update_model_json

    def change(meta: dict) -> None:
        meta["search"]["no_next_after"] = dict(rules)
        if rules:  # older runtimes would ignore the rule: they must refuse the bundle instead
            meta["format_version"] = max(meta["format_version"], FORMAT_VERSION)

    return update_model_json(bundle_dir, change)


def main(argv: list[str] | None = None) -> None:
    from caption_cli.bundle import load_bundle

    parser = data_arguments(__doc__, "no_next_after")
    parser.add_argument("--min-expected", type=float, default=DEFAULT_MIN_EXPECTED)
    parser.add_argument("--max-ratio", type=float, default=DEFAULT_MAX_RATIO)
    args = parser.parse_args(argv)
    captions = train_captions(parser, args)
    rules = unlikely_pairs(captions, load_bundle(args.bundle).vocab, min_expected=args.min_expected,
                           max_ratio=args.max_ratio)
    count = sum(map(len, rules.values()))
    shown = "; ".join(f"{first} -/-> {' '.join(after)}" for first, after in list(rules.items())[:5])
    print(f"{count} pairs after {len(rules)} words from {len(captions)} train captions "
          f"(min expected {args.min_expected}, max ratio {args.max_ratio}): {shown}"
          f"{' ...' if len(rules) > 5 else ''}")
    if not args.dry_run:
        print(f"written to {set_no_next_after(args.bundle, rules)}")


if __name__ == "__main__":
    main()
