"""MS-COCO captions + images from fetched GitHub mirrors -> a Karpathy split JSON the project reads.

    python -m training.prepare.coco --mirrors /work/.mirror --out /work/shared/data/coco
    python -m training.prepare.coco --extra-captions --mirrors /work/.mirror --out /work/data/coco-ext-caps

Why this shape: no single public mirror holds COCO (a snapshot lacks files of 4 MiB and
more, so `dataset_coco.json` and the full caption files never come through). The human
captions come in pieces (`CAPTION_SOURCES`), the Karpathy val/test membership from id
lists (`SPLIT_LISTS`), and the images from any mirror whose paths carry COCO file names,
in any commit of its history (repositories often commit a data folder and delete it later).
When several mirrors hold the same picture the largest blob wins (an original beats a
256 px copy). Everything captioned that is not Karpathy val or test is train (Karpathy's
train + restval). `--extra-captions` adds `EXTRA_CAPTION_SOURCES` (off by default, so a
set built without it rebuilds byte for byte).

Output: `images/<12-digit COCO id>.jpg` (one flat folder; 2014 and 2017 names of the same
picture map to one file), `dataset_coco.json` (only images on disk), `provenance.json`
(which repo, commit and path each caption file and image came from) and `README.md`.
Re-running skips images already written; a bad blob costs one line naming it.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image
from rich.progress import Progress

from training.prepare import mirror
from training.prepare.images import BadImage, write_image

SPLITS = ("train", "val", "test")
MAX_SIDE = 640  # COCO's own originals are at most 640 px, so they are kept byte for byte


@dataclass(frozen=True)
class CaptionSource:
    """One caption file in one mirror; `kind` names its layout (see `parse_captions`)."""

    repo: str  # owner/name on GitHub
    path: str
    kind: str  # "albef" | "coco" | "neuraltalk" | "csv" (columns image_id, caption) | "pairs" ([{image_id, caption}])
    what: str  # one line for the README


@dataclass(frozen=True)
class SplitList:
    """A Karpathy split membership list: one `folder/COCO_..._<id>.jpg <id>` per line."""

    repo: str
    path: str
    split: str


CAPTION_SOURCES = (
    CaptionSource("data-ming-and-application/CVLR-RD", "data/coco_test.json", "albef",
                  "Karpathy test split (ALBEF layout), 5000 images"),
    CaptionSource("ruizewang/evaluate", "annotations/captions_val2017.json", "coco",
                  "official COCO 2017 val captions file, 5000 images"),
    CaptionSource("SpartaG117/TRcap", "data/coco_val.json", "neuraltalk",
                  "5000 COCO 2014 images, neuraltalk layout (TRcap's own val pick, not Karpathy val)"),
    CaptionSource("Obmutescence/COCO-MINI", "annotations/captions_train2017.json", "coco",
                  "official COCO 2017 captions, cut to a mini subset"),
    CaptionSource("Obmutescence/COCO-MINI", "annotations/captions_val2017.json", "coco",
                  "official COCO 2017 captions, cut to a mini subset"),
)
# More verbatim COCO captions, added by `--extra-captions`. Where they fall on images the sources
# above caption, they are the same text: 1,755 of 1,756 captions (natalie125), 1,363 of 1,363
# (zrblution), 714 of 714 (xiaodanlu). Kept apart so the default set still rebuilds unchanged.
EXTRA_CAPTION_SOURCES = (
    CaptionSource("zrblution/LLM_HM_3_models", "halleval_qwen/CHAIR/annotations_1000/captions_val2014.json", "coco",
                  "official COCO 2014 val captions cut to 1000 random images"),
    CaptionSource("natalie125/Deep-learning", "coco_captions.csv", "csv",
                  "Leeds COMP5625M COCO subset, 5068 images, 5 captions each (csv image_id,id,caption,image)"),
    CaptionSource("xiaodanlu/Deep-Learning-Project-Image-captioning", "data/selected_data_10000.json", "pairs",
                  "10000 COCO captions [{caption, image_id}], mostly 1 per image"),
)
SPLIT_LISTS = (
    SplitList("peteanderson80/Up-Down-Captioner", "data/coco_splits/karpathy_val_images.txt", "val"),
    SplitList("peteanderson80/Up-Down-Captioner", "data/coco_splits/karpathy_test_images.txt", "test"),
)

# A COCO picture: inside a train/val 2014/2017 folder, or named COCO_{train,val}2014_<id>.
# Folder names matter: repos also hold colourised or edge-map *results* under bare ids.
IMAGE_PATH = re.compile(
    r"(?:^|/)(?:(?:train|val)(?:2014|2017)/(?:COCO_(?:train|val)2014_)?|COCO_(?:train|val)2014_)"
    r"(?P<id>\d{12})\.jpe?g$",
    re.IGNORECASE,
)
ID_IN_NAME = re.compile(r"(\d{12})\.jpe?g$", re.IGNORECASE)
# Folders that hold COCO photos under bare `<12-digit id>.jpg` names, accepted only for the
# repository named: a bare number elsewhere may be anything (an edited copy, another data
# set). Both were checked: every file decodes, its pixel size equals the official
# captions_val2017.json width/height, and ids also held by other mirrors look the same
# (32x32 grey thumbnails differ by 0.12 grey levels against 71 between different ids).
BARE_ID_FOLDERS = {
    "xiaodanlu/Deep-Learning-Project-Image-captioning": re.compile(r"^coco_images/(?P<id>\d{12})\.jpe?g$"),  # 2,693 val2017
    "M-SaiCharan/Caption-Generator": re.compile(r"^Images/(?P<id>\d{12})\.jpe?g$"),  # 85 val2017 originals
}


class PrepareError(RuntimeError):
    """A caption file or split list that is there but cannot be read; names the file."""


# ---------------------------------------------------------------- mirrors


def find_mirror(mirrors: Path, repo: str) -> Path | None:
    """The bare git dir `fetch` made for `repo` ("owner/name"), or None if it was not fetched."""
    base = Path(mirrors) / repo.replace("/", "+") / "repo"
    for candidate in (base, base / ".git"):
        if (candidate / "HEAD").is_file() and (candidate / "objects").is_dir():
            return candidate
    return None


def all_mirrors(mirrors: Path) -> list[tuple[str, Path]]:
    """(owner/name, git dir) of every fetched mirror, sorted by name so runs pick the same copy."""
    found = []
    for folder in sorted(Path(mirrors).glob("*+*")):
        repo = folder.name.replace("+", "/", 1)
        if (git_dir := find_mirror(mirrors, repo)) is not None:
            found.append((repo, git_dir))
    return found


# ---------------------------------------------------------------- captions and splits


def coco_id(name: str) -> int | None:
    """The numeric COCO id in a file name (`COCO_val2014_000000391895.jpg`, `000000391895.jpg`)."""
    match = ID_IN_NAME.search(name)
    return int(match[1]) if match else None


def load_caption_file(kind: str, data: bytes, where: str) -> Any:
    """The file's rows (csv: dicts keyed by the header) or its JSON value; PrepareError names the file."""
    if kind == "csv":
        try:  # utf-8-sig: spreadsheet exports start with a byte-order mark that would rename the first column
            return list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))
        except (csv.Error, UnicodeDecodeError) as error:
            raise PrepareError(f"{where}: invalid CSV ({error})") from None
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PrepareError(f"{where}: invalid JSON ({error})") from None


def parse_captions(kind: str, data: bytes, where: str) -> dict[int, list[str]]:
    """One caption file -> COCO id -> captions in file order."""
    doc = load_caption_file(kind, data, where)
    pairs: list[tuple[int | None, str]] = []
    try:
        if kind == "coco":  # {images: [...], annotations: [{image_id, caption}]}
            pairs = [(int(a["image_id"]), a["caption"]) for a in doc["annotations"]]
        elif kind == "albef":  # [{image: "val2014/COCO_val2014_<id>.jpg", caption: [..] or ".."}]
            for item in doc:
                texts = item["caption"] if isinstance(item["caption"], list) else [item["caption"]]
                pairs += [(coco_id(item["image"]), text) for text in texts]
        elif kind == "neuraltalk":  # [{file_path, id, captions: [..]}]
            pairs = [(int(item["id"]), text) for item in doc for text in item["captions"]]
        elif kind in ("csv", "pairs"):  # csv rows or [{image_id, caption}]: one caption per entry
            pairs = [(int(item["image_id"]), item["caption"]) for item in doc]
        else:
            raise PrepareError(f"{where}: unknown caption layout {kind!r}")
    except (KeyError, TypeError, ValueError) as error:
        raise PrepareError(f"{where}: not the {kind} layout ({type(error).__name__}: {error})") from None
    captions: dict[int, list[str]] = {}
    for image_id, text in pairs:
        if image_id is None or not isinstance(text, str):
            raise PrepareError(f"{where}: an entry without a COCO id or caption text")
        captions.setdefault(image_id, []).append(text)
    return captions


def merge_captions(per_source: Iterable[dict[int, list[str]]]) -> dict[int, list[str]]:
    """Union of the sources per image; a caption repeated by a second source (same text once stripped) is kept once."""
    merged: dict[int, list[str]] = {}
    for captions in per_source:
        for image_id, texts in captions.items():
            kept = merged.setdefault(image_id, [])
            seen = {text.strip() for text in kept}
            for text in texts:
                if text.strip() and text.strip() not in seen:
                    kept.append(text)
                    seen.add(text.strip())
    return merged


def parse_split_list(data: bytes, where: str) -> set[int]:
    """COCO ids of a `karpathy_*_images.txt` list."""
    ids = set()
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if line.strip():
            if (image_id := coco_id(line.split()[0])) is None:
                raise PrepareError(f"{where}:{number}: no COCO image name in {line[:60]!r}")
            ids.add(image_id)
    return ids


def assign_splits(ids: Iterable[int], val: set[int], test: set[int]) -> dict[int, str]:
    """Karpathy split of each id: the val/test lists as given, everything else train (train + restval)."""
    return {i: "test" if i in test else "val" if i in val else "train" for i in ids}


# ---------------------------------------------------------------- images


def image_name(image_id: int) -> str:
    return f"{image_id:012d}.jpg"


Copies = dict[int, list[tuple[str, mirror.HistoryFile]]]  # COCO id -> [(owner/name, file)]


def image_candidates(mirrors: list[tuple[str, Path]], wanted: set[int]) -> Copies:
    """COCO id -> [(owner/name, file)] of every copy the mirrors hold, in any commit, largest blob first.

    A copy is a file whose path names a COCO image (IMAGE_PATH), or a bare id in a folder
    of BARE_ID_FOLDERS for that repository.

    A mirror's files come from its whole history (a data folder committed and deleted later
    still counts). The largest blob first: a full-size original beats a 256 px copy of it.
    """
    found: Copies = {}
    for repo, git_dir in mirrors:
        seen: set[int] = set()
        bare = BARE_ID_FOLDERS.get(repo)
        for item in mirror.history_files(git_dir):
            match = IMAGE_PATH.search(item.path) or (bare.search(item.path) if bare else None)
            if match and (image_id := int(match["id"])) in wanted and image_id not in seen:
                seen.add(image_id)
                found.setdefault(image_id, []).append((repo, item))
    for copies in found.values():
        copies.sort(key=lambda copy: -copy[1].size)  # stable: equal sizes keep the mirrors' name order
    return found


def copy_images(
    mirrors: list[tuple[str, Path]], wanted: set[int], folder: Path, max_side: int, provenance: dict[str, str]
) -> list[str]:
    """Write each wanted image not yet in `folder` from its best good copy (image_candidates); return error lines."""
    folder.mkdir(parents=True, exist_ok=True)
    todo = {i for i in wanted if not (folder / image_name(i)).is_file()}
    candidates = image_candidates(mirrors, todo)
    errors: list[str] = []
    git_dirs = dict(mirrors)
    with Progress(transient=True) as progress:
        task = progress.add_task("images", total=len(candidates))
        rank = 0
        while True:  # round k tries the k-th best copy of every image still missing
            batch: dict[str, list[tuple[int, mirror.HistoryFile]]] = {}
            for image_id, copies in candidates.items():
                if image_id in todo and rank < len(copies):
                    repo, item = copies[rank]
                    batch.setdefault(repo, []).append((image_id, item))
            if not batch:
                break
            for repo, pairs in sorted(batch.items()):
                blobs = mirror.read_objects(git_dirs[repo], [item.blob for _, item in pairs])
                for (image_id, item), data in zip(pairs, blobs):
                    try:
                        if data is None:
                            raise BadImage("listed but not readable from the mirror")
                        write_image(data, folder / image_name(image_id), max_side)
                    except BadImage as error:
                        errors.append(f"{repo}:{item.path}: {error}")
                        print(f"skipped {repo}:{item.path}: {error}", file=sys.stderr)
                        continue
                    todo.discard(image_id)
                    provenance[str(image_id)] = f"{repo}@{item.commit}:{item.path}"
                    progress.advance(task)
            rank += 1
    return errors


# ---------------------------------------------------------------- output


def karpathy_json(captions: dict[int, list[str]], splits: dict[int, str], on_disk: set[int]) -> dict:
    """The `dataset_coco.json` layout (images[{filepath, filename, cocoid, split, sentences[{raw, tokens}]}])."""
    images, sentid = [], 0
    for imgid, image_id in enumerate(sorted(i for i in captions if i in on_disk)):
        sentences = []
        for raw in captions[image_id]:
            tokens = re.findall(r"[a-z0-9]+", raw.lower())
            sentences.append({"raw": raw, "tokens": tokens, "imgid": imgid, "sentid": sentid})
            sentid += 1
        images.append({
            "filepath": "", "filename": image_name(image_id), "cocoid": image_id, "imgid": imgid,
            "split": splits[image_id], "sentids": [s["sentid"] for s in sentences], "sentences": sentences,
        })
    return {"dataset": "coco", "images": images}


def split_counts(ids: Iterable[int], splits: dict[int, str]) -> dict[str, int]:
    counts = Counter(splits[i] for i in ids)
    return {name: counts.get(name, 0) for name in SPLITS}


def size_range(folder: Path, ids: Iterable[int]) -> tuple[int, int]:
    """(smallest, largest) longer side in pixels of the images on disk (headers only, no decoding)."""
    sides = [max(size) for size in image_sizes(folder, ids)]
    return (min(sides), max(sides)) if sides else (0, 0)


def image_sizes(folder: Path, ids: Iterable[int]) -> list[tuple[int, int]]:
    sizes = []
    for image_id in ids:
        with Image.open(folder / image_name(image_id)) as image:
            sizes.append(image.size)
    return sizes


def squashed_count(folder: Path, ids: Iterable[int]) -> int:
    """Images that are exactly square and at most 256 px: copies a repository resized without keeping the aspect.

    (A COCO original is almost never square; the model squares every photo itself, so these are usable.)
    """
    return sum(1 for w, h in image_sizes(folder, ids) if w == h <= 256)


# ---------------------------------------------------------------- run


def caption_sources(extra: bool) -> tuple[CaptionSource, ...]:
    """The caption files to read: CAPTION_SOURCES, then EXTRA_CAPTION_SOURCES when `extra` (merge order matters)."""
    return CAPTION_SOURCES + (EXTRA_CAPTION_SOURCES if extra else ())


def prepare(
    mirrors: Path, out: Path, max_side: int = MAX_SIDE, captions_from: Sequence[CaptionSource] = CAPTION_SOURCES
) -> dict:
    """Read every fetched source, write images + dataset_coco.json + provenance; return the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sources, per_source = [], []
    for source in captions_from:
        git_dir = find_mirror(mirrors, source.repo)
        found = mirror.read_blob_in_history(git_dir, source.path) if git_dir else None
        if found is None:
            print(f"not available: {source.repo}:{source.path} (mirror not fetched, or file absent)", file=sys.stderr)
            continue
        data, commit = found
        captions = parse_captions(source.kind, data, f"{source.repo}:{source.path}")
        per_source.append(captions)
        sources.append({"repo": source.repo, "commit": commit, "path": source.path,
                        "kind": source.kind, "what": source.what, "images": len(captions),
                        "captions": sum(map(len, captions.values()))})
    captions = merge_captions(per_source)
    lists: dict[str, set[int]] = {"val": set(), "test": set()}
    for split_list in SPLIT_LISTS:
        git_dir = find_mirror(mirrors, split_list.repo)
        data = mirror.read_blob(git_dir, split_list.path) if git_dir else None
        if data is None:
            print(f"not available: {split_list.repo}:{split_list.path}", file=sys.stderr)
            continue
        lists[split_list.split] |= parse_split_list(data, f"{split_list.repo}:{split_list.path}")
        sources.append({"repo": split_list.repo, "commit": mirror.head_commit(git_dir), "path": split_list.path,
                        "kind": "split list", "what": f"Karpathy {split_list.split} ids", "images": 0, "captions": 0})
    splits = assign_splits(captions, lists["val"], lists["test"])

    provenance_path = out / "provenance.json"
    old = json.loads(provenance_path.read_text()) if provenance_path.is_file() else {}
    image_sources: dict[str, str] = old.get("images", {})
    errors = copy_images(all_mirrors(mirrors), set(captions), out / "images", max_side, image_sources)
    on_disk = {i for i in captions if (out / "images" / image_name(i)).is_file()}

    dataset = karpathy_json(captions, splits, on_disk)
    text = json.dumps(dataset, ensure_ascii=False)
    (out / "dataset_coco.json").write_text(text, encoding="utf-8")
    summary = {
        "captioned": split_counts(captions, splits),
        "karpathy_lists": {name: len(ids) for name, ids in lists.items()},
        "on_disk": split_counts(on_disk, splits),
        "captions_on_disk": sum(len(captions[i]) for i in on_disk),
        "longer_side_px": size_range(out / "images", on_disk),
        "squashed_to_square": squashed_count(out / "images", on_disk),
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "bad_blobs": errors,
    }
    provenance = {"sources": sources, "images": {k: image_sources[k] for k in sorted(image_sources, key=int)},
                  "summary": summary}
    provenance_path.write_text(json.dumps(provenance, indent=1), encoding="utf-8")
    (out / "README.md").write_text(readme(sources, provenance["images"], summary), encoding="utf-8")
    return summary


def readme(sources: list[dict], images: dict[str, str], summary: dict) -> str:
    """The data folder's README: provenance, licence, changes, counts, checksum."""
    image_repos = Counter(value.split("@", 1)[0] for value in images.values())
    image_commits: dict[str, set[str]] = {}
    for value in images.values():
        repo, rest = value.split("@", 1)
        image_commits.setdefault(repo, set()).add(rest.split(":", 1)[0])
    lines = [
        "# MS-COCO captions (Karpathy split), partial, rebuilt from public GitHub mirrors",
        "",
        "Written by `python -m training.prepare.coco` (caption-cli); re-run it to refresh. Read with",
        "`caption-cli train --data karpathy --annotations dataset_coco.json --images images/`.",
        "Coverage is partial: the counts below are what the fetched mirrors hold; what could not be",
        "reached is listed in caption-cli's docs/training.md, section \"Broad data (MS-COCO)\".",
        "",
        "## Licence",
        "- Captions: MS-COCO annotations, (c) COCO Consortium, CC BY 4.0.",
        "- Images: Flickr photos under their owners' Flickr terms (COCO's terms of use); research use.",
        "",
        "## Caption and split sources",
        "| repo | commit | path | what | images | captions |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {s['repo']} | {s['commit'][:12]} | {s['path']} | {s['what']} | {s['images']} | {s['captions']} |"
              for s in sources]
    lines += ["", "## Image sources (full repo@commit:path per image in provenance.json)",
              "| repo | commit(s) | images |", "| --- | --- | --- |"]
    lines += [f"| {repo} | {', '.join(sorted(c[:12] for c in image_commits[repo]))} | {count} |"
              for repo, count in image_repos.most_common()]
    captioned, disk = summary["captioned"], summary["on_disk"]
    lines += [
        "", "## What was changed",
        "- Images: renamed to `<12-digit COCO id>.jpg`; bytes kept as they are unless a side exceeded",
        f"  {MAX_SIDE} px (then downscaled, JPEG q90). Longer side on disk: {summary['longer_side_px'][0]}-"
        f"{summary['longer_side_px'][1]} px. {summary.get('squashed_to_square', 0)} of them are square copies of at",
        "  most 256 px that a source repository resized without keeping the aspect ratio (the model squares",
        "  every photo itself, so they are used as they are).",
        "- Captions: the human captions as published (not re-cased, not tokenised); the union of the",
        "  sources per image, a caption repeated by a second source kept once. `tokens` are a simple",
        "  lower-cased split, added for the Karpathy layout only.",
        "- Splits: Karpathy val/test ids from the split lists; every other captioned image is train",
        "  (Karpathy train + restval; the `restval` label is not kept).",
        "- `dataset_coco.json` lists only images that are on disk.",
        "", "## Counts",
        "| split | Karpathy size | captioned here | images on disk |",
        "| --- | --- | --- | --- |",
    ]
    full = {"train": 113287, "val": 5000, "test": 5000}
    lines += [f"| {name} | {full[name]} | {captioned[name]} | {disk[name]} |" for name in SPLITS]
    lines += [
        "", f"Captions on disk: {summary['captions_on_disk']}. "
        f"Blobs rejected: {len(summary['bad_blobs'])} (listed in provenance.json).",
        "", f"sha256 of dataset_coco.json: `{summary['sha256']}`", "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mirrors", type=Path, required=True, help="folder of fetched mirrors (owner+name/repo)")
    parser.add_argument("--out", type=Path, required=True, help="output folder, outside the repository")
    parser.add_argument("--max-side", type=int, default=MAX_SIDE, help="downscale images larger than this (px)")
    parser.add_argument(
        "--extra-captions", action="store_true",
        help="also read EXTRA_CAPTION_SOURCES, verbatim COCO captions where they overlap the official ones: "
             "natalie125's csv (5,068 images; 1,755/1,756 identical), zrblution's official "
             "val2014 captions (1,000 images; 1,363/1,363) and xiaodanlu's pairs file (10,000 captions, mostly one "
             "per image; 714/714). Off by default so the documented set rebuilds unchanged")
    args = parser.parse_args(argv)
    try:
        summary = prepare(args.mirrors, args.out, args.max_side, caption_sources(args.extra_captions))
    except (PrepareError, mirror.MirrorError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in summary.items() if k != "bad_blobs"} | {"bad_blobs": len(summary["bad_blobs"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
