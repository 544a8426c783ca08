"""Words a caption must not end on, learnt from the training captions, written into a bundle.

    python -m export.endings BUNDLE --data flickr8k [--max-rate 0.01] [--dry-run]

Why: a model fine-tuned with a CIDEr reward (SCST) learns that cutting a caption short
costs little, and ends ~8% of Flickr8k val captions on "a", "the" or an adjective
("a boy in a red shirt is playing in a"). Such text is useless as alt text. The fix
known from self-critical.pytorch (`remove_bad_endings`) is to forbid <end> after such
words in the search; here the list is not hand-written but read off the data: a word
that ends at most `max_rate` of its uses in the training captions (and is used at least
`min_count` times, so rare words are left alone) goes into model.json
`search.no_end_after`, which the runtime's beam search obeys (caption_cli/beam.py).
Only the train split is read; the rate is chosen on val (docs/training.md).
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from training.vocab import SPECIALS, tokenize

DEFAULT_MAX_RATE = 0.01
DEFAULT_MIN_COUNT = 50


def never_final_words(captions: Iterable[str], vocab: Iterable[str], *, max_rate: float = DEFAULT_MAX_RATE,
                      min_count: int = DEFAULT_MIN_COUNT) -> list[str]:
    """Vocabulary words seen >= min_count times that end at most max_rate of their captions' uses."""
    if not 0.0 <= max_rate < 1.0:
        raise ValueError(f"max_rate must be in [0, 1), got {max_rate}")
    uses: Counter[str] = Counter()
    final: Counter[str] = Counter()
    for caption in captions:
        words = tokenize(caption)
        if words:
            uses.update(words)
            final[words[-1]] += 1
    known = set(vocab) - set(SPECIALS)
    return sorted(word for word, count in uses.items()
                  if word in known and count >= min_count and final[word] <= max_rate * count)


def set_no_end_after(bundle_dir: Path, words: list[str]) -> Path:
    """Write `search.no_end_after` into a bundle's model.json; a word outside its vocabulary is refused.

    The ONNX files are untouched, so the model id stays; captions that used to end on one
    of these words change (re-run `calibrate` afterwards: the confidence map reads them).
    """
    from export.bundle_writer import update_model_json

    return update_model_json(bundle_dir, lambda meta: meta["search"].__setitem__("no_end_after", list(words)))


def data_arguments(description: str, field: str) -> argparse.ArgumentParser:
    """The command line shared by the search-rule writers: a bundle and the data set it was trained on."""
    from caption_cli.commands.training import DataKind

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path, help=f"bundle folder whose model.json gets search.{field}")
    parser.add_argument("--data", default="flickr8k", choices=[kind.value for kind in DataKind])
    parser.add_argument("--root", type=Path, help="Flickr8k folder (--data flickr8k)")
    parser.add_argument("--annotations", type=Path, help="captions file (other --data kinds)")
    parser.add_argument("--images", type=Path, help="image folder (other --data kinds)")
    parser.add_argument("--dry-run", action="store_true", help="print the rule, change nothing")
    return parser


def train_captions(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """Every caption of the train split, read as `train` reads it (never val or test)."""
    from caption_cli.commands.training import DataKind, load_data

    if args.data != "flickr8k" and (args.annotations is None or args.images is None):
        parser.error(f"--data {args.data} needs --annotations and --images")
    dataset = load_data(DataKind(args.data), args.root, args.images, args.annotations, None)
    return [caption for record in dataset.split("train") for caption in record.captions]


def main(argv: list[str] | None = None) -> None:
    from caption_cli.bundle import load_bundle

    parser = data_arguments(__doc__, "no_end_after")
    parser.add_argument("--max-rate", type=float, default=DEFAULT_MAX_RATE)
    parser.add_argument("--min-count", type=int, default=DEFAULT_MIN_COUNT)
    args = parser.parse_args(argv)
    captions = train_captions(parser, args)
    words = never_final_words(captions, load_bundle(args.bundle).vocab, max_rate=args.max_rate,
                              min_count=args.min_count)
    print(f"{len(words)} words from {len(captions)} train captions (max rate {args.max_rate}, "
          f"min count {args.min_count}): {' '.join(words)}")
    if not args.dry_run:
        print(f"written to {set_no_end_after(args.bundle, words)}")


if __name__ == "__main__":
    main()
