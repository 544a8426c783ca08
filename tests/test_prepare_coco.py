"""COCO preparation on fake bare-git mirrors laid out like the real ones (no network, no real data)."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from training.datasets import karpathy
from training.prepare import coco, mirror
from training.prepare.images import BadImage, check_jpeg

LFS = b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n"
BIG_LFS = LFS + b"x" * 5000  # a pointer larger than the real copy elsewhere: tried first, rejected, then the next copy


def jpeg(size: tuple[int, int] = (32, 24), color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG")
    return buffer.getvalue()


def bare_mirror(mirrors: Path, repo: str, files: dict[str, bytes], deleted_later: tuple[str, ...] = ()) -> Path:
    """A bare git repo at mirrors/owner+name/repo holding `files`, like the search tool's fetch.

    Paths in `deleted_later` are removed again in a second commit: only the history has them.
    """
    work = mirrors.parent / "work" / repo.replace("/", "+")
    for path, data in files.items():
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        (work / path).write_bytes(data)
    git = ["git", "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(work)], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "data"], check=True)
    if deleted_later:
        subprocess.run(git + ["rm", "-q", *deleted_later], check=True)
        subprocess.run(git + ["commit", "-qm", "remove the data"], check=True)
    target = mirrors / repo.replace("/", "+") / "repo"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(target)], check=True)
    return target


def name(image_id: int, folder: str = "val2014") -> str:
    return f"{folder}/COCO_{folder}_{image_id:012d}.jpg"


@pytest.fixture
def mirrors(tmp_path: Path) -> Path:
    root = tmp_path / "mirrors"
    albef = [{"image": name(1), "caption": ["A red square. ", "Red."]},
             {"image": name(2), "caption": ["A blue square."]}]
    official = {"images": [{"id": 3, "file_name": "000000000003.jpg"}, {"id": 1, "file_name": "000000000001.jpg"}],
                "annotations": [{"image_id": 3, "caption": "A green square."},
                                {"image_id": 1, "caption": "A red square."},  # repeats the test file: kept once
                                {"image_id": 1, "caption": "Something red."}]}
    neuraltalk = [{"file_path": name(4, "train2014"), "id": 4, "captions": ["A square."]},
                  {"file_path": name(5), "id": 5, "captions": ["Karpathy val picture."]}]
    bare_mirror(root, "data-ming-and-application/CVLR-RD", {"data/coco_test.json": json.dumps(albef).encode()})
    bare_mirror(root, "ruizewang/evaluate", {"annotations/captions_val2017.json": json.dumps(official).encode()})
    bare_mirror(root, "SpartaG117/TRcap", {"data/coco_val.json": json.dumps(neuraltalk).encode()})
    lists = "data/coco_splits/karpathy_{}_images.txt"
    bare_mirror(root, "peteanderson80/Up-Down-Captioner", {
        lists.format("val"): f"{name(5)} 5\n".encode(),
        lists.format("test"): f"{name(1)} 1\n{name(2)} 2\n".encode(),
    })
    bare_mirror(root, "someone/images", {
        name(1): jpeg(), name(2): BIG_LFS,  # id 2: an LFS pointer, rejected; zz/images has it
        "train2017/000000000003.jpg": jpeg((1000, 500), "green"),  # larger than max side: downscaled
        name(4, "train2014"): b"<html>not found</html>",  # not a JPEG, rejected
        "results/000000000005.jpg": jpeg(),  # a bare id outside a COCO folder: not taken as COCO
    })
    bare_mirror(root, "zz/images", {"val2017/000000000005.jpg": jpeg(), "val2014/COCO_val2014_000000000002.jpg": jpeg()})
    return root


def test_prepare_writes_a_karpathy_json_the_reader_loads(mirrors: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "coco"
    summary = coco.prepare(mirrors, out, max_side=640)

    assert summary["captioned"] == {"train": 2, "val": 1, "test": 2}
    assert summary["on_disk"] == {"train": 1, "val": 1, "test": 2}  # id 4 only had a non-JPEG
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "000000000001.jpg", "000000000002.jpg", "000000000003.jpg", "000000000005.jpg"]
    assert Image.open(out / "images/000000000003.jpg").size == (640, 320)
    assert summary["bad_blobs"] == [
        "someone/images:train2014/COCO_train2014_000000000004.jpg: not a JPEG (starts 3c68746d)",
        "someone/images:val2014/COCO_val2014_000000000002.jpg: Git LFS pointer, not the image",
    ]
    assert "skipped someone/images:val2014/COCO_val2014_000000000002.jpg: Git LFS pointer" in capsys.readouterr().err

    data = karpathy(out / "dataset_coco.json", out / "images")
    assert [(r.image_id, r.split, r.captions) for r in data.records] == [
        ("000000000001.jpg", "test", ("A red square.", "Red.", "Something red.")),
        ("000000000002.jpg", "test", ("A blue square.",)),
        ("000000000003.jpg", "train", ("A green square.",)),
        ("000000000005.jpg", "val", ("Karpathy val picture.",)),
    ]
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["images"]["2"].startswith("zz/images@")
    assert provenance["images"]["2"].endswith(":val2014/COCO_val2014_000000000002.jpg")
    assert summary["sha256"] in (out / "README.md").read_text()


def test_prepare_again_skips_images_already_written(mirrors: Path, tmp_path: Path) -> None:
    out = tmp_path / "coco"
    first = coco.prepare(mirrors, out)
    stamp = (out / "images/000000000001.jpg").stat().st_mtime_ns
    second = coco.prepare(mirrors, out)
    assert (out / "images/000000000001.jpg").stat().st_mtime_ns == stamp
    assert second["on_disk"] == first["on_disk"] and second["sha256"] == first["sha256"]
    assert json.loads((out / "provenance.json").read_text())["images"].keys() == {"1", "2", "3", "5"}


def test_a_missing_source_is_reported_not_fatal(tmp_path: Path, capsys) -> None:
    summary = coco.prepare(tmp_path / "none", tmp_path / "out")
    assert summary["captioned"] == {"train": 0, "val": 0, "test": 0}
    assert "not available: data-ming-and-application/CVLR-RD:data/coco_test.json" in capsys.readouterr().err


def test_a_caption_file_in_the_wrong_layout_names_the_file() -> None:
    with pytest.raises(coco.PrepareError, match=r"^r/x:a.json: not the coco layout \(KeyError"):
        coco.parse_captions("coco", b'{"images": []}', "r/x:a.json")


@pytest.mark.parametrize("path, image_id", [
    ("val2014/COCO_val2014_000000391895.jpg", 391895),
    ("a/b/train2017/000000000009.jpg", 9),
    ("COCO_train2014_000000000009.JPG", 9),
    ("Results/COCOstuff/0/000000000139.jpg", None),
    ("test2014/COCO_test2014_000000000001.jpg", None),
])
def test_image_paths_taken_as_coco(path: str, image_id: int | None) -> None:
    match = coco.IMAGE_PATH.search(path)
    assert (int(match["id"]) if match else None) == image_id


def test_mirror_lists_and_reads_blobs(tmp_path: Path) -> None:
    git_dir = bare_mirror(tmp_path / "m", "o/n", {"a/x.jpg": jpeg(), "b.txt": b"hi"})
    assert [path for path, _ in mirror.list_files(git_dir)] == ["a/x.jpg", "b.txt"]
    assert mirror.list_files(git_dir, under="a")[0][0] == "a/x.jpg"
    blobs = dict(mirror.read_blobs(git_dir, ["b.txt", "nope", "a/x.jpg"]))
    assert blobs["b.txt"] == b"hi" and blobs["nope"] is None and mirror.is_jpeg(blobs["a/x.jpg"])
    assert len(mirror.head_commit(git_dir)) == 40


def test_check_jpeg_rejects_a_truncated_file() -> None:
    with pytest.raises(BadImage, match="JPEG does not decode"):
        check_jpeg(jpeg((64, 64))[:200])


def test_images_deleted_later_come_from_history_and_the_largest_copy_wins(tmp_path: Path) -> None:
    root = tmp_path / "mirrors"
    albef = [{"image": name(i), "caption": [f"Picture {i}."]} for i in (1, 2, 3)]
    bare_mirror(root, "data-ming-and-application/CVLR-RD", {"data/coco_test.json": json.dumps(albef).encode()})
    small = bare_mirror(root, "aa/resized", {
        "data/resized2014/COCO_val2014_000000000001.jpg": jpeg((16, 16), "blue"),
        "data/resized2014/COCO_val2014_000000000002.jpg": jpeg((16, 16), "blue"),
        "data/resized2014/COCO_val2014_000000000003.jpg": jpeg((16, 16), "blue"),
    }, deleted_later=tuple(f"data/resized2014/COCO_val2014_00000000000{i}.jpg" for i in (1, 2)))
    bare_mirror(root, "zz/originals", {name(2): jpeg((400, 300), "green")})
    assert [path for path, _ in mirror.list_files(small)] == ["data/resized2014/COCO_val2014_000000000003.jpg"]
    assert len(mirror.history_files(small)) == 3

    out = tmp_path / "coco"
    summary = coco.prepare(root, out)

    assert summary["on_disk"] == {"train": 3, "val": 0, "test": 0} and summary["bad_blobs"] == []  # no split lists
    assert Image.open(out / "images/000000000002.jpg").size == (400, 300)  # the original, not the 16 px copy
    provenance = json.loads((out / "provenance.json").read_text())["images"]
    first_commit = mirror.head_commit(small, "HEAD~1")
    assert provenance["1"] == f"aa/resized@{first_commit}:data/resized2014/COCO_val2014_000000000001.jpg"
    assert provenance["3"] == f"aa/resized@{mirror.head_commit(small)}:data/resized2014/COCO_val2014_000000000003.jpg"
    assert provenance["2"].startswith("zz/originals@")


def test_bare_id_folders_count_only_for_the_repository_they_were_checked_in(tmp_path: Path) -> None:
    root = tmp_path / "mirrors"
    albef = [{"image": name(i), "caption": [f"Picture {i}."]} for i in (1, 2)]
    bare_mirror(root, "data-ming-and-application/CVLR-RD", {"data/coco_test.json": json.dumps(albef).encode()})
    bare_mirror(root, "xiaodanlu/Deep-Learning-Project-Image-captioning",
                {"coco_images/000000000001.jpg": jpeg((40, 30), "green")})
    bare_mirror(root, "someone/else", {"coco_images/000000000002.jpg": jpeg()})  # same layout, unchecked repo

    out = tmp_path / "coco"
    summary = coco.prepare(root, out)

    assert summary["on_disk"] == {"train": 1, "val": 0, "test": 0}
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000000001.jpg"]
    provenance = json.loads((out / "provenance.json").read_text())["images"]
    assert provenance["1"].startswith("xiaodanlu/Deep-Learning-Project-Image-captioning@")
    assert provenance["1"].endswith(":coco_images/000000000001.jpg")


CSV = "\ufeffimage_id,id,caption,image\n9,1,A meal in trays.,000000000009.jpg\n9,2,\"Food, bread.\",000000000009.jpg\n"


@pytest.mark.parametrize("kind, data", [
    ("csv", CSV.encode("utf-8")),  # a byte-order mark, as spreadsheet exports write it
    ("pairs", json.dumps([{"caption": "A meal in trays.", "image_id": 9}, {"caption": "Food, bread.", "image_id": 9}])
     .encode()),
])
def test_csv_and_pairs_layouts(kind: str, data: bytes) -> None:
    assert coco.parse_captions(kind, data, "r/x:f") == {9: ["A meal in trays.", "Food, bread."]}


@pytest.mark.parametrize("kind, data, message", [
    ("csv", b"id,caption\n1,A cat.\n", r"^r/x:f: not the csv layout \(KeyError: 'image_id'\)"),
    ("csv", b"image_id,caption\nnine,A cat.\n", r"^r/x:f: not the csv layout \(ValueError"),
    ("csv", b"image_id,caption\n9\n", r"^r/x:f: an entry without a COCO id or caption text"),
    ("csv", b"image_id,caption\n9,\xff\n", r"^r/x:f: invalid CSV \("),
    ("pairs", b'[{"caption": "A cat."', r"^r/x:f: invalid JSON \("),
    ("pairs", b'{"annotations": []}', r"^r/x:f: not the pairs layout \(TypeError"),
    ("pairs", b'[{"image_id": 9}]', r"^r/x:f: not the pairs layout \(KeyError: 'caption'\)"),
])
def test_a_malformed_csv_or_pairs_file_names_the_file(kind: str, data: bytes, message: str) -> None:
    with pytest.raises(coco.PrepareError, match=message):
        coco.parse_captions(kind, data, "r/x:f")


def test_a_file_only_in_an_older_commit_is_read_from_history(tmp_path: Path) -> None:
    git_dir = bare_mirror(tmp_path / "m", "o/n", {"keep.txt": b"now", "old.csv": b"then"}, deleted_later=("old.csv",))
    assert mirror.read_blob(git_dir, "old.csv") is None
    assert mirror.read_blob_in_history(git_dir, "old.csv") == (b"then", mirror.head_commit(git_dir, "HEAD~1"))
    assert mirror.read_blob_in_history(git_dir, "keep.txt") == (b"now", mirror.head_commit(git_dir))
    assert mirror.read_blob_in_history(git_dir, "nope") is None


def test_extra_captions_flag_adds_the_extra_sources(tmp_path: Path, capsys) -> None:
    root = tmp_path / "mirrors"
    natalie = bare_mirror(root, "natalie125/Deep-learning", {"coco_captions.csv": CSV.encode(), "README.md": b"x"},
                          deleted_later=("coco_captions.csv",))  # dropped later: read from the older commit
    pairs = [{"caption": "A plate of food.", "image_id": 9}, {"caption": "Two dogs.", "image_id": 7}]
    bare_mirror(root, "xiaodanlu/Deep-Learning-Project-Image-captioning", {
        "data/selected_data_10000.json": json.dumps(pairs).encode(),
        "coco_images/000000000009.jpg": jpeg(), "coco_images/000000000007.jpg": jpeg()})
    assert coco.caption_sources(False) == coco.CAPTION_SOURCES
    assert coco.caption_sources(True) == coco.CAPTION_SOURCES + coco.EXTRA_CAPTION_SOURCES

    assert coco.main(["--mirrors", str(root), "--out", str(tmp_path / "plain")]) == 0
    assert json.loads((tmp_path / "plain/dataset_coco.json").read_text())["images"] == []
    assert coco.main(["--extra-captions", "--mirrors", str(root), "--out", str(tmp_path / "extra")]) == 0

    data = karpathy(tmp_path / "extra/dataset_coco.json", tmp_path / "extra/images")
    assert [(r.image_id, r.split, r.captions) for r in data.records] == [
        ("000000000007.jpg", "train", ("Two dogs.",)),
        ("000000000009.jpg", "train", ("A meal in trays.", "Food, bread.", "A plate of food.")),
    ]
    sources = {s["repo"]: s for s in json.loads((tmp_path / "extra/provenance.json").read_text())["sources"]}
    assert sources["natalie125/Deep-learning"]["commit"] == mirror.head_commit(natalie, "HEAD~1")
    assert "not available: zrblution/LLM_HM_3_models:" in capsys.readouterr().err
