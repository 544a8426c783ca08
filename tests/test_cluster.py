"""caption_cli.cluster: annotate on a local Ray instance, against a local run on the same files."""

from __future__ import annotations

import json
import os
import subprocess
import socket
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from caption_cli import cluster
from caption_cli.bundle import load_bundle
from caption_cli.cli import app
from caption_cli.cluster import PROCESS_DIED, CaptionerActor, ClusterError, ClusterOptions, plan
from caption_cli.pipeline import AnnotateOptions, annotate
from caption_cli.store import Store
from tests.test_pipeline import make_photos

REPO = Path(__file__).resolve().parents[1]
BATCH = 4


# ------------------------------------------------------------- no Ray needed


@pytest.mark.parametrize(
    ("resources", "device", "expected"),
    [
        ({"CPU": 2}, "auto", (1, 0.0, "ray:cpu")),
        ({"CPU": 16}, "auto", (8, 0.0, "ray:cpu")),
        ({"CPU": 32, "GPU": 4}, "auto", (4, 1.0, "ray:cuda")),
        ({"CPU": 32, "GPU": 4}, "cpu", (16, 0.0, "ray:cpu")),
        ({"CPU": 8, "GPU": 1}, "cuda", (1, 1.0, "ray:cuda")),
    ],
)
def test_plan_sizes_the_captioner_pool_from_the_cluster(resources, device, expected):
    shape = plan(resources, device, ClusterOptions())
    assert (shape.captioners, shape.gpus_per_captioner, shape.device) == expected


@pytest.mark.parametrize(
    ("resources", "device", "options", "message"),
    [
        ({"CPU": 8}, "cuda", ClusterOptions(), "has no GPU"),
        ({"CPU": 1}, "auto", ClusterOptions(), "decoding needs at least one more"),
        ({"CPU": 4}, "auto", ClusterOptions(captioners=4), "decoding needs at least one more"),
        ({"CPU": 8, "GPU": 2}, "auto", ClusterOptions(captioners=3), "need a GPU each"),
    ],
)
def test_plan_refuses_a_pool_that_would_wait_forever(resources, device, options, message):
    with pytest.raises(ClusterError, match=message):
        plan(resources, device, options)


def test_without_ray_the_cli_prints_the_install_hint(tmp_path: Path, monkeypatch):
    make_photos(tmp_path / "photos", 1)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    result = CliRunner().invoke(app, ["annotate", str(tmp_path / "photos"), "--db", str(tmp_path / "c.db"),
                                      "--ray", "local"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: --ray needs Ray (ray is not installed): pip install 'caption-cli[cluster]'"]
    assert not (tmp_path / "c.db").exists()


NO_CLUSTER = ("Could not find any running Ray instance. Please specify the one to connect to by setting "
              "`--address` flag or `RAY_ADDRESS` environment variable.")


@pytest.mark.parametrize("existing", [False, True], ids=["new-db", "existing-db"])
def test_a_cluster_that_cannot_be_reached_leaves_the_database_alone(tmp_path: Path, tiny_bundle: Path,
                                                                     monkeypatch, existing):
    """--ray auto with no cluster running: one error line, exit 1, and no database file
    created (an existing one is not touched). ray.init fails as Ray's does when it finds
    no cluster, so the test neither starts Ray nor depends on one running on this machine."""
    ray = pytest.importorskip("ray")

    def no_cluster(**kwargs):
        raise ConnectionError(NO_CLUSTER)

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_cluster)
    make_photos(tmp_path / "photos", 1)
    db = tmp_path / "c.db"
    if existing:
        with Store(db) as store:
            store.start_run("earlier@000000000000", "cpu", ["caption-cli", "annotate"])
    before = db.read_bytes() if existing else None
    result = CliRunner().invoke(app, ["annotate", str(tmp_path / "photos"), "--db", str(db),
                                      "--model", str(tiny_bundle), "--ray", "auto"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: no Ray cluster at 'auto' ({NO_CLUSTER}); start one with `ray start --head` (see docs/cluster.md), "
        "or use --ray local to run on this machine alone"]
    assert sorted(path.name for path in tmp_path.iterdir()) == (["c.db", "photos"] if existing else ["photos"])
    if existing:
        assert db.read_bytes() == before


def test_a_cluster_too_small_for_the_pool_leaves_no_database(tmp_path: Path, tiny_bundle: Path, monkeypatch):
    """A cluster that is reached but cannot hold the captioner pool (one CPU: nothing left
    to decode on) is refused before the database is made, in one line, exit 1."""
    ray = pytest.importorskip("ray")
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # "already joined": connect starts nothing
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 1.0})
    make_photos(tmp_path / "photos", 1)
    result = CliRunner().invoke(app, ["annotate", str(tmp_path / "photos"), "--db", str(tmp_path / "c.db"),
                                      "--model", str(tiny_bundle), "--ray", "auto"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: the Ray cluster has 1 CPU(s): 1 captioner(s) reserve one each, and decoding needs at least one more"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["photos"]


@pytest.mark.parametrize("form", ["HOST:PORT", "ray://HOST:PORT", "RAY_ADDRESS=HOST:PORT", "no-port-here"])
def test_a_head_address_with_nothing_listening_fails_in_seconds(tmp_path: Path, tiny_bundle: Path, monkeypatch, form):
    """--ray HOST:PORT (or auto with RAY_ADDRESS) where no Ray head listens: one line naming
    the address, exit 1, no database, and ray.init is never reached (it would retry for
    minutes). A malformed address says what forms are meant."""
    ray = pytest.importorskip("ray")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: pytest.fail("ray.init must not be tried"))
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        head = f"127.0.0.1:{probe.getsockname()[1]}"
    address = form.replace("HOST:PORT", head)
    if form.startswith("RAY_ADDRESS="):
        monkeypatch.setenv("RAY_ADDRESS", head)
        address, named = "auto", head
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        named = address
    make_photos(tmp_path / "photos", 1)
    result = CliRunner().invoke(app, ["annotate", str(tmp_path / "photos"), "--db", str(tmp_path / "c.db"),
                                      "--model", str(tiny_bundle), "--ray", address])
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    if form == "no-port-here":
        assert line == "Error: --ray 'no-port-here': expected auto, local, HOST:PORT or ray://HOST:PORT"
    else:
        assert line.startswith(f"Error: no Ray cluster at {named!r} (Connection refused); check the head's address")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["photos"]


def test_plain_annotate_never_imports_ray(tmp_path: Path):
    make_photos(tmp_path / "photos", 2)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from typer.testing import CliRunner
        from tests.test_pipeline import FakeCaptioner
        import caption_cli.commands.annotate as commands
        from caption_cli.cli import app

        commands.load_captioner = lambda *args, **kwargs: FakeCaptioner()
        result = CliRunner().invoke(app, ["annotate", {str(tmp_path / "photos")!r}, "--db",
                                          {str(tmp_path / "c.db")!r}, "--workers", "0"])
        assert result.exit_code == 0, result.output
        print(sorted(name for name in sys.modules if name == "ray" or name.startswith("ray.")))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ------------------------------------------------------------- on a local Ray


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module (starting one costs seconds)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """13 files in two folders: 10 photos, a text file named .png, a truncated PNG and a dangling link."""
    root = tmp_path / "photos"
    make_photos(root, 11, bad=(3,))
    data = (root / "a" / "p001.png").read_bytes()
    (root / "a" / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "b" / "gone.png").symlink_to(root / "nowhere.png")
    # Different content per photo, so captions differ by more than the colour.
    for index, path in enumerate(sorted(root.rglob("p0*.png"))):
        if path.name != "p003.png":
            pixels = np.random.default_rng(index).integers(0, 255, (24 + index, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)
    return root


def rows(store: Store) -> dict[str, tuple]:
    """Everything stored per file except times and run ids: caption, scores, alternatives, attention."""
    out = {}
    for row in store.iter_images():
        attention = [(word, np.round(weights, 3).tolist()) for word, weights in store.attention(row["id"])]
        alternatives = [(a["rank"], a["caption"], round(a["score"], 5), a["confidence"])
                        for a in store.alternatives(row["id"])]
        score = None if row["score"] is None else round(row["score"], 5)
        out[row["path"]] = (row["status"], row["error"], row["caption"], score, row["confidence"], row["size"],
                            row["mtime"], row["width"], row["height"], row["model_id"], row["content_hash"],
                            alternatives, attention)
    return out


def last_run(store: Store) -> dict:
    return list(store.db.query("select * from runs order by id desc limit 1"))[0]


def options(**overrides) -> AnnotateOptions:
    return AnnotateOptions(**{"batch_size": BATCH, "workers": 0, **overrides})


def test_a_ray_run_stores_the_rows_a_local_run_stores(local_ray, tmp_path: Path, photos: Path, tiny_bundle: Path):
    from caption_cli.captioner import Captioner

    bundle = load_bundle(tiny_bundle)
    with Store(tmp_path / "local.db") as local, Store(tmp_path / "ray.db") as on_ray:
        local_summary = annotate([photos], Captioner(bundle, "cpu"), local, options())
        seen = []
        summary = cluster.annotate([photos], cluster.RemoteCaptioner(bundle, "auto"), on_ray, options(),
                                   argv=["caption-cli", "annotate", "--ray"], on_result=seen.append)

        assert (summary.captioned, summary.skipped, summary.failed) == (10, 0, 3)
        assert (local_summary.captioned, local_summary.failed) == (10, 3)
        assert rows(on_ray) == rows(local)
        assert sorted(str(result.path) for result in seen) == sorted(rows(local))
        errors = {Path(path).name: row[1] for path, row in rows(on_ray).items() if row[0] == "error"}
        assert errors["p003.png"].startswith("not a supported image")
        assert errors["truncated.png"] == "image file is truncated"
        assert "No such file" in errors["gone.png"]
        run = last_run(on_ray)
        assert (run["captioned"], run["skipped"], run["failed"], run["device"], run["model_id"]) == (
            10, 0, 3, "ray:cpu", bundle.model_id)
        assert json.loads(run["argv"]) == ["caption-cli", "annotate", "--ray"] and run["finished_at"]

        again = cluster.annotate([photos], cluster.RemoteCaptioner(bundle), on_ray, options())
        assert (again.captioned, again.skipped, again.failed) == (0, 10, 3)  # failures are tried again


class Interrupt(Exception):
    """Stands for Ctrl-C or a killed driver, part-way through the results."""


def test_an_interrupted_run_resumes_with_only_what_is_missing(local_ray, tmp_path: Path, photos: Path,
                                                               tiny_bundle: Path):
    bundle = load_bundle(tiny_bundle)
    seen = []

    def interrupt_after_five(result):
        seen.append(result)
        if len(seen) == 5:
            raise Interrupt

    with Store(tmp_path / "c.db") as store:
        with pytest.raises(Interrupt):
            cluster.annotate([photos], cluster.RemoteCaptioner(bundle), store, options(),
                             on_result=interrupt_after_five)
        first = last_run(store)
        stored = {path: row for path, row in rows(store).items()}
        done = sum(row[0] == "ok" for row in stored.values())
        assert len(stored) >= 5 and first["finished_at"]  # batches written before the stop are kept
        assert first["captioned"] + first["failed"] == len(stored)  # counted: every row stored, reported or not

        resumed = cluster.annotate([photos], cluster.RemoteCaptioner(bundle), store, options())

        assert resumed.skipped == done
        assert resumed.captioned == 10 - done
        assert resumed.failed == 3
        assert len(rows(store)) == 13  # each file once
        for path, row in stored.items():  # nothing already captioned was captioned again
            if row[0] == "ok":
                assert store.get_image(path)["run_id"] == first["id"]


def crash_once_on_call(marker: Path, call: int) -> type:
    """A CaptionerActor whose process exits (as if killed) on its call-th batch, once per test.

    Defined inside a function, so Ray pickles the class by value into the actor."""

    class CrashOnce(CaptionerActor):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            self.calls = 0

        def __call__(self, batch):
            self.calls += 1
            if self.calls == call and not marker.exists():
                marker.touch()
                os._exit(1)
            return super().__call__(batch)

    return CrashOnce


def test_a_captioner_killed_mid_run_still_stores_every_file_once(local_ray, tmp_path: Path, photos: Path,
                                                                  tiny_bundle: Path):
    bundle = load_bundle(tiny_bundle)
    marker = tmp_path / "crashed"
    with Store(tmp_path / "c.db") as store:
        summary = cluster.annotate([photos], cluster.RemoteCaptioner(bundle), store, options(),
                                   captioner_actor=crash_once_on_call(marker, 2))
        assert marker.exists()  # the actor did die, mid-run
        assert (summary.captioned, summary.failed) == (10, 3)
        stored = rows(store)
        assert len(stored) == 13
        assert PROCESS_DIED not in {row[1] for row in stored.values()}
        assert last_run(store)["captioned"] == 10


def decode_crashing_on(name: str):
    """A decode stage whose process dies whenever its batch holds the file `name`, as a
    photo that crashes the image codec would (defined here, so Ray pickles it by value)."""

    def decode(batch, image_size):
        if any(Path(str(path)).name == name for path in batch["path"]):
            os._exit(1)
        return cluster.decode_batch(batch, image_size)

    return decode


def test_a_file_that_kills_its_decoder_every_time_is_an_error_row_alone(local_ray, tmp_path: Path,
                                                                       tiny_bundle: Path):
    make_photos(tmp_path / "photos", 6)
    bundle = load_bundle(tiny_bundle)
    with Store(tmp_path / "c.db") as store:
        summary = cluster.annotate([tmp_path / "photos"], cluster.RemoteCaptioner(bundle), store, options(),
                                   cluster=ClusterOptions(retries=1), decode_stage=decode_crashing_on("p002.png"))
        stored = rows(store)
        assert (summary.captioned, summary.failed) == (5, 1)
        assert {Path(path).name: row[1] for path, row in stored.items() if row[0] == "error"} == {
            "p002.png": PROCESS_DIED}


def test_cli_annotate_with_ray(local_ray, tmp_path: Path, photos: Path, tiny_bundle: Path, monkeypatch):
    monkeypatch.delenv("CAPTION_CLI_DB", raising=False)
    db = tmp_path / "c.db"
    result = CliRunner().invoke(app, ["annotate", str(photos), "--db", str(db), "--model", str(tiny_bundle),
                                      "--ray", "local", "--batch-size", "4", "--json"], env={"COLUMNS": "400"})
    assert result.exit_code == 1, result.output  # three files failed
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(line["status"] for line in lines) == ["error"] * 3 + ["ok"] * 10
    assert "Captioned 10, reused 0, skipped 0, failed 3" in result.stderr
    assert "on ray:cpu" in result.stderr
    with Store(db) as store:
        assert len(rows(store)) == 13
        assert last_run(store)["device"] == "ray:cpu"


def test_cli_refuses_write_metadata_with_ray(tmp_path: Path, photos: Path):
    result = CliRunner().invoke(app, ["annotate", str(photos), "--db", str(tmp_path / "c.db"), "--ray", "local",
                                      "--write-metadata", "sidecar"])
    assert result.exit_code == 2
    assert "--write-metadata does not run with --ray yet" in result.output
    assert not (tmp_path / "c.db").exists()


def test_a_node_with_another_bundle_at_the_path_is_refused(local_ray, tmp_path: Path, tiny_bundle: Path):
    from types import SimpleNamespace

    make_photos(tmp_path / "photos", 2)
    remote = cluster.RemoteCaptioner(load_bundle(tiny_bundle))
    # The driver's bundle says another model than the one the actors find at that path.
    remote.bundle = SimpleNamespace(path=remote.bundle.path, model_id="other@000000000000",
                                    image_size=remote.bundle.image_size)
    with Store(tmp_path / "c.db") as store:
        with pytest.raises(ClusterError, match="every node must see the same bundle at the same path"):
            cluster.annotate([tmp_path / "photos"], remote, store, options())
        assert list(store.iter_images()) == []
        assert last_run(store)["finished_at"]
