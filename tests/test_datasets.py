"""Data set readers on tiny fixtures written to tmp_path; one optional check on the real Flickr8k."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from caption_cli.errors import DatasetError
from training.datasets import DataSet, Record, coco, flickr, flickr8k, kaggle, karpathy, load_dataset

FLICKR8K = Path(__file__).parents[1].parent / "shared/data/flickr8k"


def make_images(folder: Path, *names: str) -> Path:
    """Empty stand-in image files: the readers only check that a file exists."""
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"\xff\xd8\xff")
    return folder


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def split_lists(tmp_path: Path, **lists: list[str]) -> dict[str, Path]:
    return {name: write(tmp_path / f"{name}.txt", "".join(f"{n}\n" for n in names)) for name, names in lists.items()}


# ---------------------------------------------------------------- Flickr token files


TOKENS = (
    "a.jpg#0\tA dog runs .\n"
    "a.jpg#1\tA brown dog , running .\n"
    "b.jpg#0\tTwo cats .\n"
    "c.jpg#0\tA bird .\n"
    "gone.jpg#0\tNot on disk .\n"
    "d.jpg#0\tIn no list .\n"
)


def test_flickr_reads_splits_skips_missing_and_unlisted(tmp_path: Path) -> None:
    images = make_images(tmp_path / "images", "a.jpg", "b.jpg", "c.jpg", "d.jpg")
    tokens = write(tmp_path / "Flickr8k.token.txt", TOKENS)
    lists = split_lists(tmp_path, train=["a.jpg", "gone.jpg"], val=["b.jpg"], test=["c.jpg", "nocaption.jpg"])
    data = flickr(tokens, images, **lists)
    assert data.records == [
        Record("a.jpg", ("A dog runs .", "A brown dog , running ."), "train"),
        Record("b.jpg", ("Two cats .",), "val"),
        Record("c.jpg", ("A bird .",), "test"),
    ]
    assert data.missing == ["gone.jpg"]
    assert data.notes == [
        f"1 listed image not on disk in {images}: skipped (gone.jpg)",
        "1 image in no split list: dropped",
        "1 image in the split lists without captions: ignored",
    ]
    assert [r.image_id for r in data.split("val")] == ["b.jpg"]
    assert data.path(data.records[0]) == images / "a.jpg"
    assert data.summary().splitlines()[0] == f"3 images (train 1, val 1, test 1), 4 captions, images in {images}"


def test_flickr_accepts_spaces_for_the_tab(tmp_path: Path) -> None:
    # One widely copied Flickr8k token file has a few tabs turned into spaces.
    images = make_images(tmp_path / "images", "a.jpg")
    tokens = write(tmp_path / "t.txt", "a.jpg#0  A dog .\n\na.jpg#1\tA cat .\n")
    data = flickr(tokens, images, **split_lists(tmp_path, train=["a.jpg"], val=[], test=[]))
    assert data.records == [Record("a.jpg", ("A dog .", "A cat ."), "train")]


@pytest.mark.parametrize(
    "line, cause",
    [
        ("a.jpg\tno index", "expected 'image#index<TAB>caption', got 'a.jpg\\tno index'"),
        ("a.jpg#x\tbad index", "expected 'image#index<TAB>caption', got 'a.jpg#x\\tbad index'"),
        ("a.jpg#2\t   ", "empty caption"),
        ("a.jpg#2", "expected 'image#index<TAB>caption', got 'a.jpg#2'"),
    ],
)
def test_flickr_malformed_line_names_file_and_line(tmp_path: Path, line: str, cause: str) -> None:
    images = make_images(tmp_path / "images", "a.jpg")
    tokens = write(tmp_path / "tokens.txt", f"a.jpg#0\tA dog .\na.jpg#1\tA cat .\n{line}\n")
    with pytest.raises(DatasetError) as error:
        flickr(tokens, images)
    assert str(error.value) == f"{tokens}:3: {cause}"


def test_flickr_holds_out_the_lists_not_given(tmp_path: Path) -> None:
    names = [f"{i}.jpg" for i in range(40)]
    images = make_images(tmp_path / "images", *names)
    tokens = write(tmp_path / "tokens.txt", "".join(f"{n}#0\tA dog .\n" for n in names))
    only_train = flickr(tokens, images, **split_lists(tmp_path, train=names[:30]))
    assert only_train.notes == [
        "10 images in no split list: dropped",
        "no validation split given: held out 5% of train (2 images) as val, seed 0",
        "no test split given: held out 5% of train (2 images) as test, seed 0",
    ]
    assert [len(only_train.split(s)) for s in ("train", "val", "test")] == [26, 2, 2]
    empty_test = flickr(tokens, images, **split_lists(tmp_path, train=names[:30], val=names[30:], test=[]))
    assert [len(empty_test.split(s)) for s in ("train", "val", "test")] == [30, 10, 0]
    assert empty_test.notes == []


def test_image_in_two_split_lists_is_an_error(tmp_path: Path) -> None:
    images = make_images(tmp_path / "images", "a.jpg")
    tokens = write(tmp_path / "tokens.txt", "a.jpg#0\tA dog .\n")
    lists = split_lists(tmp_path, train=["x.jpg", "a.jpg"], val=["a.jpg"])
    with pytest.raises(DatasetError) as error:
        flickr(tokens, images, **lists)
    assert str(error.value) == f"{lists['val']}:1: a.jpg is already in the train list"


def test_missing_files_and_folders_are_one_line_errors(tmp_path: Path) -> None:
    tokens = write(tmp_path / "tokens.txt", "a.jpg#0\tA dog .\n")
    with pytest.raises(DatasetError, match=r"^.*nope\.txt: file not found$"):
        flickr(tmp_path / "nope.txt", tmp_path)
    with pytest.raises(DatasetError) as error:
        flickr(tokens, tmp_path / "no-images")
    assert str(error.value) == f"{tmp_path / 'no-images'}: image folder not found"


# ---------------------------------------------------------------- Kaggle captions.txt / captions.csv


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_kaggle_csv_quoting(tmp_path: Path, newline: str) -> None:
    images = make_images(tmp_path / "images", "a.jpg", "b.jpg")
    text = (
        "\ufeffimage,caption\n"  # a byte order mark, as some spreadsheet exports write
        'a.jpg,"A dog, brown, runs ."\n'
        'a.jpg,"A sign that says ""stop"" ."\n'
        'b.jpg,"Two lines\nin one caption ."\n'
        "b.jpg,Line\u2028separator inside .\n"
    )
    captions = tmp_path / "captions.txt"
    captions.write_bytes(text.replace("\n", newline).encode("utf-8"))
    lists = split_lists(tmp_path, train=["a.jpg"], val=["b.jpg"], test=[])
    data = kaggle(captions, images, **lists)
    assert data.records == [
        Record("a.jpg", ("A dog, brown, runs .", 'A sign that says "stop" .'), "train"),
        Record("b.jpg", ("Two lines\nin one caption .", "Line\u2028separator inside ."), "val"),
    ]
    assert data.notes == []


@pytest.mark.parametrize(
    "body, line, cause",
    [
        ("a.jpg\n", 3, "expected 'image,caption', got 1 field"),
        ("a.jpg,A dog,extra\n", 3, "expected 'image,caption', got 3 fields"),
        ("a.jpg,\n", 3, "empty caption"),
        ('a.jpg,"  "\n', 3, "empty caption"),
        (" ,A dog .\n", 3, "empty image name"),
        # the quoted caption on line 3 spans two lines, so the bad row starts on line 5
        ('a.jpg,"two\nlines"\nb.jpg\n', 5, "expected 'image,caption', got 1 field"),
        ('a.jpg,"unclosed\n', 3, "bad CSV (unexpected end of data)"),
        ('a.jpg,"x"y\n', 3, "bad CSV (',' expected after '\"')"),
    ],
)
def test_kaggle_malformed_row_names_file_and_line(tmp_path: Path, body: str, line: int, cause: str) -> None:
    captions = write(tmp_path / "captions.txt", "image,caption\nb.jpg,A cat .\n" + body)
    with pytest.raises(DatasetError) as error:
        kaggle(captions, make_images(tmp_path / "images", "a.jpg", "b.jpg"))
    assert str(error.value) == f"{captions}:{line}: {cause}"


def test_kaggle_wrong_header(tmp_path: Path) -> None:
    captions = write(tmp_path / "captions.csv", "\nfile,text\na.jpg,A dog .\n")
    with pytest.raises(DatasetError) as error:
        kaggle(captions, tmp_path)
    assert str(error.value) == f"{captions}:2: expected the header 'image,caption', got 'file,text'"


def test_kaggle_without_lists_holds_out_val_and_test_deterministically(tmp_path: Path) -> None:
    names = [f"{i:03d}.jpg" for i in range(100)]
    images = make_images(tmp_path / "images", *names)
    rows = "".join(f"{n},Caption {n} .\n" for n in names)
    forward = kaggle(write(tmp_path / "f.csv", "image,caption\n" + rows), images)
    reverse = kaggle(write(tmp_path / "r.csv", "image,caption\n" + "".join(reversed(rows.splitlines(True)))), images)
    assert forward.notes == [
        "no validation split given: held out 5% of train (5 images) as val, seed 0",
        "no test split given: held out 5% of train (5 images) as test, seed 0",
    ]
    assert [len(forward.split(s)) for s in ("train", "val", "test")] == [90, 5, 5]
    # the held-out images do not depend on the order of the rows
    for split in ("val", "test"):
        assert sorted(r.image_id for r in forward.split(split)) == sorted(r.image_id for r in reverse.split(split))
    assert set(r.image_id for r in forward.split("val")).isdisjoint(r.image_id for r in forward.split("test"))


# ---------------------------------------------------------------- MS-COCO captions JSON


def coco_json(path: Path, images: dict[int, str], captions: list[tuple[int, str]]) -> Path:
    data = {
        "info": {},
        "images": [{"id": i, "file_name": name, "width": 640, "height": 480} for i, name in images.items()],
        "annotations": [{"id": n, "image_id": i, "caption": c} for n, (i, c) in enumerate(captions)],
    }
    return write(path, json.dumps(data, indent=1))


def test_coco_holds_out_val_and_says_so(tmp_path: Path) -> None:
    names = {i: f"COCO_train2014_{i:012d}.jpg" for i in range(1, 41)}
    images = make_images(tmp_path / "train2014", *list(names.values())[:-1])  # the last one is not on disk
    captions = [(i, f"Picture number {i} .") for i in names] + [(1, "  Second caption.  ")]
    data = coco(coco_json(tmp_path / "captions_train2014.json", names, captions), images)
    assert data.image_root == images
    assert data.records[0] == Record(names[1], ("Picture number 1 .", "Second caption."), data.records[0].split)
    assert data.missing == [names[40]]
    assert data.notes == [
        f"1 listed image not on disk in {images}: skipped ({names[40]})",
        "no validation split given: held out 5% of train (2 images) as val, seed 0",
    ]
    assert [len(data.split(s)) for s in ("train", "val", "test")] == [37, 2, 0]
    again = coco(tmp_path / "captions_train2014.json", images)
    assert again.records == data.records
    assert coco(tmp_path / "captions_train2014.json", images, seed=1).notes[-1].endswith("seed 1")


def test_coco_with_val_file_in_its_own_folder(tmp_path: Path) -> None:
    train_images = make_images(tmp_path / "coco" / "train2014", "t1.jpg", "t2.jpg")
    val_images = make_images(tmp_path / "coco" / "val2014", "v1.jpg")
    train = coco_json(tmp_path / "train.json", {1: "t1.jpg", 2: "t2.jpg", 3: "t3.jpg"}, [(1, "One ."), (2, "Two .")])
    val = coco_json(tmp_path / "val.json", {7: "v1.jpg"}, [(7, "Val .")])
    data = coco(train, train_images, val_annotations=val, val_images=val_images)
    assert data.image_root == (tmp_path / "coco").resolve()
    assert data.records == [
        Record("train2014/t1.jpg", ("One .",), "train"),
        Record("train2014/t2.jpg", ("Two .",), "train"),
        Record("val2014/v1.jpg", ("Val .",), "val"),
    ]
    assert data.notes == ["1 listed image with no captions: skipped"]


@pytest.mark.parametrize(
    "data, cause",
    [
        ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 9, "caption": "x"}]},
         "annotations[0]: image_id 9 is not in images"),
        ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]},
         "annotations[0]: missing 'caption'"),
        ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "caption": " "}]},
         "annotations[0]: empty caption"),
        ({"images": [{"id": "1", "file_name": "a.jpg"}], "annotations": []},
         "images[0]: 'id' has the wrong type (str)"),
        ({"images": [{"id": 1, "file_name": "a.jpg"}, 5], "annotations": []},
         "images[1]: expected a JSON object, got int"),
        ({"annotations": []}, "missing 'images'"),
    ],
)
def test_coco_malformed_entry_names_file_and_position(tmp_path: Path, data: dict, cause: str) -> None:
    path = write(tmp_path / "captions.json", json.dumps(data))
    with pytest.raises(DatasetError) as error:
        coco(path, make_images(tmp_path / "images", "a.jpg"))
    assert str(error.value) == f"{path}: {cause}"


def test_invalid_json_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "captions.json", '{\n  "images": [\n  ,\n]}')
    with pytest.raises(DatasetError) as error:
        coco(path, tmp_path)
    assert str(error.value) == f"{path}:3: invalid JSON: Expecting value"


# ---------------------------------------------------------------- Karpathy split JSON


def karpathy_image(filename: str, split: str, *raws: str, filepath: str | None = None) -> dict:
    image = {"filename": filename, "split": split, "sentences": [{"raw": r, "tokens": r.lower().split()} for r in raws]}
    if filepath is not None:
        image["filepath"] = filepath
    return image


def test_karpathy_coco_layout_restval_and_filepath(tmp_path: Path) -> None:
    root = make_images(tmp_path / "coco", "train2014/a.jpg", "val2014/b.jpg", "val2014/c.jpg", "val2014/d.jpg")
    images = [
        karpathy_image("a.jpg", "train", "A dog .", filepath="train2014"),
        karpathy_image("b.jpg", "restval", "A cat .", "A kitten .", filepath="val2014"),
        karpathy_image("c.jpg", "val", "A bird .", filepath="val2014"),
        karpathy_image("d.jpg", "test", "A fish .", filepath="val2014"),
        karpathy_image("e.jpg", "test", "Gone .", filepath="val2014"),
    ]
    data = karpathy(write(tmp_path / "dataset_coco.json", json.dumps({"images": images, "dataset": "coco"})), root)
    assert data.records == [
        Record("train2014/a.jpg", ("A dog .",), "train"),
        Record("val2014/b.jpg", ("A cat .", "A kitten ."), "train"),
        Record("val2014/c.jpg", ("A bird .",), "val"),
        Record("val2014/d.jpg", ("A fish .",), "test"),
    ]
    assert data.missing == ["val2014/e.jpg"]
    assert data.notes == [
        "1 restval image counted as train",
        f"1 listed image not on disk in {root}: skipped (val2014/e.jpg)",
    ]


@pytest.mark.parametrize(
    "image, cause",
    [
        (karpathy_image("a.jpg", "dev", "A dog ."),
         "images[1]: unknown split 'dev' (expected train, val, test or restval)"),
        (karpathy_image("a.jpg", "train", ""), "images[1].sentences[0]: empty caption"),
        ({"filename": "a.jpg", "split": "train"}, "images[1]: missing 'sentences'"),
        (karpathy_image("x.jpg", "train", "Again ."), "images[1]: x.jpg is listed twice"),
    ],
)
def test_karpathy_malformed_image(tmp_path: Path, image: dict, cause: str) -> None:
    images = [karpathy_image("x.jpg", "train", "First ."), image]
    path = write(tmp_path / "dataset_flickr8k.json", json.dumps({"images": images}))
    with pytest.raises(DatasetError) as error:
        karpathy(path, make_images(tmp_path / "images", "a.jpg", "x.jpg"))
    assert str(error.value) == f"{path}: {cause}"


# ---------------------------------------------------------------- dispatch


CAPTIONS = {"a.jpg": "A dog .", "b.jpg": "A cat .", "c.jpg": "A bird ."}
SPLIT_OF = {"a.jpg": "train", "b.jpg": "val", "c.jpg": "test"}


def lists_for(tmp_path: Path) -> dict[str, Path]:
    return split_lists(tmp_path, **{s: [n for n in SPLIT_OF if SPLIT_OF[n] == s] for s in ("train", "val", "test")})


# kind -> the reader's arguments (besides images) for CAPTIONS, written to a folder
WRITE_FOR_KIND = {
    "coco": lambda tmp: {
        "annotations": coco_json(tmp / "c.json", dict(enumerate(CAPTIONS)), list(enumerate(CAPTIONS.values())))},
    "karpathy": lambda tmp: {"annotations": write(tmp / "k.json", json.dumps(
        {"images": [karpathy_image(n, SPLIT_OF[n], c) for n, c in CAPTIONS.items()]}))},
    "flickr": lambda tmp: {"tokens": write(tmp / "t.txt", "".join(f"{n}#0\t{c}\n" for n, c in CAPTIONS.items())),
                           **lists_for(tmp)},
    "kaggle": lambda tmp: {
        "captions": write(tmp / "c.csv", "image,caption\n" + "".join(f"{n},{c}\n" for n, c in CAPTIONS.items())),
        **lists_for(tmp)},
}


@pytest.mark.parametrize("kind", sorted(WRITE_FOR_KIND))
def test_load_dataset_dispatches_to_each_reader(tmp_path: Path, kind: str) -> None:
    images = make_images(tmp_path / "images", *CAPTIONS)
    data = load_dataset(kind, images=images, **WRITE_FOR_KIND[kind](tmp_path))
    assert isinstance(data, DataSet)
    assert sorted((r.image_id, r.captions) for r in data.records) == [(n, (c,)) for n, c in CAPTIONS.items()]
    if kind != "coco":  # a COCO file has no split labels (train, val held out); the others keep theirs
        assert {r.image_id: r.split for r in data.records} == SPLIT_OF


@pytest.mark.parametrize(
    "kind, paths, message",
    [
        ("voc", {}, "unknown data set kind 'voc': choose one of coco, flickr, kaggle, karpathy"),
        ("kaggle", {"images": "x"}, "kaggle data set: missing captions"),
        ("flickr", {"tokens": "t", "images": "x", "dev": "d"},
         "flickr data set: unknown option(s) dev (takes tokens, images, train, val, test, seed)"),
    ],
)
def test_load_dataset_rejects_bad_arguments(kind: str, paths: dict, message: str) -> None:
    with pytest.raises(DatasetError) as error:
        load_dataset(kind, **paths)
    assert str(error.value) == message


def test_split_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown split 'dev': choose one of train, val, test"):
        DataSet(Path("."), []).split("dev")


# ---------------------------------------------------------------- the real Flickr8k (skips when absent)


@pytest.mark.skipif(not (FLICKR8K / "Flickr8k.token.txt").is_file(), reason="shared Flickr8k data not present")
def test_real_flickr8k() -> None:
    data = flickr8k(FLICKR8K)
    assert [len(data.split(s)) for s in ("train", "val", "test")] == [6000, 1000, 1000]
    assert all(len(r.captions) == 5 for r in data.records)
    assert data.missing == ["2258277193_586949ec62.jpg.1"]
    assert "91 images in no split list: dropped" in data.notes
