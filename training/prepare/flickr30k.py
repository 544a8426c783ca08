"""Flickr30k from fetched mirrors -> `dataset_flickr30k.json` (Karpathy layout) + a flat `images/` folder.

Captions and splits come from Multi30k Task 2 (mirror `multi30k+dataset`): line i of
`data/task2/raw/{split}.{k}.en.gz` is caption k of the image on line i of
`data/task2/image_splits/{split}_images.txt`, and `data/task2/tok/{split}.lc.norm.tok.{k}.en`
is the same sentence lower-cased and tokenised. These are the five original Flickr30k
captions with the spaces before punctuation taken out ("in the yard." where the token
file says "in the yard ."). Splits: train 29,000, val 1,014, test_2016 1,000 images
(the Karpathy sizes), written as train / val / test.

Images are copied byte for byte from image mirrors that hold `<folder>/<name>.jpg` in any commit
(IMAGE_SOURCES, or `--image-source owner+name:folder`). A blob that is not a JPEG
(an LFS or xet pointer, an HTML page) gets one line naming it, and the copy goes on.
Re-running skips every image already on disk and a JSON file whose content is unchanged.

    python -m training.prepare.flickr30k --mirrors /work/.mirror --out /work/shared/data/flickr30k

The image-copy and file helpers here are shared with `training.prepare.vizwiz`.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from training.prepare.mirror import head_commit, history_files, is_jpeg, is_lfs_pointer, read_blobs, read_objects

CAPTION_MIRROR = "multi30k+dataset"
# our split name -> Multi30k Task 2 file stem
SPLIT_FILES = {"train": "train", "val": "val", "test": "test_2016"}
CAPTIONS_PER_IMAGE = 5
# Mirrors known to hold Flickr30k JPEGs as `<folder>/<name>.jpg`, tried in order.
# benmanafe's snapshot (19,950 images, 4.4 GB) is over the fetch size limit today.
IMAGE_SOURCES = (("benmanafe+cross-modal-retrieval-flickr30k", "flickr30k_images"),)
OUTPUT_JSON = "dataset_flickr30k.json"


class PrepareError(RuntimeError):
    """A source the preparation needs is missing or malformed; the message names it."""


@dataclass(frozen=True)
class ImageSource:
    """A folder of images inside one mirror."""

    mirror: str  # folder name under --mirrors: "owner+name"
    folder: str  # path inside the repository; "" = its root

    @classmethod
    def parse(cls, text: str) -> "ImageSource":
        """'owner+name:folder' (folder optional)."""
        mirror, _, folder = text.partition(":")
        if not mirror:
            raise argparse.ArgumentTypeError(f"{text!r}: expected owner+name:folder")
        return cls(mirror, folder.strip("/"))


@dataclass
class CopyReport:
    written: int = 0
    skipped: int = 0  # already on disk
    bad: int = 0  # in a mirror, but not a JPEG
    missing: int = 0  # wanted, but in no mirror


# ---------------------------------------------------------------- shared helpers


def git_dir(mirrors: Path, mirror: str) -> Path | None:
    """The bare git directory of a fetched mirror (`<mirrors>/<owner+name>/repo`), or None if not fetched."""
    path = Path(mirrors) / mirror / "repo"
    return path if path.is_dir() else None


def read_text_blob(repo: Path, path: str) -> str:
    """A UTF-8 file of the mirror (gunzipped when it ends in .gz); PrepareError naming it when absent."""
    data = next(read_blobs(repo, [path]))[1]
    if data is None:
        raise PrepareError(f"{repo}: {path} is not in the mirror")
    if is_lfs_pointer(data):
        raise PrepareError(f"{repo}: {path} is a Git LFS pointer, not the file")
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    return data.decode("utf-8")


def text_lines(text: str) -> list[str]:
    """Lines without their newline; one trailing newline does not make an empty last line."""
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def write_json(path: Path, data: object) -> bool:
    """Write `data` as UTF-8 JSON through a temporary file; False (nothing written) when the file already says the same."""
    text = json.dumps(data, ensure_ascii=False, indent=None, separators=(",", ":")) + "\n"
    return write_text(path, text)


def write_text(path: Path, text: str) -> bool:
    """Write text atomically; False when the file already holds exactly this text."""
    path = Path(path)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return True


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def copy_jpegs(
    mirrors: Path, sources: Sequence[ImageSource], names: Iterable[str], images: Path, console: Console
) -> CopyReport:
    """Copy each wanted image name from the first source that has it into the flat folder `images`.

    Images already on disk are skipped. A blob that is not a JPEG gets one line naming it
    (the name then stays wanted for a later source).
    """
    images = Path(images)
    images.mkdir(parents=True, exist_ok=True)
    report = CopyReport()
    wanted = set()
    for name in names:
        if (images / name).is_file():
            report.skipped += 1
        else:
            wanted.add(name)
    for source in sources:
        repo = git_dir(mirrors, source.mirror)
        if repo is None or not wanted:
            continue
        prefix = f"{source.folder}/" if source.folder else ""
        # every commit counts: a data folder committed and deleted later is still in the mirror's history
        paths = {item.path[len(prefix):]: item for item in history_files(repo) if item.path.startswith(prefix)}
        todo = sorted(name for name in wanted if name in paths)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task(f"images from {source.mirror}", total=len(todo))
            for name, data in zip(todo, read_objects(repo, [paths[n].blob for n in todo])):
                path = paths[name].path
                progress.advance(task)
                if data is None or not is_jpeg(data):
                    why = "missing" if data is None else "a Git LFS pointer" if is_lfs_pointer(data) else "not a JPEG"
                    console.print(f"{source.mirror}:{path}: {why} ({0 if data is None else len(data)} bytes), skipped",
                                  markup=False, highlight=False)
                    report.bad += 1
                    continue
                tmp = images / f".{name}.part"
                tmp.write_bytes(data)
                os.replace(tmp, images / name)
                wanted.discard(name)
                report.written += 1
    report.missing = len(wanted)
    return report


def provenance(mirrors: Path, mirror: str) -> str:
    """'owner/name @ commit' of a fetched mirror, for the README."""
    repo = git_dir(mirrors, mirror)
    owner_name = mirror.replace("+", "/", 1)
    return f"`{owner_name}` @ `{head_commit(repo)}`" if repo else f"`{owner_name}` (not fetched)"


# ---------------------------------------------------------------- Flickr30k


def karpathy_images(repo: Path) -> list[dict]:
    """Multi30k Task 2 -> the `images` list of a Karpathy split JSON (splits train, val, test)."""
    entries: list[dict] = []
    sentid = 0
    for split, stem in SPLIT_FILES.items():
        names_path = f"data/task2/image_splits/{stem}_images.txt"
        names = [line.strip() for line in text_lines(read_text_blob(repo, names_path))]
        raws, toks = [], []
        for k in range(1, CAPTIONS_PER_IMAGE + 1):
            raw_path, tok_path = f"data/task2/raw/{stem}.{k}.en.gz", f"data/task2/tok/{stem}.lc.norm.tok.{k}.en"
            raws.append(text_lines(read_text_blob(repo, raw_path)))
            toks.append(text_lines(read_text_blob(repo, tok_path)))
            for path, lines in ((raw_path, raws[-1]), (tok_path, toks[-1])):
                if len(lines) != len(names):
                    raise PrepareError(f"{repo}: {path} has {len(lines)} lines, {names_path} has {len(names)}")
        for row, name in enumerate(names):
            imgid = len(entries)
            sentences = []
            for k in range(CAPTIONS_PER_IMAGE):
                raw = raws[k][row].strip()
                if not raw:
                    raise PrepareError(f"{repo}: data/task2/raw/{stem}.{k + 1}.en.gz:{row + 1}: empty caption")
                sentences.append({"raw": raw, "tokens": toks[k][row].split(), "imgid": imgid, "sentid": sentid})
                sentid += 1
            entries.append({
                "filename": name, "imgid": imgid, "split": split,
                "sentids": [s["sentid"] for s in sentences], "sentences": sentences,
            })
    seen: set[str] = set()
    for entry in entries:
        if entry["filename"] in seen:
            raise PrepareError(f"{repo}: {entry['filename']} is listed in two splits")
        seen.add(entry["filename"])
    return entries


def prepare(mirrors: Path, out: Path, sources: Sequence[ImageSource], console: Console) -> CopyReport:
    """Write `out/dataset_flickr30k.json`, copy what images the mirrors have into `out/images/`, write `out/README.md`."""
    repo = git_dir(mirrors, CAPTION_MIRROR)
    if repo is None:
        raise PrepareError(f"{mirrors}/{CAPTION_MIRROR}/repo not found: fetch github:multi30k/dataset first")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries = karpathy_images(repo)
    changed = write_json(out / OUTPUT_JSON, {"dataset": "flickr30k", "images": entries})
    console.print(f"{out / OUTPUT_JSON}: {'written' if changed else 'unchanged'}", markup=False, highlight=False)
    report = copy_jpegs(mirrors, sources, [e["filename"] for e in entries], out / "images", console)
    write_text(out / "README.md", readme(mirrors, out, entries, sources))
    return report


def readme(mirrors: Path, out: Path, entries: list[dict], sources: Sequence[ImageSource]) -> str:
    """The data folder's README: provenance, licence, what changed, counts per split, sha256."""
    images = out / "images"
    rows = []
    for split in SPLIT_FILES:
        listed = [e["filename"] for e in entries if e["split"] == split]
        present = sum(1 for name in listed if (images / name).is_file())
        rows.append(f"| {split} | {len(listed)} | {len(listed) * CAPTIONS_PER_IMAGE} | {present} |")
    on_disk = sum(1 for e in entries if (images / e["filename"]).is_file())
    status = (f"{on_disk} of {len(entries)} listed images are on disk." if on_disk else
              "**No image is on disk**: none of the image sources was fetched with real JPEGs. The captions and splits "
              "are complete; put the images (same names) into images/ or re-run with `--image-source`.")
    source_lines = "\n".join(f"- `{s.folder or '.'}/` of {provenance(mirrors, s.mirror)}" for s in sources) or "- none"
    return f"""# Flickr30k (captions + Karpathy-size split; images only where a mirror had them)

Written by `python -m training.prepare.flickr30k` (caption-cli); re-run it to refresh this file.
Load with `training.datasets.karpathy("{out / OUTPUT_JSON}", "{images}")`.

{status}

## Provenance
- Captions and splits: {provenance(mirrors, CAPTION_MIRROR)}, Multi30k Task 2:
  `data/task2/raw/{{train,val,test_2016}}.{{1..5}}.en.gz` (raw), `data/task2/tok/*.lc.norm.tok.*.en` (tokens),
  `data/task2/image_splits/{{train,val,test_2016}}_images.txt` (split lists).
- Image sources tried (real JPEG blobs only):
{source_lines}

## Licence
Flickr30k: P. Young, A. Lai, M. Hodosh, J. Hockenmaier (2014), "From image descriptions to visual denotations",
TACL 2. The captions are for research use, as the authors ask; the images belong to their Flickr owners.
Multi30k: D. Elliott, S. Frank, K. Sima'an, L. Specia (2016), "Multi30K: Multilingual English-German Image Descriptions".

## What was changed
- Captions are the five original Flickr30k English sentences per image as Multi30k Task 2 ships them: the same
  words, but detokenised (no space before `.`/`,`: "in the yard." where `results_20130124.token` has "in the yard .").
  Caption k of an image is line i of `<split>.k.en`; `tokens` are Multi30k's lower-cased tokenisation.
- Split `test_2016` is written as `test`. No `restval`.
- Images: byte-for-byte copies, file names unchanged.

## Counts
| split | images listed | captions | images on disk |
| --- | --- | --- | --- |
{chr(10).join(rows)}

## sha256
- `{OUTPUT_JSON}`: `{sha256_of(out / OUTPUT_JSON)}`
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the Flickr30k data folder from fetched mirrors.")
    parser.add_argument("--mirrors", type=Path, required=True, help="folder of fetched mirrors (owner+name/repo)")
    parser.add_argument("--out", type=Path, required=True, help="data folder to write")
    parser.add_argument("--image-source", type=ImageSource.parse, action="append", default=None,
                        metavar="OWNER+NAME:FOLDER", help="image mirror to use (repeatable; default: the known ones)")
    args = parser.parse_args(argv)
    console = Console(stderr=True, soft_wrap=True, highlight=False)
    sources = args.image_source or [ImageSource(*source) for source in IMAGE_SOURCES]
    try:
        report = prepare(args.mirrors, args.out, sources, console)
    except (PrepareError, OSError, ValueError) as error:
        console.print(f"error: {error}", markup=False, highlight=False)
        return 1
    console.print(f"images: {report.written} written, {report.skipped} already there, {report.bad} bad blobs, "
                  f"{report.missing} in no mirror", markup=False, highlight=False)
    return 1 if report.bad else 0


if __name__ == "__main__":
    sys.exit(main())
