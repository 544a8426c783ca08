"""training.prepare.union: two tiny data sets -> one Karpathy JSON that the reader takes back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from caption_cli.errors import DatasetError
from training.datasets import karpathy
from training.prepare.union import Part, build_union, main


def karpathy_part(folder: Path, names_splits: dict[str, str]) -> Path:
    (folder / "images").mkdir(parents=True)
    images = []
    for name, split in names_splits.items():
        Image.new("RGB", (8, 8)).save(folder / "images" / name)
        images.append({"filename": name, "split": split,
                       "sentences": [{"raw": f"a photo called {name}"}, {"raw": "something else"}]})
    (folder / "data.json").write_text(json.dumps({"images": images}))
    return folder


def part(name: str, folder: Path) -> Part:
    return Part.parse(f"{name}=karpathy:annotations={folder / 'data.json'},images={folder / 'images'}")


def test_union_keeps_every_split_and_reads_back(tmp_path: Path):
    a = karpathy_part(tmp_path / "a", {"1.jpg": "train", "2.jpg": "test"})
    b = karpathy_part(tmp_path / "b", {"1.jpg": "train", "3.jpg": "val", "4.jpg": "restval"})

    counts = build_union([part("flickr", a), part("coco", b)], tmp_path / "union")

    assert counts == {"flickr": {"train": 1, "val": 0, "test": 1}, "coco": {"train": 2, "val": 1, "test": 0}}
    union = karpathy(tmp_path / "union" / "dataset_union.json", tmp_path / "union" / "images")
    by_id = {record.image_id: record for record in union.records}
    assert set(by_id) == {"flickr/1.jpg", "flickr/2.jpg", "coco/1.jpg", "coco/3.jpg", "coco/4.jpg"}
    assert by_id["flickr/2.jpg"].split == "test" and by_id["coco/4.jpg"].split == "train"
    assert by_id["coco/1.jpg"].captions == ("a photo called 1.jpg", "something else")
    assert union.path(by_id["coco/3.jpg"]).resolve() == (b / "images" / "3.jpg").resolve()
    assert not union.missing
    # Running again over the same parts is fine; a different target under a used name is not.
    build_union([part("flickr", a), part("coco", b)], tmp_path / "union")
    with pytest.raises(DatasetError, match="not a link to"):
        build_union([part("flickr", b)], tmp_path / "union")


def test_bad_part_specs_are_refused(tmp_path: Path):
    with pytest.raises(DatasetError, match="NAME=KIND"):
        Part.parse("no-equals-sign")
    with pytest.raises(DatasetError, match="plain folder name"):
        Part.parse("../x=karpathy:annotations=a.json,images=i")
    a = karpathy_part(tmp_path / "a", {"1.jpg": "train"})
    with pytest.raises(DatasetError, match="must differ"):
        build_union([part("x", a), part("x", a)], tmp_path / "u")


def test_cli_prints_counts(tmp_path: Path, capsys):
    a = karpathy_part(tmp_path / "a", {"1.jpg": "train", "2.jpg": "val"})
    main(["--out", str(tmp_path / "u"), "--part", f"a=karpathy:annotations={a / 'data.json'},images={a / 'images'}"])
    assert "union: train 1, val 1, test 0" in capsys.readouterr().out
