"""CLI command: calibrate (fit or check the confidence map of a bundle on held-out data)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from caption_cli.commands.annotate import DeviceOption, ModelOption
from caption_cli.commands.training import (AnnotationsOption, DataKind, DataOption, ImagesOption, RootOption,
                                           SplitsOption, _fail, err, load_data)
from caption_cli.errors import CaptionCliError, MissingExtraError


def register(app: typer.Typer) -> None:
    """Add this area's commands to the app."""
    app.command()(calibrate)


def calibrate(
    data: DataOption = DataKind.flickr8k,
    root: RootOption = None,
    images: ImagesOption = None,
    annotations: AnnotationsOption = None,
    splits: SplitsOption = None,
    split: Annotated[str, typer.Option(help="val to fit; any split with --check.")] = "val",
    model: ModelOption = None,
    beam: Annotated[Optional[int], typer.Option("--beam", min=1, help="Beam width (default: the bundle's).")] = None,
    threshold: Annotated[float, typer.Option(
        "--cider-threshold", min=0.0, help="Per-image CIDEr at which a caption counts as acceptable.")] = 0.5,
    check: Annotated[bool, typer.Option(
        "--check", help="Measure the bundle's stored map on --split instead of fitting (test allowed).")] = False,
    diagram: Annotated[Optional[Path], typer.Option(
        "--diagram", dir_okay=False, help="Write a reliability diagram PNG.")] = None,
    device: DeviceOption = "auto",  # type: ignore[assignment]
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Fit the caption confidence map on validation captions and store it in the bundle's model.json.

    A caption is "acceptable" when its CIDEr against the image's references reaches the
    threshold; the map turns the search's log-probability into the probability of that.

    Example: caption-cli calibrate --data flickr8k --split val --model my-model/ --diagram val.png
    """
    if not check and split == "test":
        raise typer.BadParameter("never fit on the test split: fit on val, then --check --split test",
                                 param_hint="--split")
    try:
        from training.calibration import run_calibration

        dataset = load_data(data, root, images, annotations, splits)
        report = run_calibration(model, dataset, split, beam=beam, threshold=threshold, fit_map=not check,
                                 diagram_path=diagram, device=getattr(device, "value", device),
                                 data_name=data.value)
    except ImportError as error:
        raise _fail(MissingExtraError(f"{error}; calibration needs the train extra: pip install 'caption-cli[train]'"))
    except (CaptionCliError, ValueError, OSError) as error:
        raise _fail(error) from None
    if as_json:
        typer.echo(json.dumps(report, indent=1))
        return
    q = report["quality"]
    verb = "checked" if check else "fitted and stored"
    err.print(f"confidence map {verb} on {split} ({q['images']} images, beam {report['beam_size']}): "
              f"{100 * q['acceptable_share']:.0f}% acceptable (CIDEr >= {threshold}), "
              f"ECE {q['ece']:.3f}, Brier {q['brier']:.3f}", highlight=False)
    if "cross_validated" in report:
        cv = report["cross_validated"]
        at = {k["min_confidence"]: k for k in cv["kept"]}
        err.print(f"  {cv['folds']}-fold cross-validated: AUC {cv['auc']}, Brier {cv['brier']:.3f}, "
                  f"0.5 keeps {100 * at[0.5]['kept']:.0f}% ({_share(at[0.5])} acceptable)", highlight=False)
    for kept in report["kept"]:
        err.print(f"  --min-confidence {kept['min_confidence']:.1f}: keeps {100 * kept['kept']:.0f}% of captions, "
                  f"{_share(kept)} of them acceptable", highlight=False)
    if diagram is not None:
        err.print(f"reliability diagram: {diagram}", highlight=False)


def _share(kept: dict) -> str:
    """The share of kept captions that are acceptable, as a percentage (n/a when none is kept)."""
    among = kept["acceptable_among_kept"]
    return "n/a" if among is None else f"{100 * among:.0f}%"
