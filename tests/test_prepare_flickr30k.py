"""training.prepare.flickr30k on a tiny fake mirror pair: Multi30k Task 2 captions + an image repo."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from training.datasets import karpathy
from training.prepare import flickr30k

LFS = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 123\n"

# split stem -> [(image name, five raw captions)]
SPLITS = {
    "train": [("11.jpg", ["A dog runs.", "A dog, brown, runs.", "Dog.", "A dog on grass.", "It runs."]),
              ("12.jpg", ["Two men talk.", "Men.", "Two men, talking.", "A talk.", "People talk."])],
    "val": [("21.jpg", ["A red car.", "Car.", "A car, red.", "The car.", "A vehicle."])],
    "test_2016": [("31.jpg", ["A child plays.", "Kid.", "A child, playing.", "Play.", "A girl plays."])],
}


def jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), colour).save(buffer, "JPEG")
    return buffer.getvalue()


def make_mirror(mirrors: Path, name: str, files: dict[str, bytes]) -> Path:
    """A bare git repository `<mirrors>/<name>/repo` whose one commit holds `files`."""
    work = mirrors / f"{name}.work"
    for path, data in files.items():
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        (work / path).write_bytes(data)
    repo = mirrors / name / "repo"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", f"--git-dir={repo}", f"--work-tree={work}"]
    subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "data"], check=True)
    return repo


def multi30k_files() -> dict[str, bytes]:
    files = {}
    for stem, images in SPLITS.items():
        files[f"data/task2/image_splits/{stem}_images.txt"] = "".join(f"{n}\n" for n, _ in images).encode()
        for k in range(5):
            raw = "".join(f"{caps[k]}\n" for _, caps in images)
            files[f"data/task2/raw/{stem}.{k + 1}.en.gz"] = gzip.compress(raw.encode())
            tok = "".join(f"{caps[k].lower().replace('.', ' .').replace(',', ' ,')}\n" for _, caps in images)
            files[f"data/task2/tok/{stem}.lc.norm.tok.{k + 1}.en"] = tok.encode()
    return files


@pytest.fixture
def mirrors(tmp_path: Path) -> Path:
    root = tmp_path / "mirrors"
    make_mirror(root, "multi30k+dataset", multi30k_files())
    make_mirror(root, "someone+flickr30k", {
        "flickr30k_images/11.jpg": jpeg((200, 0, 0)),
        "flickr30k_images/12.jpg": LFS,  # a pointer: reported, not copied
        "flickr30k_images/31.jpg": jpeg((0, 0, 200)),
        "flickr30k_images/99.jpg": jpeg((9, 9, 9)),  # in no split: not copied
    })
    make_mirror(root, "other+f30k", {"imgs/12.jpg": jpeg((0, 200, 0))})  # second source fills the pointer's gap
    return root


def run(mirrors: Path, out: Path, capsys) -> tuple[int, list[str]]:
    code = flickr30k.main(["--mirrors", str(mirrors), "--out", str(out),
                           "--image-source", "someone+flickr30k:flickr30k_images", "--image-source", "other+f30k:imgs"])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_writes_karpathy_json_images_and_readme(mirrors: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "flickr30k"
    code, lines = run(mirrors, out, capsys)
    assert code == 1  # one bad blob
    assert lines == [
        f"{out / 'dataset_flickr30k.json'}: written",
        "someone+flickr30k:flickr30k_images/12.jpg: a Git LFS pointer (128 bytes), skipped",
        "images: 3 written, 0 already there, 1 bad blobs, 1 in no mirror",
    ]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["11.jpg", "12.jpg", "31.jpg"]
    assert (out / "images" / "12.jpg").read_bytes() == jpeg((0, 200, 0))
    data = json.loads((out / "dataset_flickr30k.json").read_text())
    assert [(e["filename"], e["split"], e["imgid"]) for e in data["images"]] == [
        ("11.jpg", "train", 0), ("12.jpg", "train", 1), ("21.jpg", "val", 2), ("31.jpg", "test", 3)]
    first = data["images"][0]
    assert first["sentids"] == [0, 1, 2, 3, 4]
    assert first["sentences"][1] == {"raw": "A dog, brown, runs.", "tokens": ["a", "dog", ",", "brown", ",", "runs", "."],
                                     "imgid": 0, "sentid": 1}
    assert data["images"][3]["sentids"] == [15, 16, 17, 18, 19]

    dataset = karpathy(out / "dataset_flickr30k.json", out / "images")
    assert [(r.image_id, r.split) for r in dataset.records] == [("11.jpg", "train"), ("12.jpg", "train"), ("31.jpg", "test")]
    assert dataset.records[2].captions == tuple(SPLITS["test_2016"][0][1])
    assert dataset.missing == ["21.jpg"]

    readme = (out / "README.md").read_text()
    assert "| train | 2 | 10 | 2 |" in readme and "| val | 1 | 5 | 0 |" in readme and "| test | 1 | 5 | 1 |" in readme
    assert flickr30k.sha256_of(out / "dataset_flickr30k.json") in readme


def test_second_run_skips_what_is_written(mirrors: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "flickr30k"
    run(mirrors, out, capsys)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    code, lines = run(mirrors, out, capsys)
    assert code == 0
    assert lines == [f"{out / 'dataset_flickr30k.json'}: unchanged",
                     "images: 0 written, 3 already there, 0 bad blobs, 1 in no mirror"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == before


def test_missing_caption_mirror_is_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "mirrors").mkdir()
    code = flickr30k.main(["--mirrors", str(tmp_path / "mirrors"), "--out", str(tmp_path / "out")])
    assert code == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path / 'mirrors'}/multi30k+dataset/repo not found: fetch github:multi30k/dataset first")


def test_line_count_mismatch_names_the_file(tmp_path: Path, capsys) -> None:
    files = multi30k_files()
    files["data/task2/raw/val.3.en.gz"] = gzip.compress(b"one\ntwo\n")
    make_mirror(tmp_path / "mirrors", "multi30k+dataset", files)
    code = flickr30k.main(["--mirrors", str(tmp_path / "mirrors"), "--out", str(tmp_path / "out")])
    assert code == 1
    err = capsys.readouterr().err
    assert "data/task2/raw/val.3.en.gz has 2 lines, data/task2/image_splits/val_images.txt has 1" in err


def test_images_deleted_from_the_mirror_later_still_come_from_its_history(tmp_path: Path, capsys) -> None:
    root = tmp_path / "mirrors"
    make_mirror(root, "multi30k+dataset", multi30k_files())
    repo = make_mirror(root, "gone+f30k", {"flickr30k_images/21.jpg": jpeg((5, 5, 5)), "README.md": b"x"})
    work = root / "gone+f30k.work"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", f"--git-dir={repo}", f"--work-tree={work}"]
    subprocess.run([*git, "rm", "-q", "flickr30k_images/21.jpg"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "remove the images"], check=True)

    code = flickr30k.main(["--mirrors", str(root), "--out", str(tmp_path / "out"),
                           "--image-source", "gone+f30k:flickr30k_images"])
    assert code == 0
    assert (tmp_path / "out/images/21.jpg").read_bytes() == jpeg((5, 5, 5))
    assert "images: 1 written, 0 already there, 0 bad blobs, 3 in no mirror" in capsys.readouterr().err
