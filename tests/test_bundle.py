"""Loading and verifying model bundles.

Verification never parses the .onnx files, so most tests use a synthetic bundle whose
graph files are arbitrary bytes; one test loads the real exported tiny bundle.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from caption_cli import bundle as bundle_mod
from caption_cli.beam import SearchOptions
from caption_cli.bundle import Bundle, load_bundle
from caption_cli.errors import BundleError

VOCAB = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "runs"]
DECODER_BYTES = b"decoder graph bytes \x02\x03"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_bundle(folder: Path, **changes) -> Path:
    """A bundle folder with valid hashes; `changes` override model.json keys (None deletes)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"encoder.onnx": b"encoder graph bytes \x00\x01", "decoder.onnx": DECODER_BYTES,
             "vocab.json": json.dumps(VOCAB).encode()}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    meta = {
        "format": "caption-cli-bundle", "format_version": 1, "name": "tiny-test", "created": "2026-01-01T00:00:00Z",
        "backbone": "efficientnet-lite0", "image_size": 32, "grid": [2, 3],
        "dims": {"E": 5, "A": 4, "H": 6, "V": len(VOCAB)},
        "special_tokens": {"pad": 0, "start": 1, "end": 2, "unk": 3}, "max_length": 9,
        "search": {"beam_size": 3, "length_penalty": 0.7, "alternatives": 2},
        "files": {"encoder": "encoder.onnx", "decoder": "decoder.onnx", "vocab": "vocab.json"},
        "tensors": {"encoder": {"inputs": ["pixels"], "outputs": ["features", "keys", "hidden0"]},
                    "decoder": {"inputs": ["token", "hidden", "features", "keys"],
                                "outputs": ["logprobs", "hidden_out", "attention"]}},
        "onnx": {"opset": 17, "ir_version": 8}, "training": {}, "scores": {},
        "sha256": {name: sha(data) for name, data in files.items()},
    }
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    (folder / "model.json").write_text(json.dumps(meta), encoding="utf-8")
    return folder


def error_of(path) -> str:
    with pytest.raises(BundleError) as raised:
        load_bundle(path)
    message = str(raised.value)
    assert "\n" not in message  # one line for the user
    return message


def test_verified_bundle_loads(tmp_path: Path):
    folder = make_bundle(tmp_path / "b")
    bundle = load_bundle(folder)
    assert isinstance(bundle, Bundle)
    assert bundle.path == folder
    assert bundle.name == "tiny-test"
    assert bundle.model_id == "tiny-test@" + sha(DECODER_BYTES)[:12]
    assert bundle.image_size == 32
    assert bundle.grid == (2, 3)
    assert bundle.max_length == 9
    assert bundle.vocab == VOCAB
    assert bundle.special_tokens == {"pad": 0, "start": 1, "end": 2, "unk": 3}
    assert bundle.encoder_path == folder / "encoder.onnx"
    assert bundle.decoder_path == folder / "decoder.onnx"
    assert bundle.tensor_names("decoder") == (["token", "hidden", "features", "keys"],
                                              ["logprobs", "hidden_out", "attention"])
    assert bundle.search_defaults == SearchOptions(beam_size=3, alternatives=2, max_length=9, length_penalty=0.7)
    assert bundle.meta["backbone"] == "efficientnet-lite0"
    assert load_bundle(folder / "model.json").path == folder  # the model.json path works too
    assert load_bundle(str(folder)).name == "tiny-test"


def test_flipped_byte_in_decoder_is_refused(tmp_path: Path):
    folder = make_bundle(tmp_path / "b")
    data = bytearray((folder / "decoder.onnx").read_bytes())
    data[5] ^= 0x01
    (folder / "decoder.onnx").write_bytes(bytes(data))
    message = error_of(folder)
    assert message.startswith(str(folder / "decoder.onnx") + ": sha256 mismatch")
    assert "damaged or was changed" in message


@pytest.mark.parametrize("name", ["encoder.onnx", "decoder.onnx", "vocab.json"])
def test_missing_file_is_named(tmp_path: Path, name: str):
    folder = make_bundle(tmp_path / "b")
    (folder / name).unlink()
    assert error_of(folder) == f"{folder / name}: missing (model.json lists it); the bundle is incomplete"


def test_file_without_a_hash_is_refused(tmp_path: Path):
    folder = make_bundle(tmp_path / "b")
    meta = json.loads((folder / "model.json").read_text())
    del meta["sha256"]["vocab.json"]
    (folder / "model.json").write_text(json.dumps(meta))
    assert error_of(folder) == (f"{folder / 'model.json'}: no sha256 for vocab.json (files.vocab); "
                                "the bundle cannot be verified")


@pytest.mark.parametrize("version, expected", [
    (3, "format_version 3 is newer than this caption-cli reads (2); upgrade caption-cli"),
    (0, "unsupported format_version 0 (this caption-cli reads 1 to 2); re-export the bundle"),
    ("1", "format_version is '1', expected an integer (1 to 2)"),
])
def test_wrong_format_version(tmp_path: Path, version, expected: str):
    folder = make_bundle(tmp_path / "b", format_version=version)
    assert error_of(folder) == f"{folder / 'model.json'}: {expected}"


def test_wrong_format(tmp_path: Path):
    folder = make_bundle(tmp_path / "b", format="something-else")
    assert error_of(folder) == f"{folder / 'model.json'}: format is 'something-else', expected 'caption-cli-bundle'"


@pytest.mark.parametrize("changes, fragment", [
    ({"grid": [7]}, "missing or invalid 'grid' (expected [h, w] positive integers)"),
    ({"dims": {"E": 5, "A": 4, "H": 6}}, "missing or invalid 'dims'"),
    ({"special_tokens": {"pad": 0, "start": 1, "end": 99, "unk": 3}}, "missing or invalid 'special_tokens'"),
    ({"image_size": None}, "missing or invalid 'image_size'"),
    ({"search": {"beam_size": 0, "length_penalty": 0.7, "alternatives": 1}},
     "search defaults: beam_size must be an integer from 1 to 32, got 0"),
    ({"tensors": {"encoder": {"inputs": ["pixels"], "outputs": ["features"]}}}, "missing or invalid 'tensors.encoder'"),
    ({"files": {"encoder": "encoder.onnx", "decoder": "decoder.onnx"}}, "missing or invalid 'files'"),
])
def test_invalid_model_json_fields(tmp_path: Path, changes: dict, fragment: str):
    folder = make_bundle(tmp_path / "b", **changes)
    message = error_of(folder)
    assert message.startswith(f"{folder / 'model.json'}: ")
    assert fragment in message


def test_no_end_after_words_become_token_ids(tmp_path: Path):
    search = {"beam_size": 3, "length_penalty": 0.7, "alternatives": 2, "no_end_after": ["a", "runs"]}
    assert load_bundle(make_bundle(tmp_path / "b", search=search)).no_end_after == (4, 6)
    assert load_bundle(make_bundle(tmp_path / "old")).no_end_after == ()  # older bundles: no rule


@pytest.mark.parametrize("words, fragment", [
    (["a", "cat"], "search.no_end_after names 'cat', which is not an ordinary word of vocab.json"),
    (["<end>"], "search.no_end_after names '<end>', which is not an ordinary word of vocab.json"),
    ("a", "search.no_end_after must be a list of words"),
])
def test_no_end_after_must_name_ordinary_vocabulary_words(tmp_path: Path, words, fragment: str):
    search = {"beam_size": 3, "length_penalty": 0.7, "alternatives": 2, "no_end_after": words}
    folder = make_bundle(tmp_path / "b", search=search)
    assert error_of(folder) == f"{folder / 'model.json'}: {fragment}"


def test_no_next_after_words_become_token_ids(tmp_path: Path):
    search = {"beam_size": 3, "length_penalty": 0.7, "alternatives": 2, "no_next_after": {"a": ["runs", "a"]}}
    assert load_bundle(make_bundle(tmp_path / "b", search=search)).no_next_after == {4: (4, 6)}
    assert load_bundle(make_bundle(tmp_path / "old")).no_next_after == {}  # older bundles: no rule


@pytest.mark.parametrize("pairs, fragment", [
    ({"a": ["cat"]}, "search.no_next_after names 'cat', which is not an ordinary word of vocab.json"),
    ({"<start>": ["a"]}, "search.no_next_after names '<start>', which is not an ordinary word of vocab.json"),
    ({"a": "runs"}, "search.no_next_after must map words to lists of words"),
    (["a", "runs"], "search.no_next_after must map words to lists of words"),
])
def test_no_next_after_must_name_ordinary_vocabulary_words(tmp_path: Path, pairs, fragment: str):
    search = {"beam_size": 3, "length_penalty": 0.7, "alternatives": 2, "no_next_after": pairs}
    assert fragment in error_of(make_bundle(tmp_path / "b", search=search))


def test_hash_entry_outside_the_folder_is_refused(tmp_path: Path):
    folder = make_bundle(tmp_path / "b")
    meta = json.loads((folder / "model.json").read_text())
    meta["sha256"]["../secret"] = "0" * 64
    (folder / "model.json").write_text(json.dumps(meta))
    assert "bundle files must sit in the bundle folder" in error_of(folder)


def test_vocab_must_match_model_json(tmp_path: Path):
    folder = make_bundle(tmp_path / "b", dims={"E": 5, "A": 4, "H": 6, "V": 8})
    assert error_of(folder) == f"{folder / 'vocab.json'}: 7 tokens, but model.json dims.V is 8"


def test_vocab_special_tokens_are_checked(tmp_path: Path):
    folder = make_bundle(tmp_path / "b")
    swapped = ["<start>", "<pad>"] + VOCAB[2:]
    data = json.dumps(swapped).encode()
    (folder / "vocab.json").write_bytes(data)
    meta = json.loads((folder / "model.json").read_text())
    meta["sha256"]["vocab.json"] = sha(data)
    (folder / "model.json").write_text(json.dumps(meta))
    assert error_of(folder) == (f"{folder / 'vocab.json'}: token 0 is '<start>', but model.json "
                                "special_tokens.pad says it is <pad>")


def test_not_a_bundle(tmp_path: Path):
    assert error_of(tmp_path / "nowhere") == f"{tmp_path / 'nowhere'}: no such model bundle folder"
    (tmp_path / "empty").mkdir()
    assert error_of(tmp_path / "empty") == (f"{tmp_path / 'empty' / 'model.json'}: missing; "
                                            f"{tmp_path / 'empty'} is not a caption-cli model bundle")
    (tmp_path / "file.txt").write_text("x")
    assert "not a model bundle folder" in error_of(tmp_path / "file.txt")
    folder = make_bundle(tmp_path / "b")
    (folder / "model.json").write_text("{not json")
    assert error_of(folder).startswith(f"{folder / 'model.json'}: not valid JSON (")


def test_default_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(bundle_mod, "DEFAULT_BUNDLE_DIR", tmp_path / "models" / "default")
    message = error_of(None)
    assert message.startswith("no default model is installed")
    assert str(tmp_path / "models" / "default") in message and "--model PATH" in message
    make_bundle(tmp_path / "models" / "default")
    assert load_bundle(None).name == "tiny-test"
    assert load_bundle().path == tmp_path / "models" / "default"


def test_exported_tiny_bundle_loads(tiny_bundle: Path):
    bundle = load_bundle(tiny_bundle)
    assert bundle.name == "tiny-random"
    assert bundle.model_id == f"tiny-random@{sha((tiny_bundle / 'decoder.onnx').read_bytes())[:12]}"
    assert len(bundle.vocab) == bundle.meta["dims"]["V"]
