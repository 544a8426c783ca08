"""Load and verify a model bundle: model.json, encoder.onnx, decoder.onnx, vocab.json.

Every file listed in model.json's `sha256` is hashed before anything is loaded, so a
damaged download or a hand-edited file is refused with one line naming the file and
the cause, instead of producing silently wrong captions.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from caption_cli.beam import SearchOptions, SearchOptionsError
from caption_cli.confidence import Calibration
from caption_cli.errors import BundleError

FORMAT = "caption-cli-bundle"
# 2 added what an older runtime would misread or silently ignore: a confidence scorer
# (files.scorer, the scorer_mean_logprob calibration feature) and search.no_next_after.
FORMAT_VERSION = 2
OLDEST_FORMAT_VERSION = 1  # still read: a version-1 bundle has none of version 2's fields
DEFAULT_BUNDLE_DIR = Path(__file__).resolve().parent / "models" / "default"
SPECIAL_TOKENS = {"pad": "<pad>", "start": "<start>", "end": "<end>", "unk": "<unk>"}
TENSORS = {"encoder": (["pixels"], ["features", "keys", "hidden0"]),
           "decoder": (["token", "hidden", "features", "keys"], ["logprobs", "hidden_out", "attention"])}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Bundle:
    """A verified bundle. `meta` is model.json as read; the properties are the parts
    the runtime uses."""

    path: Path
    meta: dict[str, Any]
    vocab: list[str]

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def model_id(self) -> str:
        """`name@sha12` of the decoder: changes whenever the weights change.

        A graph-only rewrite of decoder.onnx (export.decoder_passes: same weights, same
        outputs) records the decoder's original sha12 as `weights_id`, so the id, and with
        it every stored caption's resume and reuse key, stays the same.
        """
        weights_id = self.meta.get("weights_id")
        if isinstance(weights_id, str) and weights_id:
            return f"{self.name}@{weights_id}"
        return f"{self.name}@{self.meta['sha256'][self.meta['files']['decoder']][:12]}"

    @property
    def image_size(self) -> int:
        return self.meta["image_size"]

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.meta["grid"])

    @property
    def max_length(self) -> int:
        return self.meta["max_length"]

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self.meta["special_tokens"])

    @property
    def encoder_path(self) -> Path:
        return self.path / self.meta["files"]["encoder"]

    @property
    def decoder_path(self) -> Path:
        return self.path / self.meta["files"]["decoder"]

    def for_device(self, device: str) -> Bundle:
        """The bundle as run on `device`: on a CPU, its int8 decoder step when it has one.

        `files.decoder_cpu` (export.quantize) computes the step ~1.8x faster on a CPU with
        slightly different numbers, so the view it returns has that file as its decoder
        and, through the decoder's sha256, its own model id.
        """
        cpu_decoder = self.meta["files"].get("decoder_cpu")
        if device != "cpu" or not cpu_decoder:
            return self
        meta = {key: value for key, value in self.meta.items() if key != "weights_id"}
        meta["files"] = {**self.meta["files"], "decoder": cpu_decoder}
        return replace(self, meta=meta)

    def tensor_names(self, graph: str) -> tuple[list[str], list[str]]:
        """(inputs, outputs) of "encoder", "decoder" or "scorer", in the contract's order."""
        names = self.meta["tensors"][graph]
        return list(names["inputs"]), list(names["outputs"])

    @property
    def scorer_path(self) -> Path | None:
        """The confidence scorer's step (files.scorer), or None for a bundle without one."""
        name = self.meta["files"].get("scorer")
        return None if not name else self.path / name

    @property
    def scorer_encoder_outputs(self) -> list[str]:
        """The encoder outputs the scorer's step reads (features, keys, hidden0), or []."""
        return list(self.meta["tensors"]["scorer"]["from_encoder"]) if self.scorer_path else []

    @property
    def calibration(self) -> Calibration | None:
        """The confidence map fitted on validation data, or None for an uncalibrated bundle."""
        meta = self.meta.get("calibration")
        return None if meta is None else Calibration.from_meta(meta)

    @property
    def no_end_after(self) -> tuple[int, ...]:
        """Token ids after which a caption may not end (model.json `search.no_end_after`,
        words; absent in older bundles, which then have no such rule)."""
        words = self.meta["search"].get("no_end_after", [])
        index = {word: i for i, word in enumerate(self.vocab)}
        return tuple(sorted(index[word] for word in words))

    @property
    def no_next_after(self) -> dict[int, tuple[int, ...]]:
        """Token id -> ids that may not follow it (model.json `search.no_next_after`, words;
        absent in older bundles, which then have no such rule)."""
        pairs = self.meta["search"].get("no_next_after", {})
        index = {word: i for i, word in enumerate(self.vocab)}
        return {index[word]: tuple(sorted(index[n] for n in after)) for word, after in pairs.items()}

    @property
    def search_defaults(self) -> SearchOptions:
        search = self.meta["search"]
        return SearchOptions(beam_size=search["beam_size"], alternatives=search["alternatives"],
                             max_length=self.max_length, length_penalty=search["length_penalty"])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load_bundle(path: Path | str | None = None) -> Bundle:
    """Verify and load a bundle folder (or its model.json); None loads the installed default."""
    folder = _bundle_folder(path)
    meta_path = folder / "model.json"
    meta = _read_json(meta_path, "model.json")
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    _check_format(meta_path, meta)
    _check_fields(meta_path, meta)
    _verify_files(folder, meta_path, meta)
    vocab = _read_vocab(folder / meta["files"]["vocab"], meta)
    _check_no_end_after(meta_path, meta, vocab)
    return Bundle(path=folder, meta=meta, vocab=vocab)


def _bundle_folder(path: Path | str | None) -> Path:
    if path is None:
        if not (DEFAULT_BUNDLE_DIR / "model.json").is_file():
            raise BundleError(f"no default model is installed ({DEFAULT_BUNDLE_DIR} has no model.json); "
                              f"pass a bundle folder with --model PATH")
        return DEFAULT_BUNDLE_DIR
    folder = Path(path).expanduser()
    if folder.is_file() and folder.name == "model.json":
        folder = folder.parent
    if not folder.exists():
        raise BundleError(f"{folder}: no such model bundle folder")
    if not folder.is_dir():
        raise BundleError(f"{folder}: not a model bundle folder (expected a folder with model.json, "
                          f"encoder.onnx, decoder.onnx and vocab.json)")
    if not (folder / "model.json").is_file():
        raise BundleError(f"{folder / 'model.json'}: missing; {folder} is not a caption-cli model bundle")
    return folder


def _read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BundleError(f"{path}: missing ({what} of the bundle)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: cannot be read ({exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _check_format(meta_path: Path, meta: dict) -> None:
    if meta.get("format") != FORMAT:
        raise BundleError(f"{meta_path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise BundleError(f"{meta_path}: format_version is {version!r}, expected an integer "
                          f"({OLDEST_FORMAT_VERSION} to {FORMAT_VERSION})")
    if version > FORMAT_VERSION:
        raise BundleError(f"{meta_path}: format_version {version} is newer than this caption-cli reads "
                          f"({FORMAT_VERSION}); upgrade caption-cli")
    if version < OLDEST_FORMAT_VERSION:
        raise BundleError(f"{meta_path}: unsupported format_version {version} (this caption-cli reads "
                          f"{OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}); re-export the bundle")


def _is_int(value: Any, low: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_fields(meta_path: Path, meta: dict) -> None:
    """The fields the runtime relies on, each with the shape it needs."""

    def bad(field: str, expected: str) -> BundleError:
        return BundleError(f"{meta_path}: missing or invalid {field!r} (expected {expected})")

    if not isinstance(meta.get("name"), str) or not meta["name"]:
        raise bad("name", "a non-empty string")
    if not _is_int(meta.get("image_size")):
        raise bad("image_size", "a positive integer")
    grid = meta.get("grid")
    if not (isinstance(grid, list) and len(grid) == 2 and all(_is_int(g) for g in grid)):
        raise bad("grid", "[h, w] positive integers")
    dims = meta.get("dims")
    if not (isinstance(dims, dict) and all(_is_int(dims.get(d)) for d in "EAHV")):
        raise bad("dims", "positive integers E, A, H, V")
    special = meta.get("special_tokens")
    if not (isinstance(special, dict)
            and all(_is_int(special.get(s), 0) and special[s] < dims["V"] for s in SPECIAL_TOKENS)):
        raise bad("special_tokens", f"ids of {', '.join(SPECIAL_TOKENS)} below V={dims['V']}")
    if not _is_int(meta.get("max_length")):
        raise bad("max_length", "a positive integer")
    search = meta.get("search")
    if not (isinstance(search, dict) and {"beam_size", "length_penalty", "alternatives"} <= search.keys()):
        raise bad("search", "beam_size, length_penalty and alternatives")
    try:
        SearchOptions(beam_size=search["beam_size"], alternatives=search["alternatives"],
                      max_length=meta["max_length"], length_penalty=search["length_penalty"])
    except SearchOptionsError as exc:
        raise BundleError(f"{meta_path}: search defaults: {exc}") from None
    files = meta.get("files")
    if not (isinstance(files, dict) and all(isinstance(files.get(f), str) for f in ("encoder", "decoder", "vocab"))):
        raise bad("files", "file names for encoder, decoder and vocab")
    if not isinstance(files.get("decoder_cpu", ""), str):
        raise bad("files.decoder_cpu", "the file name of the CPU decoder step")
    if not isinstance(files.get("scorer", ""), str):
        raise bad("files.scorer", "the file name of the confidence scorer's step")
    tensors = meta.get("tensors")
    for graph, (inputs, outputs) in TENSORS.items():
        names = tensors.get(graph) if isinstance(tensors, dict) else None
        if not (isinstance(names, dict) and _names(names.get("inputs"), len(inputs))
                and _names(names.get("outputs"), len(outputs))):
            raise bad(f"tensors.{graph}", f"{len(inputs)} input and {len(outputs)} output names "
                                          f"({', '.join(inputs)} -> {', '.join(outputs)})")
    if files.get("scorer"):
        scorer = tensors.get("scorer")
        inputs, outputs = TENSORS["decoder"]
        if not (isinstance(scorer, dict) and _names(scorer.get("inputs"), len(inputs))
                and _names(scorer.get("outputs"), len(outputs)) and _names(scorer.get("from_encoder"), 3)):
            raise bad("tensors.scorer", "4 input and 3 output names like the decoder's, and from_encoder: the 3 "
                                        "encoder outputs the scorer reads (features, keys, hidden0)")
    if meta.get("calibration") is not None:
        calibration = Calibration.from_meta(meta["calibration"], str(meta_path))
        if "scorer_mean_logprob" in calibration.features and not files.get("scorer"):
            raise BundleError(f"{meta_path}: the calibration reads scorer_mean_logprob but the bundle has no "
                              f"scorer (files.scorer); re-run caption-cli calibrate")
    hashes = meta.get("sha256")
    if not isinstance(hashes, dict) or not hashes:
        raise bad("sha256", "the sha256 of every bundle file")


def _names(value: Any, count: int) -> bool:
    return isinstance(value, list) and len(value) == count and all(isinstance(v, str) and v for v in value)


def _verify_files(folder: Path, meta_path: Path, meta: dict) -> None:
    """Every file in `files` has a sha256, and every sha256 matches its file."""
    hashes: dict[str, Any] = meta["sha256"]
    for role, name in meta["files"].items():
        if name not in hashes:
            raise BundleError(f"{meta_path}: no sha256 for {name} (files.{role}); the bundle cannot be verified")
    for name, expected in hashes.items():
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise BundleError(f"{meta_path}: sha256 names {name!r}; bundle files must sit in the bundle folder")
        if not isinstance(expected, str) or not _SHA256.match(expected.lower()):
            raise BundleError(f"{meta_path}: sha256 of {name} is not 64 hex digits")
        file = folder / name
        if not file.is_file():
            raise BundleError(f"{file}: missing (model.json lists it); the bundle is incomplete")
        try:
            actual = sha256_file(file)
        except OSError as exc:
            raise BundleError(f"{file}: cannot be read ({exc.strerror or exc})") from None
        if actual != expected.lower():
            raise BundleError(f"{file}: sha256 mismatch (model.json says {expected[:12]}..., the file has "
                              f"{actual[:12]}...); the file is damaged or was changed")


def _check_no_end_after(meta_path: Path, meta: dict, vocab: list[str]) -> None:
    """search.no_end_after, when present, lists ordinary words of this vocabulary;
    search.no_next_after, when present, maps such words to lists of such words."""
    words = meta["search"].get("no_end_after", [])
    if not (isinstance(words, list) and all(isinstance(word, str) for word in words)):
        raise BundleError(f"{meta_path}: search.no_end_after must be a list of words")
    pairs = meta["search"].get("no_next_after", {})
    if not (isinstance(pairs, dict) and all(isinstance(after, list) and all(isinstance(w, str) for w in after)
                                            for after in pairs.values())):
        raise BundleError(f"{meta_path}: search.no_next_after must map words to lists of words")
    known, specials = set(vocab), set(SPECIAL_TOKENS.values())
    named = [("no_end_after", word) for word in words]
    named += [("no_next_after", word) for word, after in pairs.items() for word in (word, *after)]
    for field, word in named:
        if word not in known or word in specials:
            raise BundleError(f"{meta_path}: search.{field} names {word!r}, which is not an ordinary word "
                              f"of vocab.json")


def _read_vocab(path: Path, meta: dict) -> list[str]:
    vocab = _read_json(path, "vocabulary")
    size = meta["dims"]["V"]
    if not (isinstance(vocab, list) and all(isinstance(word, str) for word in vocab)):
        raise BundleError(f"{path}: expected a JSON list of token strings")
    if len(vocab) != size:
        raise BundleError(f"{path}: {len(vocab)} tokens, but model.json dims.V is {size}")
    for role, token in SPECIAL_TOKENS.items():
        index = meta["special_tokens"][role]
        if vocab[index] != token:
            raise BundleError(f"{path}: token {index} is {vocab[index]!r}, but model.json special_tokens.{role} "
                              f"says it is {token}")
    return vocab
