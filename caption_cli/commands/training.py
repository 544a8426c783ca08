"""CLI commands: train, export, evaluate.

These need torch (the `train` extra). They import `training`/`export` lazily and
print an install hint instead of a traceback when torch is missing.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from caption_cli.commands.annotate import DeviceOption, ModelOption
from caption_cli.errors import CaptionCliError, MissingExtraError

TRAIN_HINT = "this command needs PyTorch: pip install 'caption-cli[train]'"
err = Console(stderr=True, soft_wrap=True)  # log lines stay whole in files and pipes


class DataKind(str, Enum):
    flickr8k = "flickr8k"
    flickr = "flickr"
    coco = "coco"
    karpathy = "karpathy"
    kaggle = "kaggle"


def _require_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise MissingExtraError(TRAIN_HINT) from None


def _fail(error: Exception) -> typer.Exit:
    err.print(f"[red]error:[/red] {error}", highlight=False, markup=True)
    return typer.Exit(1)


DataOption = Annotated[DataKind, typer.Option("--data", help="Data set format.")]
RootOption = Annotated[Optional[Path], typer.Option(
    "--root", help="Flickr8k folder (Flickr8k.token.txt, images/, splits/); default ../shared/data/flickr8k.")]
ImagesOption = Annotated[Optional[Path], typer.Option("--images", help="Image folder (all formats but flickr8k).")]
AnnotationsOption = Annotated[Optional[Path], typer.Option(
    "--annotations", help="Captions file: COCO JSON, Karpathy JSON, token file or captions.txt.")]
SplitsOption = Annotated[Optional[Path], typer.Option(
    "--splits", help="Folder with train.txt / val.txt / test.txt image lists (flickr, kaggle).")]
CacheOption = Annotated[Path, typer.Option("--cache", help="Backbone feature cache folder.")]


def load_data(data: DataKind, root: Path | None, images: Path | None, annotations: Path | None,
              splits: Path | None) -> Any:
    """Read the data set named by the CLI options (raises DatasetError / BadParameter)."""
    from training import datasets

    if data is DataKind.flickr8k:
        return datasets.flickr8k(root or Path("../shared/data/flickr8k"))
    if images is None or annotations is None:
        raise typer.BadParameter(f"--data {data.value} needs --images and --annotations")
    # each reader names its captions file after the format
    field = {DataKind.flickr: "tokens", DataKind.kaggle: "captions"}.get(data, "annotations")
    kwargs: dict[str, Any] = {"images": images, field: annotations}
    if splits is not None and data in (DataKind.flickr, DataKind.kaggle):
        kwargs.update({name: splits / f"{name}.txt" for name in ("train", "val", "test")
                       if (splits / f"{name}.txt").exists()})
    return datasets.load_dataset(data.value, **kwargs)


def train(
    data: DataOption = DataKind.flickr8k,
    root: RootOption = None,
    images: ImagesOption = None,
    annotations: AnnotationsOption = None,
    splits: SplitsOption = None,
    out: Annotated[Path, typer.Option("--out", help="Run folder: checkpoints, history.")] = Path("runs/default"),
    cache: CacheOption = Path("cache/features"),
    config: Annotated[Optional[Path], typer.Option("--config", exists=True, dir_okay=False,
                                                   help="JSON file of training options.")] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1)] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1)] = None,
    lr: Annotated[Optional[float], typer.Option(min=0.0)] = None,
    backbone: Annotated[Optional[str], typer.Option(help="efficientnet-lite0|1|2")] = None,
    image_size: Annotated[Optional[int], typer.Option(min=32)] = None,
    option: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Any training option as KEY=VALUE (JSON value), e.g. --set dropout=0.3.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.pt.")] = False,
    scst_from: Annotated[Optional[Path], typer.Option(
        "--scst-from", exists=True, dir_okay=False,
        help="Self-critical training (CIDEr-D reward) starting from this cross-entropy checkpoint; "
             "--epochs, --batch-size (sampled captions per step), --lr and --set then set SCST's options.")] = None,
) -> None:
    """Train a captioner on a data set (features are cached once, then reused).

    Example: caption-cli train --data coco --images train2014/ --annotations captions_train2014.json --epochs 10 --out runs/coco
    Under torchrun (DDP) it runs unchanged: torchrun --nproc-per-node 2 -m caption_cli train ...
    Then self-critical training (one process): caption-cli train --scst-from runs/coco/best.pt --epochs 5 --out runs/coco-scst
    """
    if scst_from is not None and (backbone is not None or image_size is not None):
        raise typer.BadParameter("with --scst-from the backbone and image size come from the checkpoint; "
                                 "drop --backbone/--image-size")
    overrides: dict[str, Any] = {"out": str(out), "cache": str(cache), "epochs": epochs, "batch_size": batch_size,
                                 "lr": lr}
    if scst_from is None:
        overrides.update(backbone=backbone, image_size=image_size)
    for item in option or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    try:
        _require_torch()
        log = lambda line: err.print(line, highlight=False)  # noqa: E731
        if scst_from is not None:
            from training.scst import resolve_scst_config, train_scst

            scst_cfg = resolve_scst_config(config, overrides)
            run = lambda dataset: train_scst(dataset, scst_cfg, scst_from, resume=resume, log=log,  # noqa: E731
                                             dataset_name=data.value)
        else:
            from training.train import resolve_config, train as run_training

            cfg = resolve_config(config, overrides)
            run = lambda dataset: run_training(dataset, cfg, resume=resume, log=log,  # noqa: E731
                                               dataset_name=data.value)
        dataset = load_data(data, root, images, annotations, splits)
        err.print(dataset.summary(), highlight=False)
        best = run(dataset)
    except (CaptionCliError, ValueError) as error:
        raise _fail(error) from None
    err.print(f"best checkpoint: {best}")


def export(
    checkpoint: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Training checkpoint (.pt).")],
    out: Annotated[Path, typer.Option("--out", help="Bundle folder to write.")],
    name: Annotated[Optional[str], typer.Option(help="Model name recorded in model.json.")] = None,
    scores: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False,
                                                   help="JSON of measured scores to record.")] = None,
    half_decoder: Annotated[bool, typer.Option(
        "--half-decoder", help="Store decoder weights as float16 (half the size; parity-checked).")] = False,
    beam: Annotated[Optional[int], typer.Option(min=1, help="Default beam size written to model.json.")] = None,
    length_penalty: Annotated[Optional[float], typer.Option(
        min=0.0, max=2.0, help="Default length penalty written to model.json.")] = None,
    int8_cpu_decoder: Annotated[bool, typer.Option(
        "--int8-cpu-decoder", help="Also write an int8 decoder step that CPUs run (~1.5-1.8x faster steps, "
                                   "captions change slightly; its own model id).")] = False,
    scorer: Annotated[Optional[Path], typer.Option(
        "--scorer", exists=True, dir_okay=False,
        help="Cross-entropy checkpoint (same backbone and vocabulary) whose log-probability of each caption "
             "the confidence map reads; for an SCST model, the checkpoint it was fine-tuned from.")] = None,
) -> None:
    """Export a checkpoint to a parity-checked, checksummed ONNX model bundle.

    Example: caption-cli export runs/flickr8k/best.pt --out models/flickr8k
    """
    try:
        _require_torch()
        from export.bundle_writer import export_checkpoint

        measured = json.loads(scores.read_text()) if scores else None
        search = {k: v for k, v in {"beam_size": beam, "length_penalty": length_penalty}.items() if v is not None}
        path = export_checkpoint(checkpoint, out, name=name, scores=measured, half_decoder=half_decoder,
                                 search=search or None, cpu_decoder=int8_cpu_decoder, scorer_checkpoint=scorer)
    except (CaptionCliError, ValueError) as error:
        raise _fail(error) from None
    err.print(f"bundle written to {path}")


def evaluate(
    data: DataOption = DataKind.flickr8k,
    root: RootOption = None,
    images: ImagesOption = None,
    annotations: AnnotationsOption = None,
    splits: SplitsOption = None,
    split: Annotated[str, typer.Option(help="train, val or test.")] = "test",
    beam: Annotated[list[int], typer.Option("--beam", help="Beam sizes to score (repeat or list).")] = [3],
    model: ModelOption = None,
    checkpoint: Annotated[Optional[Path], typer.Option(
        exists=True, dir_okay=False, help="Score a training checkpoint with PyTorch instead of a bundle.")] = None,
    cache: CacheOption = Path("cache/features"),
    device: DeviceOption = "auto",  # type: ignore[assignment]
    length_penalty: Annotated[Optional[float], typer.Option(min=0.0, max=2.0)] = None,
    results: Annotated[Optional[Path], typer.Option(
        help="Write COCO-style results JSON; '{beam}' in the name is replaced by the beam size.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print scores as JSON.")] = False,
) -> None:
    """Score captions against references: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap).

    Example: caption-cli evaluate --data flickr8k --split test --beam 1 --beam 3 --beam 5
    """
    try:
        from training.evaluate import caption_with_bundle, caption_with_checkpoint, evaluate as run_eval

        dataset = load_data(data, root, images, annotations, splits)
        if checkpoint is not None:
            _require_torch()
            fn = lambda records: caption_with_checkpoint(checkpoint, dataset, records, beam, cache, length_penalty)  # noqa: E731
        else:
            fn = lambda records: caption_with_bundle(model, dataset, records, beam, getattr(device, "value", device),  # noqa: E731
                                                      length_penalty)
        report = run_eval(dataset, split, fn, results)
    except ImportError as error:
        raise _fail(MissingExtraError(f"{error}; evaluation needs pycocoevalcap: pip install 'caption-cli[train]'"))
    except (CaptionCliError, ValueError) as error:
        raise _fail(error) from None
    if as_json:
        typer.echo(json.dumps({str(k): v for k, v in report.items()}, indent=1))
        return
    metrics = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
    table = Table(title=f"{split} split, {next(iter(report.values()))['images']} images")
    table.add_column("beam")
    for metric in metrics:
        table.add_column(metric, justify="right")
    for size, scores in report.items():
        table.add_row(str(size), *(f"{100 * scores[m]:.1f}" if m in scores else "n/a" for m in metrics))
    Console().print(table)
    for note in next(iter(report.values())).get("notes", []):
        err.print(f"note: {note}")


def register(app: typer.Typer) -> None:
    """Add the training commands to the app."""
    app.command()(train)
    app.command()(export)
    app.command()(evaluate)
