"""Write a model bundle (model.json, encoder.onnx, decoder.onnx, vocab.json) from a checkpoint.

The bundle appears all at once: every file is written into a temporary folder next to
the destination, checked, and only then renamed into place, so a crash or a failed
parity check never leaves a half-written bundle where the runtime would find it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from caption_cli.bundle import FORMAT, FORMAT_VERSION, OLDEST_FORMAT_VERSION, sha256_file
from caption_cli.bundle import SPECIAL_TOKENS as BUNDLE_SPECIAL_TOKENS
from caption_cli.errors import CaptionCliError
from export.onnx_export import (DECODER_INPUTS, DECODER_OUTPUTS, ENCODER_INPUTS, ENCODER_OUTPUTS, IR_VERSION,
                                OPSET, SCORER_ENCODER_OUTPUTS, export_decoder, export_encoder,
                                half_decoder_reference)
from export.parity import ParityError, check_parity, check_scorer, probe_pixels
from training.backbone import EfficientNetLite, load_backbone
from training.model import ModelConfig, ShowAttendTell

FILES = {"encoder": "encoder.onnx", "decoder": "decoder.onnx", "vocab": "vocab.json"}
SCORER_FILE = "scorer.int8.onnx"  # the confidence scorer's decoder step (int8 weights)
SPECIAL_TOKENS = tuple(BUNDLE_SPECIAL_TOKENS.values())  # ids 0..3, in this order
DEFAULT_SEARCH = {"beam_size": 3, "length_penalty": 0.7, "alternatives": 3}


class ExportError(CaptionCliError):
    """A checkpoint cannot be exported (unreadable, incomplete) or the destination is unsafe."""


def _check_parts(model: ShowAttendTell, backbone: EfficientNetLite, vocab: Sequence[str]) -> None:
    cfg, spec = model.cfg, backbone.spec
    if tuple(cfg.grid) != tuple(spec.grid) or cfg.feature_dim != spec.channels:
        raise ExportError(f"model expects a {cfg.grid} x {cfg.feature_dim} grid but {spec.name} at "
                          f"{spec.image_size} px gives {spec.grid} x {spec.channels}")
    if len(vocab) != cfg.vocab_size:
        raise ExportError(f"vocabulary has {len(vocab)} tokens but the model scores {cfg.vocab_size}")
    if tuple(vocab[:4]) != SPECIAL_TOKENS:
        raise ExportError(f"vocabulary must start with {', '.join(SPECIAL_TOKENS)}, got {', '.join(vocab[:4])}")
    expected = {"pad": 0, "start": 1, "end": 2, "unk": 3}
    if dict(cfg.special) != expected:
        raise ExportError(f"model's special token ids {cfg.special} differ from the bundle's {expected}")


def _check_search(search: dict) -> None:
    unknown = sorted(set(search) - set(DEFAULT_SEARCH))
    if unknown:
        raise ExportError(f"unknown search option {', '.join(map(repr, unknown))}; "
                          f"model.json's search options are {', '.join(DEFAULT_SEARCH)}")


def _check_scorer(model: ShowAttendTell, scorer: ShowAttendTell) -> None:
    """The scorer reads the main model's captions off the same backbone grid: same grid,
    same channels, same vocabulary size and special ids (the words themselves are checked
    where both vocabularies are known, in export_checkpoint)."""
    ours, theirs = model.cfg, scorer.cfg
    for field in ("grid", "feature_dim", "vocab_size", "special"):
        if getattr(ours, field) != getattr(theirs, field):
            raise ExportError(f"the scorer's {field} ({getattr(theirs, field)}) differs from the model's "
                              f"({getattr(ours, field)}); the scorer must share the backbone and vocabulary")


def _model_json(model: ShowAttendTell, backbone: EfficientNetLite, folder: Path, *, name: str, max_length: int,
                search: dict, training: dict, scores: dict, half_decoder: bool, cpu_decoder: bool,
                scorer: dict | None) -> dict:
    cfg, spec = model.cfg, backbone.spec
    files = dict(FILES)
    tensors = {"encoder": {"inputs": ENCODER_INPUTS, "outputs": ENCODER_OUTPUTS},
               "decoder": {"inputs": DECODER_INPUTS, "outputs": DECODER_OUTPUTS}}
    onnx_meta = {"opset": OPSET, "ir_version": IR_VERSION, "decoder_weights": "float16" if half_decoder else "float32"}
    if cpu_decoder:
        from export.quantize import CPU_DECODER_FILE

        files["decoder_cpu"] = CPU_DECODER_FILE
        onnx_meta["decoder_cpu_weights"] = "int8"
    if scorer is not None:
        files["scorer"] = SCORER_FILE
        tensors["scorer"] = {"inputs": DECODER_INPUTS, "outputs": DECODER_OUTPUTS,
                             "from_encoder": SCORER_ENCODER_OUTPUTS}
        onnx_meta["scorer_weights"] = "int8"
    meta = {
        "format": FORMAT,
        # the lowest version that describes the bundle: older runtimes load what they can read
        "format_version": FORMAT_VERSION if scorer is not None else OLDEST_FORMAT_VERSION,
        "name": name,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "backbone": spec.name,
        "image_size": spec.image_size,
        "grid": list(spec.grid),
        "dims": {"E": cfg.encoder_dim, "A": cfg.attention_dim, "H": cfg.hidden_dim, "V": cfg.vocab_size},
        "special_tokens": {"pad": 0, "start": 1, "end": 2, "unk": 3},
        "max_length": max_length,
        "search": {**DEFAULT_SEARCH, **search},
        "files": files,
        "tensors": tensors,
        "onnx": onnx_meta,
        "training": training,
        "scores": scores,
        "sha256": {filename: sha256_file(folder / filename) for filename in files.values()},
    }
    if scorer is not None:
        meta["scorer"] = scorer
    return meta


def _replace_dir(ready: Path, out_dir: Path) -> None:
    """Move `ready` to `out_dir`, replacing an older bundle there (never any other folder)."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ExportError(f"{out_dir}: exists and is not a folder")
        if any(out_dir.iterdir()) and not (out_dir / "model.json").is_file():
            raise ExportError(f"{out_dir}: folder is not empty and holds no model bundle; refusing to replace it")
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
        try:
            os.replace(ready, out_dir)
        except OSError:
            os.replace(old / out_dir.name, out_dir)  # put the old bundle back
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(ready, out_dir)


def write_bundle(model: ShowAttendTell, backbone: EfficientNetLite, vocab: Sequence[str], out_dir: Path, *,
                 name: str, max_length: int, search: dict | None = None, training: dict | None = None,
                 scores: dict | None = None, verify: Callable[[Path], Any] | None = None,
                 half_decoder: bool = False, optimise_decoder: bool = True, cpu_decoder: bool = False,
                 scorer: ShowAttendTell | None = None, scorer_info: dict | None = None) -> Path:
    """Write the bundle to `out_dir` atomically and return its path.

    max_length: most tokens the search may generate per caption, <end> included.
    search: overrides of the default search options (beam_size, length_penalty, alternatives).
    half_decoder: store decoder.onnx's large weights as float16 (about half its size; it still
    computes in float32). The graph then matches half_decoder_reference(model), not `model`.
    optimise_decoder: the decoder rewrites of export.decoder_passes (same maths, less time per
    step); False writes the step exactly as traced.
    cpu_decoder: also write decoder.int8.onnx (export.quantize), the step CPUs run, quantised
    from the fully rewritten step; decoder.onnx, then only CUDA's, keeps its GRU input
    projection unfolded (19 MB smaller for a 3,156-word vocabulary, same maths).
    verify: called with the finished temporary folder before it is moved into place;
    raising there (e.g. a failed parity check) leaves `out_dir` as it was.
    scorer: a cross-entropy-trained model on the same backbone and vocabulary whose
    teacher-forced log-probability of each caption feeds the confidence map (docs/bundle.md,
    "confidence scorer"); its projection joins encoder.onnx and its step, float16-rounded
    and then int8, becomes scorer.int8.onnx. scorer_info: model.json's `scorer` (provenance).
    """
    out_dir = Path(out_dir).absolute()
    _check_parts(model, backbone, vocab)
    if scorer is not None:
        _check_scorer(model, scorer)
    _check_search(search or {})
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the bundle private to its writer
    try:
        export_encoder(model, backbone, tmp / FILES["encoder"], scorer)
        export_decoder(model, tmp / FILES["decoder"], half_weights=half_decoder, optimise=optimise_decoder,
                       fold_embedding=not cpu_decoder)
        if cpu_decoder:
            from export.quantize import CPU_DECODER_FILE

            _export_int8_step(model, tmp, CPU_DECODER_FILE, half_weights=half_decoder)
        if scorer is not None:
            _export_int8_step(scorer, tmp, SCORER_FILE, half_weights=True)
        (tmp / FILES["vocab"]).write_text(json.dumps(list(vocab), ensure_ascii=False), encoding="utf-8")
        meta = _model_json(model, backbone, tmp, name=name, max_length=max_length, search=search or {},
                           training=training or {}, scores=scores or {}, half_decoder=half_decoder,
                           cpu_decoder=cpu_decoder,
                           scorer=None if scorer is None else {**(scorer_info or {}), "weights": "int8"})
        text = json.dumps(meta, indent=2, ensure_ascii=False, default=str)  # str(): Paths in a train config
        (tmp / "model.json").write_text(text + "\n", encoding="utf-8")
        if verify is not None:
            verify(tmp)
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return out_dir


def _export_int8_step(model: ShowAttendTell, folder: Path, filename: str, *, half_weights: bool) -> None:
    """An int8 decoder step (export.quantize) of `model` in `folder`: the fully rewritten step
    (embedding table folded) traced to a scratch file, then quantised. Used for
    decoder.int8.onnx, the step CPUs run, and for scorer.int8.onnx, the scorer's only step
    (it reads each caption once, so it needs no float twin for a GPU)."""
    from export.quantize import quantise_decoder

    float_step = folder / f".{filename}.float.onnx"
    export_decoder(model, float_step, half_weights=half_weights)
    try:
        quantise_decoder(float_step, folder / filename)
    finally:
        float_step.unlink(missing_ok=True)


REQUIRED_KEYS = ("model", "model_config", "backbone", "vocab")


def load_checkpoint(checkpoint: Path) -> dict:
    """The checkpoint dict, read without unpickling arbitrary objects."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise ExportError(f"{checkpoint}: no such checkpoint file")
    if not zipfile.is_zipfile(checkpoint):  # torch.save has written zip archives since PyTorch 1.6
        raise ExportError(f"{checkpoint}: not a readable PyTorch checkpoint (not a torch.save zip archive)")
    try:
        data = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"a pickled {found.group(1)}" if found else "a pickled object"
        raise ExportError(f"{checkpoint}: holds objects other than tensors and plain data ({what}); "
                          "save state_dicts and plain values only") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{checkpoint}: not a readable PyTorch checkpoint ({first})") from exc
    if not isinstance(data, dict):
        raise ExportError(f"{checkpoint}: expected a checkpoint dict, found {type(data).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise ExportError(f"{checkpoint}: checkpoint lacks {', '.join(missing)}")
    return data


def model_from_checkpoint(data: dict, source: Path | str = "checkpoint") -> tuple[ShowAttendTell, EfficientNetLite]:
    """Rebuild the eval-mode model and its backbone from a loaded checkpoint dict."""
    try:
        cfg = ModelConfig.from_dict(data["model_config"])
        model = ShowAttendTell(cfg)
        model.load_state_dict(data["model"])
    except (TypeError, KeyError, RuntimeError) as exc:
        message = str(exc).strip().splitlines()[0]
        raise ExportError(f"{source}: model weights do not fit its model_config ({message})") from exc
    model.eval().requires_grad_(False)
    try:
        backbone = load_backbone(data["backbone"]["name"], data["backbone"].get("image_size"))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ExportError(f"{source}: bad backbone entry {data['backbone']!r} ({exc})") from exc
    try:
        _check_parts(model, backbone, list(data["vocab"]))
    except ExportError as exc:
        raise ExportError(f"{source}: {exc}") from None
    return model, backbone


def default_name(data: dict) -> str:
    """e.g. sat-lite0-flickr8k: architecture, backbone, data set."""
    backbone = str(data["backbone"]["name"]).removeprefix("efficientnet-")
    dataset = (data.get("dataset") or {}).get("name", "custom")
    return f"sat-{backbone}-{dataset}"


def export_checkpoint(checkpoint: Path, out_dir: Path, *, name: str | None = None, scores: dict | None = None,
                      check: bool = True, half_decoder: bool = False, search: dict | None = None,
                      cpu_decoder: bool = False, scorer_checkpoint: Path | None = None) -> Path:
    """Build a bundle from a training checkpoint; with `check`, refuse one that fails parity.

    half_decoder: float16 decoder weights (see write_bundle); parity is then checked against
    the float16-rounded PyTorch model, which the graph matches exactly.
    search: model.json's default search options (beam_size, length_penalty, alternatives);
    None keeps DEFAULT_SEARCH.
    cpu_decoder: also write the int8 CPU step (see write_bundle), checked against the float one.
    scorer_checkpoint: a cross-entropy checkpoint on the same backbone and vocabulary (for
    an SCST model, the one it was fine-tuned from) to ship as the confidence scorer.

    Raises ExportError for an unusable checkpoint or destination, ParityError when the
    ONNX graphs disagree with PyTorch (out_dir is then left untouched).
    """
    checkpoint = Path(checkpoint)
    data = load_checkpoint(checkpoint)
    model, backbone = model_from_checkpoint(data, checkpoint)
    dataset = data.get("dataset") or {}
    training = {
        "dataset": dataset.get("name"), "split": dataset.get("split", "train"),
        "images": dataset.get("images"), "captions": dataset.get("captions"),
        "epochs": data.get("epoch"), "step": data.get("step"), "config": data.get("train_config") or {},
    }

    scorer, scorer_info = None, None
    if scorer_checkpoint is not None:
        scorer, scorer_info = _load_scorer(Path(scorer_checkpoint), data, backbone)
    try:
        reference = half_decoder_reference(model) if half_decoder else model
        scorer_reference = half_decoder_reference(scorer) if scorer is not None else None
    except ValueError as exc:  # a weight beyond float16's range
        raise ExportError(f"{checkpoint}: {exc}") from None

    def verify(folder: Path) -> None:
        pixels = probe_pixels(backbone.spec.image_size)
        report = check_parity(reference, backbone, folder, pixels)
        if not report.ok:
            raise ParityError(f"{checkpoint}: ONNX export disagrees with PyTorch; {report.summary()}")
        if cpu_decoder:
            from caption_cli.bundle import load_bundle
            from export.quantize import CPU_DECODER_FILE, check_cpu_decoder

            check_cpu_decoder(load_bundle(folder), folder / CPU_DECODER_FILE)
        if scorer_reference is not None:
            scored = check_scorer(scorer_reference, backbone, folder, pixels)
            if not scored.ok:
                raise ParityError(f"{scorer_checkpoint}: the scorer's ONNX graphs disagree with PyTorch; "
                                  f"{scored.summary()}")

    return write_bundle(
        model, backbone, list(data["vocab"]), out_dir, name=name or default_name(data),
        max_length=model.cfg.max_length - 1,  # cfg counts <start>; the search generates the rest
        search=search, training=training, scores=scores if scores is not None else data.get("scores"),
        verify=verify if check else None, half_decoder=half_decoder, cpu_decoder=cpu_decoder,
        scorer=scorer, scorer_info=scorer_info,
    )


def _load_scorer(path: Path, data: dict, backbone: EfficientNetLite) -> tuple[ShowAttendTell, dict]:
    """The scorer model from its checkpoint, refused unless it shares the caption model's
    backbone and vocabulary word for word; and its provenance for model.json."""
    scorer_data = load_checkpoint(path)
    scorer, scorer_backbone = model_from_checkpoint(scorer_data, path)
    if scorer_backbone.spec != backbone.spec:
        raise ExportError(f"{path}: the scorer's backbone ({scorer_backbone.spec.name} at "
                          f"{scorer_backbone.spec.image_size} px) is not the model's ({backbone.spec.name} at "
                          f"{backbone.spec.image_size} px)")
    if list(scorer_data["vocab"]) != list(data["vocab"]):
        raise ExportError(f"{path}: the scorer's vocabulary differs from the model's; it could not score its words")
    dataset = scorer_data.get("dataset") or {}
    return scorer, {"role": "teacher-forced mean log-probability of each caption (calibration feature "
                            "scorer_mean_logprob)",
                    "dataset": dataset.get("name"), "images": dataset.get("images"),
                    "epochs": scorer_data.get("epoch"), "step": scorer_data.get("step"),
                    "selection": scorer_data.get("scores")}


def update_model_json(bundle_dir: Path, change: Callable[[dict], None]) -> Path:
    """Apply `change` to an existing bundle's model.json, write it atomically, then re-verify.

    For what is measured or fitted after export (calibration, scores, search rules): the
    ONNX files and their hashes are untouched, so the model id (and every stored caption's
    resume key) stays the same. A change the runtime would refuse is rolled back.
    """
    from caption_cli.bundle import load_bundle

    meta_path = Path(bundle_dir) / "model.json"
    before = meta_path.read_text(encoding="utf-8")
    meta = json.loads(before)
    change(meta)
    _write_atomically(meta_path, json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    try:
        load_bundle(bundle_dir)  # the whole bundle still verifies
    except CaptionCliError:
        _write_atomically(meta_path, before)
        raise
    return meta_path


def _write_atomically(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(temporary, path.stat().st_mode & 0o7777)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def set_calibration(bundle_dir: Path, calibration: dict) -> Path:
    """Write `calibration` into an existing bundle's model.json (only the confidence map changes)."""
    from caption_cli.confidence import Calibration

    Calibration.from_meta(calibration, str(Path(bundle_dir) / "model.json"))  # refused before the bundle is touched
    return update_model_json(bundle_dir, lambda meta: meta.__setitem__("calibration", calibration))


def set_scores(bundle_dir: Path, scores: dict) -> Path:
    """Record scores measured on the bundle itself (model.json `scores`; `info` prints them)."""
    if not isinstance(scores, dict):
        raise ExportError(f"scores must be a JSON object, got {type(scores).__name__}")
    return update_model_json(bundle_dir, lambda meta: meta.__setitem__("scores", scores))
