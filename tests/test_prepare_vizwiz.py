"""training.prepare.vizwiz on a tiny fake mirror in the official VizWiz-Captions layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_prepare_flickr30k import LFS, jpeg, make_mirror
from training.datasets import karpathy
from training.prepare import vizwiz

QUALITY = "Quality issues are too severe to recognize visual content."


def annotations(split: str, captions: dict[int, list[tuple[str, bool, bool]]]) -> bytes:
    """A VizWiz annotations file: image id -> [(caption, is_rejected, is_precanned)]."""
    images = [{"file_name": f"VizWiz_{split}_{i:08d}.jpg", "vizwiz_url": "https://example.org/x.jpg", "id": i,
               "text_detected": False} for i in captions]
    notes, next_id = [], 0
    for image_id, texts in captions.items():
        for text, rejected, precanned in texts:
            notes.append({"caption": text, "image_id": image_id, "is_precanned": precanned,
                          "is_rejected": rejected, "id": next_id, "text_detected": False})
            next_id += 1
    return json.dumps({"info": {"version": "fake"}, "images": images, "annotations": notes}).encode()


TRAIN = {i: [(f"a bottle number {i}", False, False), (f"bottle {i} on a table", False, False)] for i in range(40)}
TRAIN[3] = [("rejected one", True, False), (QUALITY, False, True)]
TRAIN[7] = [("only rejected", True, False)]  # no caption left: dropped
VAL = {0: [("a can of soup", False, False)], 1: [("a remote control", False, False)]}


@pytest.fixture
def mirrors(tmp_path: Path) -> Path:
    root = tmp_path / "mirrors"
    files = {"annotations/train.json": annotations("train", TRAIN), "annotations/val.json": annotations("val", VAL)}
    files.update({f"train/VizWiz_train_{i:08d}.jpg": jpeg((i, 0, 0)) for i in range(40) if i != 5})
    files["train/VizWiz_train_00000009.jpg"] = LFS
    files["val/VizWiz_val_00000000.jpg"] = jpeg((0, 0, 50))
    files["val/VizWiz_val_00000001.jpg"] = jpeg((0, 0, 60))
    make_mirror(root, "someone+vizwiz", files)
    return root


def run(mirrors: Path, out: Path, capsys) -> tuple[int, list[str]]:
    code = vizwiz.main(["--mirrors", str(mirrors), "--out", str(out), "--source", "someone+vizwiz"])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_splits_captions_images_and_readme(mirrors: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "vizwiz"
    code, lines = run(mirrors, out, capsys)
    assert code == 1
    assert lines == [
        f"{out / 'dataset_vizwiz.json'}: written",
        "someone+vizwiz:train/VizWiz_train_00000009.jpg: a Git LFS pointer (128 bytes), skipped",
        "images: 39 written, 0 already there, 1 bad blobs, 2 in no mirror",  # 00000005 absent, 00000009 a pointer
    ]
    data = json.loads((out / "dataset_vizwiz.json").read_text())
    splits = {e["filename"]: e["split"] for e in data["images"]}
    assert "VizWiz_train_00000007.jpg" not in splits
    held = sorted(name for name, split in splits.items() if split == "val")
    assert held == sorted(vizwiz.held_out([f"VizWiz_train_{i:08d}.jpg" for i in range(40) if i != 7]))
    assert len(held) == 2  # round(39 * 5%)
    assert [n for n, s in splits.items() if s == "test"] == ["VizWiz_val_00000000.jpg", "VizWiz_val_00000001.jpg"]
    assert sum(s == "train" for s in splits.values()) == 37
    third = next(e for e in data["images"] if e["filename"] == "VizWiz_train_00000003.jpg")
    assert [s["raw"] for s in third["sentences"]] == [QUALITY]

    dataset = karpathy(out / "dataset_vizwiz.json", out / "images")
    assert len(dataset.records) == 39 - 2 + 2  # 39 train+val listed, 2 not on disk, 2 test
    assert sorted(dataset.missing) == ["VizWiz_train_00000005.jpg", "VizWiz_train_00000009.jpg"]
    assert [r.captions for r in dataset.split("test")] == [("a can of soup",), ("a remote control",)]

    readme = (out / "README.md").read_text()
    assert "| test | VizWiz val | 2 | 2 | 2 |" in readme
    assert "- `train.json`: rejected captions 2, images left without a caption 1" in readme
    assert vizwiz.sha256_of(out / "dataset_vizwiz.json") in readme


def test_second_run_is_a_no_op(mirrors: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "vizwiz"
    run(mirrors, out, capsys)
    text = (out / "dataset_vizwiz.json").read_bytes()
    code, lines = run(mirrors, out, capsys)
    assert lines[0] == f"{out / 'dataset_vizwiz.json'}: unchanged"
    assert code == 1  # the pointer is still wanted, so it is read and reported again
    assert lines[1:] == ["someone+vizwiz:train/VizWiz_train_00000009.jpg: a Git LFS pointer (128 bytes), skipped",
                         "images: 0 written, 39 already there, 1 bad blobs, 2 in no mirror"]
    assert (out / "dataset_vizwiz.json").read_bytes() == text


def test_no_source_is_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "mirrors").mkdir()
    assert vizwiz.main(["--mirrors", str(tmp_path / "mirrors"), "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip() == "error: no VizWiz mirror is known or fetched: pass --source owner+name"


def test_bad_annotation_names_file_and_item(tmp_path: Path, capsys) -> None:
    bad = json.dumps({"images": [{"id": 0, "file_name": "x.jpg"}], "annotations": [{"image_id": 5, "caption": "c"}]})
    make_mirror(tmp_path / "mirrors", "a+b", {"annotations/train.json": bad.encode(),
                                              "annotations/val.json": annotations("val", VAL)})
    assert vizwiz.main(["--mirrors", str(tmp_path / "mirrors"), "--out", str(tmp_path / "out"), "--source", "a+b"]) == 1
    assert "annotations/train.json: annotations[0] needs a known 'image_id' and a 'caption'" in capsys.readouterr().err
