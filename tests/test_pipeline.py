"""caption_cli.pipeline: the annotate flow, with a fake captioner (and the tiny bundle end to end)."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caption_cli import pipeline
from caption_cli.pipeline import AnnotateOptions, Summary, annotate
from caption_cli.results import Alternative, Caption, CaptionResult
from caption_cli.stopping import Stopped, signals_stop_like_ctrl_c
from caption_cli.store import DryRunStore, Store

COLOURS = {"red": (220, 30, 30), "green": (30, 220, 30), "blue": (30, 30, 220)}


@dataclass
class FakeBundle:
    name: str = "fake"
    model_id: str = "fake@000000000000"
    image_size: int = 32
    grid: tuple[int, int] = (2, 2)
    meta: dict = field(
        default_factory=lambda: {
            "backbone": "none",
            "search": {"beam_size": 3, "alternatives": 3, "length_penalty": 0.7},
            "scores": {"split": "test", "BLEU-4": 0.25},
            "training": {"dataset": "fake", "images": 0, "config": {"x": 1}},
        }
    )


class FakeCaptioner:
    """Same interface as caption_cli.captioner.Captioner; names each photo's colour.

    The caption depends on the pixels, so a test can tell whether each caption landed
    on the right file. delay (seconds per batch) makes a run slow enough to kill.
    """

    def __init__(self, model_id: str = "fake@000000000000", delay: float = 0.0, fail_after: int | None = None,
                 confidence: float | None = 0.75):
        self.bundle = FakeBundle(model_id=model_id)
        self.confidence = confidence
        self.device = "cpu"
        self.providers = ["CPUExecutionProvider"]
        self.delay = delay
        self.fail_after = fail_after
        self.batches: list[int] = []

    def caption(self, pixels: np.ndarray) -> list[Caption]:
        size = self.bundle.image_size
        assert pixels.dtype == np.uint8 and pixels.shape[1:] == (size, size, 3)
        if self.fail_after is not None and len(self.batches) >= self.fail_after:
            raise RuntimeError("the fake captioner crashed")
        self.batches.append(len(pixels))
        time.sleep(self.delay)
        captions = []
        for image in pixels:
            colour = ("red", "green", "blue")[int(np.argmax(image.reshape(-1, 3).mean(axis=0)))]
            words = ["a", colour, "square"]
            attention = np.full((len(words), *self.bundle.grid), 0.25, np.float32)
            captions.append(
                Caption(
                    text=" ".join(words),
                    score=-0.5,
                    words=words,
                    attention=attention,
                    alternatives=[Alternative(" ".join(words), -0.5, self.confidence),
                                  Alternative(f"a {colour} thing", -0.9, 0.25)],
                    confidence=self.confidence,
                )
            )
        return captions


class StreamingCaptioner(FakeCaptioner):
    """A FakeCaptioner with caption_stream, like the Captioner's: it pulls batch i+1 before
    it hands back batch i's captions (there, batch i+1's encoder runs meanwhile)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.log: list[str] = []

    def caption_stream(self, batches):
        held = None
        for context, pixels in batches:
            self.log.append("pulled")
            if held is not None:
                yield self._answer(*held)
            held = (context, pixels)
        if held is not None:
            yield self._answer(*held)

    def _answer(self, context, pixels):
        self.log.append("answered")
        return context, [] if pixels is None else self.caption(pixels)


def make_photos(root: Path, count: int, bad: tuple[int, ...] = ()) -> dict[Path, str]:
    """count photos named p000.png... in two folders; indexes in bad are text files."""
    expected = {}
    for i in range(count):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"p{i:03d}.png"
        if i in bad:
            path.write_text("not an image")
            expected[path] = "error"
        else:
            colour = list(COLOURS)[i % 3]
            Image.new("RGB", (20 + i, 16), COLOURS[colour]).save(path)
            expected[path] = f"a {colour} square"
    return expected


def stored(store: Store) -> dict[Path, str]:
    return {
        Path(row["path"]): row["caption"] if row["status"] == "ok" else "error"
        for row in store.iter_images()
    }


def options(**overrides) -> AnnotateOptions:
    return AnnotateOptions(**{"batch_size": 4, "workers": 0, **overrides})


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "captions.db") as opened:
        yield opened


def test_annotate_captions_stores_and_reports_every_file(tmp_path: Path, store: Store):
    expected = make_photos(tmp_path / "photos", 11, bad=(4,))
    captioner = FakeCaptioner()
    seen: list[CaptionResult] = []

    summary = annotate([tmp_path / "photos"], captioner, store, options(), on_result=seen.append)

    assert (summary.captioned, summary.skipped, summary.failed) == (10, 0, 1)
    assert not summary.ok
    assert stored(store) == expected
    assert sorted(r.path for r in seen) == sorted(expected)
    assert all(b <= 4 for b in captioner.batches) and sum(captioner.batches) == 10
    bad = store.get_image(tmp_path / "photos" / "b" / "p004.png")
    assert bad["error"].startswith("not a supported image")
    good = store.get_image(tmp_path / "photos" / "a" / "p001.png")
    assert (good["width"], good["height"], good["size"]) == (21, 16, (tmp_path / "photos/a/p001.png").stat().st_size)
    assert [a["caption"] for a in store.alternatives(good["id"])] == ["a green square", "a green thing"]
    run = store.db["runs"].get(good["run_id"])
    assert (run["captioned"], run["failed"], run["device"], run["model_id"]) == (10, 1, "cpu", "fake@000000000000")


def test_a_streaming_captioner_gets_every_batch_and_each_file_its_own_caption(tmp_path: Path, store: Store):
    """Bad files ride along in their batch (one batch is only bad files), the last batch is
    not lost, and each result is stored and reported once, after its captions came back."""
    expected = make_photos(tmp_path / "photos", 14, bad=(4, 8, 9, 10, 11, 12))
    captioner = StreamingCaptioner()
    seen: list[CaptionResult] = []
    summary = annotate([tmp_path / "photos"], captioner, store, options(batch_size=2), on_result=seen.append)
    assert (summary.captioned, summary.failed) == (8, 6)
    assert stored(store) == expected
    assert sorted(r.path for r in seen) == sorted(expected)
    assert sum(captioner.batches) == 8
    assert captioner.log[:3] == ["pulled", "pulled", "answered"]  # it really held a batch back


def test_a_crash_in_a_streaming_captioner_loses_only_unstored_batches(tmp_path: Path, store: Store):
    expected = make_photos(tmp_path, 10)
    with pytest.raises(RuntimeError, match="crashed"):
        annotate([tmp_path], StreamingCaptioner(fail_after=2), store, options(batch_size=3))
    assert len(stored(store)) == 6
    summary = annotate([tmp_path], StreamingCaptioner(), store, options(batch_size=3))
    assert (summary.captioned, summary.skipped) == (4, 6)
    assert stored(store) == expected


def test_annotate_with_worker_processes(tmp_path: Path, store: Store):
    expected = make_photos(tmp_path, 9, bad=(2, 7))
    summary = annotate([tmp_path], FakeCaptioner(), store, options(workers=2, batch_size=3))
    assert (summary.captioned, summary.failed) == (7, 2)
    assert stored(store) == expected


def test_second_run_skips_unchanged_files_and_retries_failures(tmp_path: Path, store: Store):
    expected = make_photos(tmp_path, 6, bad=(5,))
    annotate([tmp_path], FakeCaptioner(), store, options())
    touched = tmp_path / "b" / "p002.png"
    os.utime(touched, (1_000_000, 1_000_000))  # same bytes: looked at again, caption reused
    changed = tmp_path / "b" / "p000.png"
    Image.new("RGB", (20, 16), COLOURS["blue"]).save(changed)  # new bytes: captioned again
    expected[changed] = "a blue square"
    captioner = FakeCaptioner()
    skipped: list[Path] = []

    summary = annotate([tmp_path], captioner, store, options(), on_skip=skipped.append)

    assert (summary.captioned, summary.reused, summary.skipped, summary.failed) == (1, 1, 3, 1)
    assert captioner.batches == [1]
    assert touched not in skipped and changed not in skipped and len(skipped) == 3
    assert store.get_image(touched)["mtime"] == 1_000_000
    assert stored(store) == expected


def test_force_and_a_new_model_caption_again_without_duplicates(tmp_path: Path, store: Store):
    make_photos(tmp_path, 5)
    annotate([tmp_path], FakeCaptioner(), store, options())
    forced = annotate([tmp_path], FakeCaptioner(), store, options(force=True))
    assert (forced.captioned, forced.skipped) == (5, 0)
    new_model = annotate([tmp_path], FakeCaptioner(model_id="fake@111111111111"), store, options())
    assert (new_model.captioned, new_model.skipped) == (5, 0)
    assert store.db.execute("select count(*) from images").fetchone()[0] == 5
    assert store.db.execute("select count(*) from alternatives").fetchone()[0] == 10
    assert store.db.execute("select count(*) from attention").fetchone()[0] == 15
    assert {r["model_id"] for r in store.iter_images()} == {"fake@111111111111"}


def test_crash_mid_run_then_resume_captions_each_image_once(tmp_path: Path, store: Store):
    expected = make_photos(tmp_path, 10)
    with pytest.raises(RuntimeError, match="crashed"):
        annotate([tmp_path], FakeCaptioner(fail_after=2), store, options(batch_size=3))
    assert len(stored(store)) == 6  # the two finished batches are stored, nothing half-done
    run = store.db.execute("select captioned, finished_at from runs").fetchone()
    assert run[0] == 6 and run[1] is not None  # the run is closed even on a crash

    summary = annotate([tmp_path], FakeCaptioner(), store, options(batch_size=3))
    assert (summary.captioned, summary.skipped) == (4, 6)
    assert stored(store) == expected


class StoppedCaptioner(StreamingCaptioner):
    """A streaming captioner that is stopped (Ctrl-C or a stop signal) in its third batch."""

    def __init__(self, stop: KeyboardInterrupt) -> None:
        super().__init__()
        self.stop = stop

    def caption(self, pixels: np.ndarray) -> list[Caption]:
        if len(self.batches) == 2:
            raise self.stop
        return super().caption(pixels)


@pytest.mark.parametrize("stop, signum", [(KeyboardInterrupt(), signal.SIGINT),
                                          (Stopped(signal.SIGTERM), signal.SIGTERM)])
def test_a_stopped_run_says_what_it_stored_closes_its_run_and_resumes(tmp_path: Path, store: Store, stop, signum):
    expected = make_photos(tmp_path, 10)
    with pytest.raises(Stopped) as caught:
        annotate([tmp_path], StoppedCaptioner(stop), store, options(batch_size=3))
    summary = caught.value.summary
    assert caught.value.signum == signum
    assert (summary.captioned, summary.skipped, summary.failed) == (6, 0, 0) and summary.seconds > 0
    assert len(stored(store)) == 6
    assert store.db.execute("select captioned, finished_at is not null from runs").fetchall() == [(6, 1)]

    resumed = annotate([tmp_path], StreamingCaptioner(), store, options(batch_size=3))
    assert (resumed.captioned, resumed.skipped) == (4, 6)
    assert stored(store) == expected


def test_a_stop_during_a_commit_waits_until_the_batch_is_stored_and_counted(tmp_path: Path, store: Store,
                                                                            monkeypatch):
    make_photos(tmp_path, 10)
    commit = store.write_batch
    commits = []

    def write_batch(results, model_id, run_id):
        commits.append(len(results))
        if len(commits) == 2:  # SIGTERM arrives in the middle of the second batch's commit
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs in here, and holds the stop
        commit(results, model_id, run_id)

    monkeypatch.setattr(store, "write_batch", write_batch)
    with signals_stop_like_ctrl_c(), pytest.raises(Stopped) as caught:
        annotate([tmp_path], StreamingCaptioner(), store, options(batch_size=3))
    assert caught.value.signum == signal.SIGTERM and commits == [3, 3]
    assert caught.value.summary.captioned == len(stored(store)) == 6  # what it says is what it stored
    assert store.db.execute("select captioned, finished_at is not null from runs").fetchall() == [(6, 1)]


def test_a_report_that_fails_cannot_leave_the_run_counts_short_of_the_stored_rows(tmp_path: Path, store: Store):
    make_photos(tmp_path, 6)
    reported = []

    def into_a_closed_pipe(result: CaptionResult) -> None:  # `caption-cli annotate --json | head -1`
        reported.append(result)
        if len(reported) == 2:
            raise BrokenPipeError("stdout is gone")

    with pytest.raises(BrokenPipeError):
        annotate([tmp_path], StreamingCaptioner(), store, options(batch_size=3), on_result=into_a_closed_pipe)
    assert len(stored(store)) == 3
    assert store.db.execute("select captioned, finished_at is not null from runs").fetchall() == [(3, 1)]


def test_pipeline_streams_instead_of_listing_everything_first(tmp_path: Path, store: Store, monkeypatch):
    make_photos(tmp_path, 40)
    walked = []
    real_walk = pipeline.walk

    def counting_walk(*args, **kwargs):
        for path in real_walk(*args, **kwargs):
            walked.append(path)
            yield path

    monkeypatch.setattr(pipeline, "walk", counting_walk)
    captioner = FakeCaptioner()
    first_batch_at = []
    real_caption = captioner.caption

    def caption(pixels):
        first_batch_at.append(len(walked))
        return real_caption(pixels)

    captioner.caption = caption
    summary = annotate([tmp_path], captioner, store, options(lookup_size=8))
    assert summary.captioned == 40
    assert first_batch_at[0] <= 8  # captioning starts after one look-up chunk, not the whole walk


def test_walk_errors_are_reported_and_counted_but_not_stored(tmp_path: Path, store: Store, monkeypatch):
    make_photos(tmp_path, 2)

    real_walk = pipeline.walk

    def broken_walk(roots, recursive, include_hidden, on_error):
        on_error(tmp_path / "locked", "cannot list folder: Permission denied")
        yield from real_walk(roots, recursive, include_hidden, on_error)

    monkeypatch.setattr(pipeline, "walk", broken_walk)
    seen = []
    summary = annotate([tmp_path], FakeCaptioner(), store, options(), on_result=seen.append)
    assert (summary.captioned, summary.failed) == (2, 1)
    assert seen[0].path == tmp_path / "locked" and seen[0].error == "cannot list folder: Permission denied"
    assert len(stored(store)) == 2


def test_dry_run_store_writes_nothing(tmp_path: Path):
    make_photos(tmp_path / "photos", 3)
    db = tmp_path / "captions.db"
    with DryRunStore(db) as dry:
        summary = annotate([tmp_path / "photos"], FakeCaptioner(), dry, options())
    assert summary.captioned == 3
    assert not db.exists()


class FakeMetadataWriter:
    def __init__(self, fail: set[str]):
        self.fail = fail
        self.calls = []

    def write(self, requests):
        from caption_cli.metadata import MetadataOutcome

        self.calls.append(requests)
        outcomes = []
        for request in requests:
            if Path(request.path).name in self.fail:
                outcomes.append(MetadataOutcome(request.path, "error", "cannot write"))
            else:
                os.utime(request.path, (2_000_000, 2_000_000))  # in place: the file changed
                outcomes.append(MetadataOutcome(request.path, "written", ""))
        return outcomes


def test_metadata_writer_gets_each_batch_and_resume_still_skips(tmp_path: Path, store: Store):
    pytest.importorskip("caption_cli.metadata")
    make_photos(tmp_path, 5, bad=(1,))
    writer = FakeMetadataWriter(fail={"p003.png"})
    outcomes = []
    summary = annotate(
        [tmp_path], FakeCaptioner(), store, options(batch_size=2),
        metadata_writer=writer, on_metadata=outcomes.append,
    )
    assert (summary.metadata_written, summary.metadata_failed) == (3, 1)
    assert not summary.ok
    requests = [r for call in writer.calls for r in call]
    assert sorted(Path(r.path).name for r in requests) == ["p000.png", "p002.png", "p003.png", "p004.png"]
    assert {r.caption for r in requests} == {"a red square", "a blue square", "a green square"}
    assert all(r.model_name == "fake" and r.size and r.mtime for r in requests)
    assert [o.status for o in outcomes].count("error") == 1
    again = annotate([tmp_path], FakeCaptioner(), store, options())
    assert (again.captioned, again.skipped) == (0, 4)  # the new mtimes were stored


class SignalledMetadataWriter(FakeMetadataWriter):
    """SIGTERM arrives while the first photo of the second batch is being written."""

    def write(self, requests):
        outcomes = super().write(requests)
        if len(self.calls) == 3:  # one call per photo
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs in here, mid-write, and holds the stop
        return outcomes


def test_a_stop_during_metadata_writes_waits_until_the_new_keys_are_stored(tmp_path: Path, store: Store):
    pytest.importorskip("caption_cli.metadata")
    make_photos(tmp_path, 6)
    writer = SignalledMetadataWriter(fail=set())
    with signals_stop_like_ctrl_c(), pytest.raises(Stopped) as caught:
        annotate([tmp_path], FakeCaptioner(), store, options(batch_size=2), metadata_writer=writer)
    summary = caught.value.summary
    assert caught.value.signum == signal.SIGTERM
    assert (summary.captioned, summary.metadata_written) == (4, 3)  # it stopped after the photo in hand
    # the three photos written carry their new mtime in the store: the next run skips them
    again = annotate([tmp_path], FakeCaptioner(), store, options(batch_size=2))
    assert (again.captioned, again.skipped) == (2, 4)


def test_write_metadata_on_a_second_run_writes_the_skipped_files(tmp_path: Path, store: Store):
    """Captioned first, --write-metadata later: the stored captions go into the files;
    a file whose write failed is tried again by the next run."""
    pytest.importorskip("caption_cli.metadata")
    make_photos(tmp_path, 5, bad=(1,))
    first = annotate([tmp_path], FakeCaptioner(), store, options())
    assert (first.captioned, first.failed) == (4, 1)
    stored = {Path(row["path"]).name: row["caption"] for row in store.iter_images(status="ok")}

    writer = FakeMetadataWriter(fail={"p003.png"})
    second = annotate([tmp_path], FakeCaptioner(), store, options(), metadata_writer=writer)
    assert (second.captioned, second.skipped) == (0, 4)
    assert (second.metadata_written, second.metadata_failed) == (3, 1)
    requests = [r for call in writer.calls for r in call]
    assert {Path(r.path).name: r.caption for r in requests} == stored
    assert all(r.model_name == "fake" for r in requests)

    retry = FakeMetadataWriter(fail=set())
    third = annotate([tmp_path], FakeCaptioner(), store, options(), metadata_writer=retry)
    assert third.skipped == 4 and third.metadata_failed == 0 and third.ok is False  # p001 is still a bad file
    assert "p003.png" in {Path(r.path).name for call in retry.calls for r in call}


def test_summary_rate():
    assert Summary(captioned=10, seconds=4.0).images_per_second == 2.5
    assert Summary().images_per_second == 0.0 and Summary().ok


def test_options_are_checked():
    with pytest.raises(ValueError, match="batch_size"):
        AnnotateOptions(batch_size=0)
    with pytest.raises(ValueError, match="workers"):
        AnnotateOptions(workers=-1)


# ------------------------------------------------------------------ the real model


def test_annotate_with_the_tiny_bundle(tmp_path: Path, store: Store, tiny_bundle: Path):
    from caption_cli.bundle import load_bundle
    from caption_cli.captioner import Captioner

    make_photos(tmp_path / "photos", 5, bad=(3,))
    captioner = Captioner(load_bundle(tiny_bundle), device="cpu")
    summary = annotate([tmp_path / "photos"], captioner, store, options(batch_size=2))
    assert (summary.captioned, summary.failed) == (4, 1)
    h, w = captioner.bundle.grid
    for row in store.iter_images(status="ok"):
        assert row["model_id"] == captioner.bundle.model_id
        words = [word for word, _ in store.attention(row["id"])]
        assert " ".join(words) == row["caption"] and words
        for _, grid in store.attention(row["id"]):
            assert grid.shape == (h, w)
        alternatives = store.alternatives(row["id"])
        assert alternatives[0]["caption"] == row["caption"]
        assert [a["rank"] for a in alternatives] == list(range(1, len(alternatives) + 1))
        assert [a["score"] for a in alternatives] == sorted((a["score"] for a in alternatives), reverse=True)


def test_default_workers_leave_the_cpu_model_a_core_and_give_a_gpu_every_core_but_one(monkeypatch):
    monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 16)
    assert (pipeline.default_workers(), pipeline.default_workers("cuda")) == (4, 15)
    monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 2)
    assert (pipeline.default_workers(), pipeline.default_workers("cuda")) == (1, 1)
