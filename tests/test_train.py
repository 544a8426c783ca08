"""Training on a tiny synthetic data set: it overfits, resumes, and runs under torchrun (DDP).

Images are coloured shapes on coloured backgrounds with captions like
"a red circle on a blue background"; features come from the real EfficientNet-Lite0
at 96 px (a 3x3 grid), extracted once per session into a shared cache.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from PIL import Image, ImageDraw  # noqa: E402

from training.datasets import load_dataset  # noqa: E402
from training.features import extract_features  # noqa: E402
from training.model import greedy_decode  # noqa: E402
from training.train import resolve_config, train  # noqa: E402
from training.vocab import Vocab  # noqa: E402

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (40, 170, 60), "yellow": (240, 220, 40)}
IMAGE_SIZE = 96
TINY = {"encoder_dim": 64, "attention_dim": 32, "hidden_dim": 96, "embed_dim": 48, "dropout": 0.0,
        "min_count": 1, "max_length": 10, "label_smoothing": 0.0, "attention_lambda": 0.1, "warmup_steps": 10,
        "backbone": "efficientnet-lite0", "image_size": IMAGE_SIZE, "threads": 1}


def _draw(shape: str, colour: str, background: str) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), COLOURS[background])
    box = (22, 22, 74, 74)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    else:
        draw.rectangle(box, fill=COLOURS[colour])
    return image


@pytest.fixture(scope="session")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Kaggle-layout data set: 8 train images, 2 val images, captions.csv, split lists, feature cache."""
    root = tmp_path_factory.mktemp("shapes")
    (root / "images").mkdir()
    rows, names = [], []
    combos = [(s, c, b) for s, c, b in itertools.product(["circle", "square"], ["red", "yellow"], ["blue", "green"])]
    for shape, colour, background in combos + [("circle", "green", "blue"), ("square", "blue", "green")]:
        name = f"{colour}-{shape}-on-{background}.png"
        _draw(shape, colour, background).save(root / "images" / name)
        rows.append((name, f"a {colour} {shape} on a {background} background"))
        names.append(name)
    with open(root / "captions.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    (root / "train.txt").write_text("\n".join(names[:8]) + "\n")
    (root / "val.txt").write_text("\n".join(names[8:]) + "\n")
    (root / "test.txt").write_text("")
    cache = root / "cache"
    extract_features(root / "images", names, cache, "efficientnet-lite0", IMAGE_SIZE)
    return {"root": root, "cache": cache}


def _dataset(shapes: dict[str, Path]):
    root = shapes["root"]
    return load_dataset("kaggle", captions=root / "captions.csv", images=root / "images",
                        train=root / "train.txt", val=root / "val.txt", test=root / "test.txt")


def _greedy_captions(checkpoint: Path, shapes: dict[str, Path]) -> dict[str, str]:
    from export.bundle_writer import load_checkpoint, model_from_checkpoint
    from training.backbone import spec_for
    from training.features import FeatureCache

    data = load_checkpoint(checkpoint)
    model, _ = model_from_checkpoint(data, checkpoint)
    vocab = Vocab(data["vocab"])
    records = _dataset(shapes).split("train")
    ids = [r.image_id for r in records]
    cache = FeatureCache(shapes["cache"], spec_for("efficientnet-lite0", IMAGE_SIZE), ids)
    tokens = greedy_decode(model, torch.from_numpy(cache.get(ids)))
    return {image_id: vocab.decode(row) for image_id, row in zip(ids, tokens.tolist())}


@pytest.fixture(scope="module")
def overfit_run(shapes: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder whose model has memorised the 8 training captions."""
    out = tmp_path_factory.mktemp("overfit")
    cfg = resolve_config(None, {**TINY, "out": str(out), "cache": str(shapes["cache"]),
                                "epochs": 150, "batch_size": 8, "lr": 3e-3, "patience": 100, "select_metric": "BLEU-4"})
    train(_dataset(shapes), cfg, log=lambda line: None)
    return out


def test_short_training_overfits_the_shapes(shapes: dict[str, Path], overfit_run: Path) -> None:
    captions = _greedy_captions(overfit_run / "last.pt", shapes)
    expected = {r.image_id: r.captions[0] for r in _dataset(shapes).split("train")}
    assert captions == expected
    assert (overfit_run / "best.pt").exists()


def test_evaluate_command_scores_the_memorised_captions(shapes: dict[str, Path], overfit_run: Path,
                                                         tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from caption_cli.cli import app

    root = shapes["root"]
    result = CliRunner().invoke(app, [
        "evaluate", "--data", "kaggle", "--images", str(root / "images"), "--annotations", str(root / "captions.csv"),
        "--splits", str(root), "--split", "train", "--checkpoint", str(overfit_run / "last.pt"),
        "--cache", str(shapes["cache"]), "--beam", "1", "--beam", "3", "--json",
        "--results", str(tmp_path / "results-{beam}.json")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    for beam in ("1", "3"):
        assert report[beam]["images"] == 8
        assert report[beam]["BLEU-4"] > 0.99 and report[beam]["ROUGE-L"] > 0.99
    written = json.loads((tmp_path / "results-3.json").read_text())
    assert {"image_id": "red-circle-on-blue.png", "caption": "a red circle on a blue background"} in written


def test_resume_continues_from_the_saved_step(shapes: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    base = {**TINY, "out": str(out), "cache": str(shapes["cache"]), "batch_size": 8, "patience": 100}
    train(_dataset(shapes), resolve_config(None, {**base, "epochs": 2}), log=lambda line: None)
    first = torch.load(out / "last.pt", weights_only=True)
    assert (first["epoch"], first["step"]) == (2, 2)  # 8 images of one caption -> 1 batch per epoch

    lines: list[str] = []
    train(_dataset(shapes), resolve_config(None, {**base, "epochs": 4}), resume=True, log=lines.append)
    second = torch.load(out / "last.pt", weights_only=True)
    assert lines[0] == f"resumed from {out / 'last.pt'}: epoch 2, step 2"
    assert (second["epoch"], second["step"]) == (4, 4)
    assert [entry["epoch"] for entry in second["history"]] == [1, 2, 3, 4]


def test_resumed_run_equals_an_uninterrupted_one(shapes: dict[str, Path], tmp_path: Path) -> None:
    """With dropout on, a run stopped after 2 of 4 epochs and resumed ends with the weights of one
    uninterrupted run (8 images, batches of 4: 2 steps per epoch)."""
    base = {**TINY, "cache": str(shapes["cache"]), "batch_size": 4, "patience": 100, "dropout": 0.5, "epochs": 4}
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(_dataset(shapes), resolve_config(None, {**base, "out": str(straight)}), log=lambda line: None)
    train(_dataset(shapes), resolve_config(None, {**base, "out": str(split), "limit_steps": 4}), log=lambda line: None)
    train(_dataset(shapes), resolve_config(None, {**base, "out": str(split)}), resume=True, log=lambda line: None)
    one = torch.load(straight / "last.pt", weights_only=True)["model"]
    two = torch.load(split / "last.pt", weights_only=True)["model"]
    assert one.keys() == two.keys()
    for name in one:
        assert torch.equal(one[name], two[name]), name


def _without_one_train_image(shapes: dict[str, Path]):
    """The data set as a run sees it when one training image has gone from --images."""
    dataset = _dataset(shapes)
    gone = dataset.split("train")[0].image_id
    return dataclasses.replace(dataset, records=[r for r in dataset.records if r.image_id != gone])


def test_resume_refuses_other_data(shapes: dict[str, Path], tmp_path: Path) -> None:
    """A resumed run whose images partly vanished would go on training on another data set."""
    out = tmp_path / "run"
    cfg = resolve_config(None, {**TINY, "out": str(out), "cache": str(shapes["cache"]), "batch_size": 8, "epochs": 2})
    train(_dataset(shapes), cfg, log=lambda line: None)
    with pytest.raises(ValueError, match=r"last.pt was trained on other data \(8 train / 2 val images then, 7 / 2 now"):
        train(_without_one_train_image(shapes), resolve_config(None, {**cfg.__dict__, "epochs": 3}), resume=True,
              log=lambda line: None)
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2  # untouched
    train(_dataset(shapes), resolve_config(None, {**cfg.__dict__, "epochs": 3}), resume=True, log=lambda line: None)
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 3


def test_unknown_option_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown training option\\(s\\): dropuot"):
        resolve_config(None, {"dropuot": 0.1})


def test_torchrun_ddp_with_two_cpu_processes(shapes: dict[str, Path], tmp_path: Path) -> None:
    root, out = shapes["root"], tmp_path / "ddp"
    options = {k: v for k, v in TINY.items() if k not in ("backbone", "image_size")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "caption_cli", "train", "--data", "kaggle", "--images", str(root / "images"),
               "--annotations", str(root / "captions.csv"), "--splits", str(root), "--out", str(out),
               "--cache", str(shapes["cache"]), "--epochs", "2", "--batch-size", "2",
               "--backbone", "efficientnet-lite0", "--image-size", str(IMAGE_SIZE),
               *itertools.chain.from_iterable(("--set", f"{k}={json.dumps(v)}") for k, v in options.items())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 process(es) on cpu" in done.stderr
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    # 8 images, 1 caption each, 2 captions per batch per rank: 2 steps per epoch on each of 2 ranks
    assert (checkpoint["epoch"], checkpoint["step"]) == (2, 4)


def test_average_checkpoints_means_the_weights(tmp_path: Path) -> None:
    from training.average import average_checkpoints
    from training.model import ModelConfig, ShowAttendTell

    cfg = ModelConfig(vocab_size=9, feature_dim=8, grid=(2, 2), encoder_dim=8, attention_dim=8, hidden_dim=8,
                      embed_dim=8)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = tmp_path / f"{seed}.pt"
        torch.save({"model": ShowAttendTell(cfg).state_dict(), "model_config": cfg.to_dict(), "vocab": ["x"] * 9,
                    "epoch": seed, "optimizer": {}}, path)
        paths.append(path)
    out = average_checkpoints(paths, tmp_path / "avg.pt")
    a, b, avg = (torch.load(p, weights_only=True) for p in (*paths, out))
    name = "step.gru.weight_hh"
    assert torch.allclose(avg["model"][name], (a["model"][name] + b["model"][name]) / 2)
    assert avg["epoch"] == 1 and "optimizer" not in avg
    other = dict(b, model_config={**cfg.to_dict(), "hidden_dim": 16})
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt is from another model"):
        average_checkpoints([paths[0], tmp_path / "other.pt"], tmp_path / "x.pt")
