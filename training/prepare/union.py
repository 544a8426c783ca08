"""Several prepared data sets -> one Karpathy JSON + one image folder, to train on their union.

Each part is read by the project's own readers (training.datasets.load_dataset), so
its splits stay as they are: a test image of any part stays test, and nothing is
moved between splits. The union folder holds one symlink per part (no image is
copied), and every image's Karpathy `filepath` is its part's name:

    union/
      dataset_union.json      images[i] = {filepath: "coco", filename: "x.jpg", split, sentences}
      images/coco -> /work/shared/data/coco/images
      images/flickr8k -> /work/shared/data/flickr8k/images

    python -m training.prepare.union --out /work/union \\
        --part flickr8k=flickr8k:root=/work/shared/data/flickr8k \\
        --part coco=karpathy:annotations=/work/shared/data/coco/dataset_coco.json,images=/work/shared/data/coco/images
    caption-cli train --data karpathy --annotations /work/union/dataset_union.json --images /work/union/images

Evaluate each test set on its own (the union's test split mixes them): the parts'
own annotation files still work with `caption-cli evaluate`.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from caption_cli.errors import DatasetError
from training.datasets import SPLITS, DataSet, flickr8k, load_dataset

UNION_JSON = "dataset_union.json"


@dataclass(frozen=True)
class Part:
    """One data set in the union: a name (its folder in images/), a reader and its paths."""

    name: str
    kind: str
    paths: dict[str, Path]

    @classmethod
    def parse(cls, text: str) -> Part:
        """NAME=KIND:key=path,key=path (the reader's arguments, as load_dataset takes them)."""
        try:
            name, rest = text.split("=", 1)
            kind, _, args = rest.partition(":")
            paths = {key: Path(value) for key, value in (arg.split("=", 1) for arg in args.split(",") if arg)}
        except ValueError:
            raise DatasetError(f"--part {text!r}: expected NAME=KIND:key=path,key=path") from None
        if not name or "/" in name or name.startswith("."):
            raise DatasetError(f"--part {text!r}: the name must be a plain folder name")
        return cls(name, kind, paths)

    def load(self) -> DataSet:
        if self.kind == "flickr8k":  # the folder layout, not a load_dataset kind
            return flickr8k(**self.paths)
        return load_dataset(self.kind, **self.paths)


def build_union(parts: Sequence[Part], out: Path) -> dict[str, dict[str, int]]:
    """Write out/dataset_union.json and out/images/<part> links; returns images per part and split."""
    names = [part.name for part in parts]
    if len(set(names)) != len(names):
        raise DatasetError(f"part names must differ: {', '.join(names)}")
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    entries, counts = [], {}
    for part in parts:
        data = part.load()
        link = images_dir / part.name
        if link.is_symlink() or link.exists():
            if not link.is_symlink() or Path(os.readlink(link)) != data.image_root.resolve():
                raise DatasetError(f"{link} exists and is not a link to {data.image_root}")
        else:
            link.symlink_to(data.image_root.resolve(), target_is_directory=True)
        counts[part.name] = {split: len(data.split(split)) for split in SPLITS}
        for record in data.records:
            entries.append({
                "filepath": part.name,
                "filename": record.image_id,
                "split": record.split,
                "sentences": [{"raw": caption, "tokens": caption.lower().split()} for caption in record.captions],
            })
    for index, entry in enumerate(entries):
        entry["imgid"] = index
    document = {"dataset": "union:" + "+".join(names), "images": entries}
    target = out / UNION_JSON
    partial = target.with_name(f".{target.name}.part")
    partial.write_text(json.dumps(document), encoding="utf-8")
    os.replace(partial, target)
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="union folder (JSON + image links)")
    parser.add_argument("--part", action="append", required=True, type=Part.parse,
                        help="NAME=KIND:key=path,... (KIND: flickr8k, karpathy, coco, flickr, kaggle)")
    args = parser.parse_args(argv)
    counts = build_union(args.part, args.out)
    for name, per_split in counts.items():
        print(f"{name}: " + ", ".join(f"{split} {count}" for split, count in per_split.items()))
    total = {split: sum(c[split] for c in counts.values()) for split in SPLITS}
    print("union: " + ", ".join(f"{split} {count}" for split, count in total.items()) + f" -> {args.out / UNION_JSON}")


if __name__ == "__main__":
    main()
