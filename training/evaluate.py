"""Score a checkpoint (PyTorch) or a model bundle (onnxruntime) on a data set split.

Both paths use the runtime's batched beam search (caption_cli.beam), so the numbers
describe exactly what users get, and the two engines can be compared directly.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from caption_cli.beam import SearchOptions, beam_search, never_emitted
from caption_cli.results import Caption
from training.datasets import DataSet, Record
from training.metrics import score_captions

Captions = dict[str, str]


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True))  # stdout is kept for --json


def _chunks(items: Sequence[Record], size: int) -> Iterable[Sequence[Record]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def caption_with_checkpoint(checkpoint: Path, dataset: DataSet, records: Sequence[Record], beams: Sequence[int],
                            cache_root: Path, length_penalty: float | None = None,
                            batch_size: int = 100) -> dict[int, Captions]:
    """Captions per beam size from a training checkpoint over cached backbone grids."""
    import torch

    from export.bundle_writer import load_checkpoint, model_from_checkpoint
    from training.backbone import spec_for
    from training.features import extract_features

    data = load_checkpoint(Path(checkpoint))
    model, _ = model_from_checkpoint(data, checkpoint)
    vocab = data["vocab"]
    spec = spec_for(data["backbone"]["name"], data["backbone"]["image_size"])
    ids = [r.image_id for r in records]
    cache = extract_features(dataset.image_root, ids, cache_root, spec.name, spec.image_size)
    special = model.cfg.special
    penalty = length_penalty if length_penalty is not None else 0.7

    @torch.no_grad()
    def step(token, hidden, features, keys):
        logits, hidden_out, alpha = model.step(*(torch.from_numpy(a) for a in (token, hidden, features, keys)))
        return torch.log_softmax(logits, dim=1).numpy(), hidden_out.numpy(), alpha.numpy()

    results: dict[int, Captions] = {}
    with _progress() as progress:
        for beam in beams:
            options = SearchOptions(beam_size=beam, alternatives=1, max_length=model.cfg.max_length - 1,
                                    length_penalty=penalty)
            task = progress.add_task(f"beam {beam} (PyTorch)", total=len(records))
            captions: Captions = {}
            for chunk in _chunks(records, batch_size):
                with torch.no_grad():
                    grid = torch.from_numpy(cache.get([r.image_id for r in chunk]))
                    features, keys, hidden0 = (t.numpy() for t in model.encoder(grid))
                found = beam_search(step, features, keys, hidden0, options, start_id=special["start"],
                                    end_id=special["end"], banned_ids=never_emitted(special))
                for record, hypotheses in zip(chunk, found):
                    captions[record.image_id] = " ".join(vocab[t] for t in hypotheses[0].tokens if t != special["end"])
                progress.advance(task, len(chunk))
            results[beam] = captions
    return results


def caption_with_bundle(bundle_dir: Path | None, dataset: DataSet, records: Sequence[Record], beams: Sequence[int],
                        device: str = "auto", length_penalty: float | None = None,
                        batch_size: int = 32) -> dict[int, Captions]:
    """Captions per beam size from a model bundle, decoding the images as `annotate` does."""
    found = bundle_captions(bundle_dir, dataset, records, beams, device, length_penalty, batch_size)
    return {beam: {image_id: caption.text for image_id, caption in by_id.items()} for beam, by_id in found.items()}


def bundle_captions(bundle_dir: Path | None, dataset: DataSet, records: Sequence[Record], beams: Sequence[int],
                    device: str = "auto", length_penalty: float | None = None,
                    batch_size: int = 32) -> dict[int, dict[str, Caption]]:
    """The runtime's full Caption (text, scores, confidence) per beam size and image id."""
    from caption_cli.bundle import load_bundle
    from caption_cli.captioner import Captioner
    from caption_cli.images import decode

    bundle = load_bundle(bundle_dir)
    size = bundle.image_size
    results: dict[int, dict[str, Caption]] = {beam: {} for beam in beams}
    captioners = {beam: Captioner(bundle, device, SearchOptions(beam_size=beam, alternatives=1,
                                                                length_penalty=length_penalty)) for beam in beams}
    with _progress() as progress, ThreadPoolExecutor(2) as pool:
        task = progress.add_task(f"{bundle.name} (onnxruntime)", total=len(records))
        for chunk in _chunks(records, batch_size):
            decoded = list(pool.map(lambda r: decode(dataset.path(r), size), chunk))
            bad = [d for d in decoded if d.error]
            if bad:
                raise RuntimeError(f"{bad[0].path}: {bad[0].error}")
            pixels = np.stack([d.pixels for d in decoded])
            for beam, captioner in captioners.items():
                for record, caption in zip(chunk, captioner.caption(pixels)):
                    results[beam][record.image_id] = caption
            progress.advance(task, len(chunk))
    return results


def evaluate(dataset: DataSet, split: str, caption_fn: Callable[[Sequence[Record]], dict[int, Captions]],
             results_json: Path | None = None, meteor: bool = True) -> dict[int, dict]:
    """Scores per beam size; optionally writes COCO-style results JSON per beam."""
    records = dataset.split(split)
    if not records:
        raise ValueError(f"the data set has no {split!r} images")
    started = time.time()
    by_beam = caption_fn(records)
    references = {r.image_id: list(r.captions) for r in records}
    report = {}
    for beam, captions in by_beam.items():
        scores = score_captions(references, captions, meteor=meteor)
        scores["images"] = len(captions)
        report[beam] = scores
        if results_json is not None:
            path = Path(str(results_json).replace("{beam}", str(beam)))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in captions.items()], indent=1))
    for scores in report.values():
        scores["seconds"] = round(time.time() - started, 1)
    return report
