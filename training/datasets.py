"""Caption data set readers: every format becomes the same `DataSet` of `Record`s.

Formats: MS-COCO captions JSON, Karpathy split JSON, Flickr8k/30k token files, and
the Kaggle `captions.txt`/`captions.csv`. Each reader only parses its file into
"image id -> captions" (+ split labels when the format has them); `_assemble` is the
one place that checks images on disk, assigns or holds out splits and writes notes,
so every format reports missing images and split choices the same way.

A malformed row raises `DatasetError` with one message naming the file, the line
(or JSON position) and the cause. A listed image that is not on disk is skipped and
reported in `DataSet.missing` and `DataSet.notes`, never a crash.
No torch here: the readers are plain Python so they can be tested and reused anywhere.
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from caption_cli.errors import DatasetError

SPLITS = ("train", "val", "test")
SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}
HOLD_OUT_FRACTION = 0.05  # share of train held out for a split the data set does not give
SEED = 0
SHOWN_MISSING = 5  # how many missing image names a note spells out


@dataclass(frozen=True)
class Record:
    """One image and its reference captions."""

    image_id: str  # path relative to DataSet.image_root, "/"-separated
    captions: tuple[str, ...]
    split: str  # "train" | "val" | "test"


@dataclass
class DataSet:
    """Records whose images exist, plus what was skipped and why."""

    image_root: Path
    records: list[Record]
    missing: list[str] = field(default_factory=list)  # listed, but no file under image_root
    notes: list[str] = field(default_factory=list)  # human-readable decisions (held-out splits, drops)

    def split(self, name: str) -> list[Record]:
        """The records of one split, in file order."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}: choose one of {', '.join(SPLITS)}")
        return [record for record in self.records if record.split == name]

    def path(self, record: Record) -> Path:
        """The image file of one record."""
        return self.image_root / record.image_id

    def summary(self) -> str:
        """One paragraph for the CLI: counts per split, then every note."""
        counts = ", ".join(f"{name} {len(self.split(name))}" for name in SPLITS)
        captions = sum(len(record.captions) for record in self.records)
        lines = [f"{len(self.records)} images ({counts}), {captions} captions, images in {self.image_root}"]
        return "\n".join(lines + self.notes)


# ---------------------------------------------------------------- shared handling


def _assemble(
    image_root: Path,
    captions: Mapping[str, list[str]],
    split_of: Mapping[str, str] | None,
    hold_out: tuple[str, ...],
    *,
    seed: int = SEED,
    notes: list[str] | None = None,
) -> DataSet:
    """Drop images not on disk, assign splits, hold out the splits not given; note each choice.

    captions: image id -> its captions, in file order (an empty list = no captions).
    split_of: image id -> split; None means the data set gives no split (all train).
    hold_out: splits the data set does not give, to carve out of train (HOLD_OUT_FRACTION each).
    """
    image_root = Path(image_root)
    if not image_root.is_dir():
        raise DatasetError(f"{image_root}: image folder not found")
    notes = list(notes or [])
    present, missing, uncaptioned = [], [], 0
    for image_id, texts in captions.items():
        if not texts:
            uncaptioned += 1
        elif (image_root / image_id).is_file():
            present.append(image_id)
        else:
            missing.append(image_id)
    if uncaptioned:
        notes.append(f"{_count(uncaptioned, 'listed image')} with no captions: skipped")
    if missing:
        shown = ", ".join(missing[:SHOWN_MISSING]) + (", ..." if len(missing) > SHOWN_MISSING else "")
        notes.append(f"{_count(len(missing), 'listed image')} not on disk in {image_root}: skipped ({shown})")

    if split_of is None:
        assigned = {image_id: "train" for image_id in present}
    else:
        assigned = {image_id: split_of[image_id] for image_id in present if image_id in split_of}
        if unlisted := len(present) - len(assigned):
            notes.append(f"{_count(unlisted, 'image')} in no split list: dropped")
        if no_captions := sum(1 for image_id in split_of if image_id not in captions):
            notes.append(f"{_count(no_captions, 'image')} in the split lists without captions: ignored")

    if hold_out:
        notes += _hold_out(assigned, hold_out, seed)
    records = [Record(i, tuple(captions[i]), assigned[i]) for i in present if i in assigned]
    return DataSet(image_root, records, missing, notes)


def _hold_out(assigned: dict[str, str], names: tuple[str, ...], seed: int) -> list[str]:
    """Move a seeded random HOLD_OUT_FRACTION of train to each split in `names`; return the notes.

    Sorting before shuffling makes the choice independent of file order; every split
    gets the same share of the original train set.
    """
    train = sorted(image_id for image_id, split in assigned.items() if split == "train")
    count = round(len(train) * HOLD_OUT_FRACTION)
    if len(train) > len(names):
        count = max(count, 1)  # a tiny data set still gets non-empty splits
    random.Random(seed).shuffle(train)
    notes = []
    for n, name in enumerate(names):
        for image_id in train[n * count:(n + 1) * count]:
            assigned[image_id] = name
        notes.append(
            f"no {SPLIT_NAMES[name]} split given: held out {HOLD_OUT_FRACTION:.0%} of train "
            f"({_count(count, 'image')}) as {name}, seed {seed}"
        )
    return notes


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _split_lists(
    train: Path | None, val: Path | None, test: Path | None
) -> tuple[dict[str, str] | None, tuple[str, ...]]:
    """(image id -> split from the given lists, or None; the splits without a list, to hold out of train).

    A list given empty is respected; only a list not given at all is held out.
    """
    lists = {"train": train, "val": val, "test": test}
    return _read_split_lists(lists), tuple(name for name in ("val", "test") if lists[name] is None)


def _read_split_lists(lists: Mapping[str, Path | None]) -> dict[str, str] | None:
    """Split list files (one image name per line) -> image id -> split; None if none given."""
    split_of: dict[str, str] = {}
    given = {name: Path(path) for name, path in lists.items() if path is not None}
    for name, path in given.items():
        for number, line in _lines(path):
            image_id = line.strip()
            if not image_id:
                continue
            if split_of.get(image_id, name) != name:
                raise DatasetError(f"{path}:{number}: {image_id} is already in the {split_of[image_id]} list")
            split_of[image_id] = name
    return split_of if given else None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number from 1, line without its newline) of a UTF-8 text file.

    Split on "\n" only: str.splitlines also breaks at U+2028 and friends, which may sit inside a caption.
    """
    yield from enumerate(_read_text(path).split("\n"), start=1)


def _read_text(path: Path) -> str:
    """A UTF-8 file's text (a BOM is dropped), or DatasetError naming the file."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path}: not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise DatasetError(f"{path}: cannot read ({error.strerror})") from None


def _load_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}:{error.lineno}: invalid JSON: {error.msg}") from None


def _field(item: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """item[key] checked for type; `where` names the file and JSON position for the message."""
    if not isinstance(item, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(item).__name__}")
    if key not in item:
        raise DatasetError(f"{where}: missing {key!r}")
    value = item[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DatasetError(f"{where}: {key!r} has the wrong type ({type(value).__name__})")
    return value


def _caption(text: str, where: str) -> str:
    """A caption with surrounding whitespace removed; an empty one is malformed."""
    text = text.strip()
    if not text:
        raise DatasetError(f"{where}: empty caption")
    return text


# ---------------------------------------------------------------- readers


def coco(
    annotations: Path,
    images: Path,
    val_annotations: Path | None = None,
    val_images: Path | None = None,
    *,
    seed: int = SEED,
) -> DataSet:
    """MS-COCO captions JSON (`captions_train2014.json`): images[{id, file_name}], annotations[{image_id, caption}].

    Without `val_annotations`, 5% of train is held out as val. With train and val
    images in two folders, the image root is their common parent (ids "train2014/x.jpg").
    """
    files = [(Path(annotations), Path(images), "train")]
    if val_annotations is not None:
        files.append((Path(val_annotations), Path(val_images or images), "val"))
    elif val_images is not None:
        raise DatasetError("coco data set: val_images given without val_annotations")
    root = Path(images)
    if len({folder for _, folder, _ in files}) > 1:
        files = [(path, folder.resolve(), split) for path, folder, split in files]
        root = Path(os.path.commonpath([folder for _, folder, _ in files]))
    captions: dict[str, list[str]] = {}
    split_of: dict[str, str] = {}
    for path, folder, split in files:
        prefix = folder.relative_to(root).as_posix()
        for image_id, texts in _coco_file(path).items():
            key = image_id if prefix == "." else f"{prefix}/{image_id}"
            captions[key] = texts
            split_of[key] = split
    return _assemble(root, captions, split_of, () if val_annotations else ("val",), seed=seed)


def _coco_file(path: Path) -> dict[str, list[str]]:
    """One COCO captions file -> file_name -> captions (images without annotations kept, empty)."""
    data = _load_json(path)
    names: dict[int, str] = {}
    for index, image in enumerate(_field(data, "images", list, str(path))):
        where = f"{path}: images[{index}]"
        names[_field(image, "id", int, where)] = _field(image, "file_name", str, where)
    captions: dict[str, list[str]] = {name: [] for name in names.values()}
    for index, note in enumerate(_field(data, "annotations", list, str(path))):
        where = f"{path}: annotations[{index}]"
        image_id = _field(note, "image_id", int, where)
        if image_id not in names:
            raise DatasetError(f"{where}: image_id {image_id} is not in images")
        captions[names[image_id]].append(_caption(_field(note, "caption", str, where), where))
    return captions


def karpathy(annotations: Path, images: Path) -> DataSet:
    """Karpathy split JSON (`dataset_flickr8k.json`, `dataset_coco.json`): splits as given, restval -> train."""
    data = _load_json(Path(annotations))
    captions: dict[str, list[str]] = {}
    split_of: dict[str, str] = {}
    restval = 0
    for index, image in enumerate(_field(data, "images", list, str(annotations))):
        where = f"{annotations}: images[{index}]"
        name = _field(image, "filename", str, where)
        folder = image.get("filepath") or ""
        image_id = f"{folder}/{name}" if folder else name
        split = _field(image, "split", str, where)
        if split not in SPLITS + ("restval",):
            raise DatasetError(f"{where}: unknown split {split!r} (expected train, val, test or restval)")
        if image_id in captions:
            raise DatasetError(f"{where}: {image_id} is listed twice")
        restval += split == "restval"
        split_of[image_id] = "train" if split == "restval" else split
        sentences = _field(image, "sentences", list, where)
        captions[image_id] = [
            _caption(_field(sentence, "raw", str, f"{where}.sentences[{n}]"), f"{where}.sentences[{n}]")
            for n, sentence in enumerate(sentences)
        ]
    notes = [f"{_count(restval, 'restval image')} counted as train"] if restval else []
    return _assemble(Path(images), captions, split_of, (), notes=notes)


# `image.jpg#3<TAB>caption`; one spread copy of Flickr8k has a few tabs turned into spaces.
TOKEN_LINE = re.compile(r"(?P<image>[^\t#]+)#(?P<index>\d+)(?:\t| +)(?P<caption>.*)")


def flickr(
    tokens: Path,
    images: Path,
    train: Path | None = None,
    val: Path | None = None,
    test: Path | None = None,
    *,
    seed: int = SEED,
) -> DataSet:
    """Flickr8k/30k token file (`image.jpg#i<TAB>caption`) with split list files.

    Images in no list are dropped. A val or test list not given is held out of train.
    """
    captions: dict[str, list[str]] = {}
    for number, line in _lines(Path(tokens)):
        if not line.strip():
            continue
        match = TOKEN_LINE.fullmatch(line)
        if match is None:
            raise DatasetError(f"{tokens}:{number}: expected 'image#index<TAB>caption', got {line[:60]!r}")
        captions.setdefault(match["image"], []).append(_caption(match["caption"], f"{tokens}:{number}"))
    return _assemble(Path(images), captions, *_split_lists(train, val, test), seed=seed)


def kaggle(
    captions: Path,
    images: Path,
    train: Path | None = None,
    val: Path | None = None,
    test: Path | None = None,
    *,
    seed: int = SEED,
) -> DataSet:
    """Kaggle `captions.txt`/`captions.csv`: an `image,caption` header, then real CSV rows.

    Split by the given list files; a val or test list not given is held out of train.
    """
    path = Path(captions)
    texts: dict[str, list[str]] = {}
    rows = _csv_rows(path)
    for number, header in rows:
        if [cell.strip().lower() for cell in header] != ["image", "caption"]:
            raise DatasetError(f"{path}:{number}: expected the header 'image,caption', got {','.join(header)!r}")
        break
    for number, row in rows:
        if len(row) != 2:
            raise DatasetError(f"{path}:{number}: expected 'image,caption', got {_count(len(row), 'field')}")
        if not row[0].strip():
            raise DatasetError(f"{path}:{number}: empty image name")
        texts.setdefault(row[0].strip(), []).append(_caption(row[1], f"{path}:{number}"))
    if not texts:
        raise DatasetError(f"{path}: no caption rows")
    return _assemble(Path(images), texts, *_split_lists(train, val, test), seed=seed)


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line where the row starts, cells) of each non-blank CSV row; bad quoting -> DatasetError."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), strict=True)
    start = 1
    try:
        for row in reader:
            if row:
                yield start, row
            start = reader.line_num + 1
    except csv.Error as error:
        raise DatasetError(f"{path}:{reader.line_num}: bad CSV ({error})") from None


# ---------------------------------------------------------------- dispatch

READERS: dict[str, Callable[..., DataSet]] = {"coco": coco, "karpathy": karpathy, "flickr": flickr, "kaggle": kaggle}


def load_dataset(kind: str, **paths: Any) -> DataSet:
    """Read a data set of `kind` ("coco", "karpathy", "flickr", "kaggle"); `paths` are that reader's arguments."""
    if kind not in READERS:
        raise DatasetError(f"unknown data set kind {kind!r}: choose one of {', '.join(sorted(READERS))}")
    reader = READERS[kind]
    parameters = inspect.signature(reader).parameters
    if unknown := sorted(set(paths) - set(parameters)):
        raise DatasetError(f"{kind} data set: unknown option(s) {', '.join(unknown)} (takes {', '.join(parameters)})")
    needed = [name for name, p in parameters.items() if p.default is inspect.Parameter.empty and name not in paths]
    if needed:
        raise DatasetError(f"{kind} data set: missing {', '.join(needed)}")
    return reader(**paths)


def flickr8k(root: Path) -> DataSet:
    """The Flickr8k folder layout: Flickr8k.token.txt, images/, splits/{train,val,test}.txt."""
    root = Path(root)
    splits = root / "splits"
    return flickr(
        root / "Flickr8k.token.txt", root / "images",
        train=splits / "train.txt", val=splits / "val.txt", test=splits / "test.txt",
    )
