"""VizWiz-Captions from a fetched mirror -> `dataset_vizwiz.json` (Karpathy layout) + a flat `images/` folder.

VizWiz-Captions (Gurari et al., ECCV 2020): photos taken by blind people, five captions each,
in the official layout `annotations/{train,val}.json` (COCO-like: images[{id, file_name}],
annotations[{image_id, caption, is_rejected, is_precanned}]) and `train/`, `val/` image folders.
The test captions are not public, so:

- VizWiz val becomes our **test** split (the held-back data no model selection sees);
- a seeded HOLD_OUT_FRACTION of VizWiz train (training.datasets' fraction and seed) becomes our **val**;
- the rest of VizWiz train is **train**.

Captions marked `is_rejected` are dropped; the pre-canned "Quality issues are too severe to
recognize visual content." captions are kept (that is the honest alt text for such a photo).
VizWiz file names are unique across splits, so one flat images/ folder holds them all.

    python -m training.prepare.vizwiz --mirrors /work/.mirror --out /work/shared/data/vizwiz --source owner+name
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Sequence

from rich.console import Console

from training.datasets import HOLD_OUT_FRACTION, SEED
from training.prepare.flickr30k import (
    CopyReport, ImageSource, PrepareError, copy_jpegs, git_dir, provenance, read_text_blob, sha256_of, write_json,
    write_text,
)

# Mirrors known to hold VizWiz-Captions in the official layout; none is reachable today.
KNOWN_SOURCES: tuple[str, ...] = ()
OUTPUT_JSON = "dataset_vizwiz.json"


def read_split(repo: Path, path: str) -> tuple[list[tuple[str, list[str]]], dict[str, int]]:
    """One VizWiz annotations file -> [(file_name, kept captions)] in image order, and counts of what was dropped."""
    try:
        data = json.loads(read_text_blob(repo, path))
    except json.JSONDecodeError as error:
        raise PrepareError(f"{repo}: {path}:{error.lineno}: invalid JSON: {error.msg}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise PrepareError(f"{repo}: {path}: expected an object with an 'images' list")
    names: dict[int, str] = {}
    for index, image in enumerate(data["images"]):
        if not isinstance(image, dict) or not isinstance(image.get("id"), int) or not isinstance(image.get("file_name"), str):
            raise PrepareError(f"{repo}: {path}: images[{index}] needs an integer 'id' and a 'file_name'")
        names[image["id"]] = image["file_name"]
    captions: dict[int, list[str]] = {image_id: [] for image_id in names}
    dropped = {"rejected captions": 0, "images left without a caption": 0}
    for index, note in enumerate(data.get("annotations", [])):
        if not isinstance(note, dict) or note.get("image_id") not in names or not isinstance(note.get("caption"), str):
            raise PrepareError(f"{repo}: {path}: annotations[{index}] needs a known 'image_id' and a 'caption'")
        text = note["caption"].strip()
        if note.get("is_rejected") or not text:
            dropped["rejected captions"] += 1
            continue
        captions[note["image_id"]].append(text)
    kept = [(names[i], texts) for i, texts in captions.items() if texts]
    dropped["images left without a caption"] = len(names) - len(kept)
    return kept, dropped


def held_out(names: list[str], seed: int = SEED) -> set[str]:
    """The seeded HOLD_OUT_FRACTION of train names that becomes val (sorted first: independent of file order)."""
    pool = sorted(names)
    random.Random(seed).shuffle(pool)
    return set(pool[:max(1, round(len(pool) * HOLD_OUT_FRACTION))]) if len(pool) > 1 else set()


def karpathy_images(train: list[tuple[str, list[str]]], val: list[tuple[str, list[str]]]) -> list[dict]:
    """VizWiz train + val -> Karpathy `images` entries with our splits (train / held-out val / VizWiz val as test)."""
    hold = held_out([name for name, _ in train])
    labelled = [(name, texts, "val" if name in hold else "train") for name, texts in train]
    labelled += [(name, texts, "test") for name, texts in val]
    entries, sentid = [], 0
    for imgid, (name, texts, split) in enumerate(labelled):
        sentences = [{"raw": text, "imgid": imgid, "sentid": sentid + n} for n, text in enumerate(texts)]
        sentid += len(texts)
        entries.append({"filename": name, "imgid": imgid, "split": split,
                        "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
    return entries


def prepare(mirrors: Path, out: Path, source: str, annotations: str, train_images: str, val_images: str,
            console: Console) -> CopyReport:
    """Write `out/dataset_vizwiz.json`, copy the images the mirror has into `out/images/`, write `out/README.md`."""
    repo = git_dir(mirrors, source)
    if repo is None:
        raise PrepareError(f"{mirrors}/{source}/repo not found: fetch the mirror first")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, train_dropped = read_split(repo, f"{annotations}/train.json")
    val, val_dropped = read_split(repo, f"{annotations}/val.json")
    entries = karpathy_images(train, val)
    changed = write_json(out / OUTPUT_JSON, {"dataset": "vizwiz", "images": entries})
    console.print(f"{out / OUTPUT_JSON}: {'written' if changed else 'unchanged'}", markup=False, highlight=False)
    sources = [ImageSource(source, train_images), ImageSource(source, val_images)]
    report = copy_jpegs(mirrors, sources, [e["filename"] for e in entries], out / "images", console)
    dropped = {"train.json": train_dropped, "val.json": val_dropped}
    write_text(out / "README.md", readme(mirrors, out, entries, source, annotations, sources, dropped))
    return report


def readme(mirrors: Path, out: Path, entries: list[dict], source: str, annotations: str,
           sources: Sequence[ImageSource], dropped: dict[str, dict[str, int]]) -> str:
    """The data folder's README: provenance, licence, what changed, counts per split, sha256."""
    images = out / "images"
    rows = []
    for split, origin in (("train", "VizWiz train"), ("val", "VizWiz train, held out"), ("test", "VizWiz val")):
        listed = [e for e in entries if e["split"] == split]
        present = sum(1 for e in listed if (images / e["filename"]).is_file())
        captions = sum(len(e["sentences"]) for e in listed)
        rows.append(f"| {split} | {origin} | {len(listed)} | {captions} | {present} |")
    drops = "\n".join(f"- `{name}`: " + ", ".join(f"{what} {count}" for what, count in counts.items())
                      for name, counts in dropped.items())
    folders = ", ".join(f"`{s.folder or '.'}/`" for s in sources)
    return f"""# VizWiz-Captions (photos taken by blind people)

Written by `python -m training.prepare.vizwiz` (caption-cli); re-run it to refresh this file.
Load with `training.datasets.karpathy("{out / OUTPUT_JSON}", "{images}")`.

## Provenance
- {provenance(mirrors, source)}: captions `{annotations}/train.json`, `{annotations}/val.json`; images {folders}.

## Licence
VizWiz-Captions: D. Gurari, Y. Zhao, M. Zhang, N. Bhattacharya (2020), "Captioning Images Taken by People
Who Are Blind", ECCV. Licensed CC BY 4.0.

## What was changed
- The test captions are not public: VizWiz **val** is our **test**; {HOLD_OUT_FRACTION:.0%} of VizWiz train
  (seed {SEED}, names sorted then shuffled) is our **val**; the rest is **train**.
- Captions with `is_rejected` dropped; pre-canned captions kept. Images left with no caption dropped.
{drops}
- Images: byte-for-byte copies, file names unchanged, one flat folder.

## Counts
| split | from | images | captions | images on disk |
| --- | --- | --- | --- | --- |
{chr(10).join(rows)}

## sha256
- `{OUTPUT_JSON}`: `{sha256_of(out / OUTPUT_JSON)}`
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the VizWiz-Captions data folder from a fetched mirror.")
    parser.add_argument("--mirrors", type=Path, required=True, help="folder of fetched mirrors (owner+name/repo)")
    parser.add_argument("--out", type=Path, required=True, help="data folder to write")
    parser.add_argument("--source", default=None, metavar="OWNER+NAME",
                        help="mirror in the official layout (default: the first known one that is fetched)")
    parser.add_argument("--annotations", default="annotations", help="folder of train.json/val.json in the mirror")
    parser.add_argument("--train-images", default="train", help="folder of the train images in the mirror")
    parser.add_argument("--val-images", default="val", help="folder of the val images in the mirror")
    args = parser.parse_args(argv)
    console = Console(stderr=True, soft_wrap=True, highlight=False)
    source = args.source or next((s for s in KNOWN_SOURCES if git_dir(args.mirrors, s)), None)
    if source is None:
        console.print("error: no VizWiz mirror is known or fetched: pass --source owner+name", markup=False)
        return 1
    try:
        report = prepare(args.mirrors, args.out, source, args.annotations.strip("/"),
                         args.train_images.strip("/"), args.val_images.strip("/"), console)
    except (PrepareError, OSError, ValueError) as error:
        console.print(f"error: {error}", markup=False, highlight=False)
        return 1
    console.print(f"images: {report.written} written, {report.skipped} already there, {report.bad} bad blobs, "
                  f"{report.missing} in no mirror", markup=False, highlight=False)
    return 1 if report.bad else 0


if __name__ == "__main__":
    sys.exit(main())
