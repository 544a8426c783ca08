"""annotate on a Ray cluster: the same walk, resume, decode, Captioner and store, spread over nodes.

The driver (the machine running `caption-cli annotate --ray ...`) walks the roots and
drops what the store already has, exactly as pipeline.annotate does; the files left go
to Ray Data in chunks, each chunk one Dataset:

    from_items(path, size, mtime) -> map_batches(decode_batch)   Ray tasks, any node's CPUs
                                  -> map_batches(CaptionerActor) an actor pool: one
                                         onnxruntime session pair per actor, a GPU each
                                         when the cluster has GPUs
                                  -> iter_batches on the driver -> Store.write_batch

Pixels stay in the cluster's object stores (a decoded block goes to a captioner,
usually on the same node); only CaptionResults (captions, alternatives, attention: a
few KB per file) come back to the driver, one small batch at a time, and each batch is
one store transaction, so the store stays the single writer and a run killed at any
point has lost only the batches in flight, which the next run captions.

Faults are Ray's: a process that dies (a decode task's worker, a captioner actor, a
whole node) is replaced and its batch run again, at most BATCH_RETRIES times; then the
batch's files run again one per batch, and a file that still kills its process is an
error row, as with a local decoder that dies (see _caption_chunk).

`ray` is imported here only, and only when a cluster run starts: `caption-cli annotate`
without --ray never imports it. Paths are the driver's: every node must see the photos
and the bundle at the same paths (a NAS mounted at the same place on each node).
docs/cluster.md has the set-up and what happens when a node dies.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from caption_cli.beam import SearchOptions
from caption_cli.bundle import Bundle, load_bundle
from caption_cli.errors import BundleError, CaptionCliError
from caption_cli.images import DecodedImage, decode
from caption_cli.pipeline import (
    AnnotateOptions,
    FileKey,
    MetadataHandler,
    ResultHandler,
    RunRecorder,
    SkipHandler,
    StoreLike,
    Summary,
    caption_result,
    files_to_caption,
)
from caption_cli.results import Caption, CaptionResult
from caption_cli.stopping import Stopped, stop_signal, stops_held

RAY_HINT = "pip install 'caption-cli[cluster]'"
# onnxruntime threads per captioner actor on a CPU node: each actor reserves one CPU of
# Ray's, and with two threads a node's captioners and decoders together use about its cores.
CPU_CAPTIONER_THREADS = 2


class ClusterError(CaptionCliError):
    """Ray is missing, the cluster cannot be reached, or it cannot run this job."""


@dataclass
class ClusterOptions:
    """How the job is spread; None sizes it from the cluster's resources (see plan)."""

    captioners: int | None = None  # model actors: one per GPU, or one per 2 CPUs without GPUs
    threads: int = CPU_CAPTIONER_THREADS  # onnxruntime threads of a captioner on a CPU
    # Times Ray runs a batch again after the process running it died (a codec crash, out of
    # memory, a node lost). Bounded, so a file that kills every process reading it cannot
    # loop: its batch is given up, and its files run again one per batch (_caption_chunk).
    retries: int = 2
    first_chunk: int = 4096  # files in the first Dataset; the next ones double, up to:
    max_chunk: int = 65536  # so the driver holds at most this many keys (a few MB), whatever the run

    def __post_init__(self) -> None:
        if self.captioners is not None and self.captioners < 1:
            raise ValueError(f"captioners must be at least 1, got {self.captioners}")
        if self.threads < 1 or self.first_chunk < 1 or self.max_chunk < self.first_chunk or self.retries < 0:
            raise ValueError("threads and first_chunk must be at least 1, max_chunk at least first_chunk, "
                             "retries 0 or more")


def require_ray() -> Any:
    """The ray module, or a ClusterError with the one line that installs it."""
    try:
        import ray
        import ray.data  # noqa: F401 - the [data] extra, not only ray core
    except ImportError as exc:
        raise ClusterError(f"--ray needs Ray ({exc.name or 'ray'} is not installed): {RAY_HINT}") from None
    return ray


class RemoteCaptioner:
    """The driver's stand-in for a Captioner (pipeline.CaptionerLike without caption()).

    The bundle is read and verified here, and the search options are checked against
    it, so a bad --model or --alternatives fails before any cluster work; the sessions
    are opened in the captioner actors, from bundle.path, which each node must see.
    device is what the run record says ("ray:cuda" or "ray:cpu") once a run has
    planned; until then the device asked for.
    """

    def __init__(self, bundle: Bundle, device: str = "auto", options: SearchOptions | None = None) -> None:
        self.bundle = bundle
        self.requested_device = device
        self.options = (options or SearchOptions()).resolved(bundle.search_defaults)
        self.device = f"ray:{device}"


def load_remote_captioner(model: Path | None, device: str, beam: int | None = None,
                          alternatives: int | None = None) -> RemoteCaptioner:
    """What commands.annotate.load_captioner builds for --ray (same arguments)."""
    return RemoteCaptioner(load_bundle(model), device, SearchOptions(beam_size=beam, alternatives=alternatives))


# ------------------------------------------------------------------------ connecting


def connect(ray: Any, address: str | None) -> bool:
    """Join (or start) the Ray instance; True when this call started it (so must stop it).

    None or an already initialised ray: use what is there (tests, notebooks). "local":
    a new single-machine instance with this machine's cores. "auto": the running cluster
    RAY_ADDRESS names, or the one `ray start --head` started on this machine. Anything
    else is the head's address (host:port, or ray://host:10001 for Ray Client).
    """
    if ray.is_initialized():
        return False
    if address is None:
        address = "auto"
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": True}
    if address == "local":
        from caption_cli.session import default_threads

        kwargs.update(address="local", num_cpus=default_threads())
    else:
        if address != "auto":
            _check_reachable(address)
        elif os.environ.get("RAY_ADDRESS", "auto") != "auto":
            _check_reachable(os.environ["RAY_ADDRESS"], strict=False)  # other forms are Ray's to read
        kwargs.update(address=address)
    try:
        ray.init(**kwargs)
    except ConnectionError as exc:
        raise ClusterError(
            f"no Ray cluster at {address!r} ({exc}); start one with `ray start --head` "
            "(see docs/cluster.md), or use --ray local to run on this machine alone"
        ) from None
    return True


def _check_reachable(address: str, timeout: float = 5.0, strict: bool = True) -> None:
    """A head address (host:port or ray://host:port) with nothing listening fails in seconds
    here; ray.init itself retries such an address for over 100 s before it gives up.
    strict: any other form is an error (what --ray takes), else it is left alone."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not host or not port.isdigit() or "/" in host:
        if not strict:
            return
        raise ClusterError(f"--ray {address!r}: expected auto, local, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ClusterError(f"no Ray cluster at {address!r} ({exc.strerror or exc}); check the head's address "
                           "and port (`ray status` on the head), or use --ray local to run on this machine alone"
                           ) from None


@contextmanager
def connected(address: str | None) -> Iterator[Any]:
    """The ray module, joined to the instance connect picks, which is stopped at the end if
    this started it. The CLI enters it before it opens the database, so that a cluster that
    cannot be reached leaves no database file behind; annotate then uses this connection."""
    ray = require_ray()
    started = connect(ray, address)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


@dataclass(frozen=True)
class Plan:
    """The job's shape on this cluster."""

    captioners: int  # actors in the pool; decode tasks use the CPUs they leave
    gpus_per_captioner: float  # 0 on a CPU cluster (or with --device cpu)
    device: str  # for the run record: "ray:cuda" or "ray:cpu"


def plan(resources: dict[str, float], device: str, options: ClusterOptions) -> Plan:
    """The captioner pool's size from the cluster's resources (ray.cluster_resources()).

    GPUs (unless device is "cpu"): one captioner per GPU, each also reserving a CPU.
    No GPUs: one captioner per two CPUs (two onnxruntime threads each); on one machine
    that is plain annotate's split of the cores between the model and the decoders.
    Decode tasks take the CPUs left. A fixed pool that does not fit, or leaves no CPU
    to decode on, would wait for resources forever: that is an error here.
    """
    cpus = int(resources.get("CPU", 0))
    gpus = int(resources.get("GPU", 0)) if device != "cpu" else 0
    if device == "cuda" and gpus == 0:
        raise ClusterError("--device cuda, but the Ray cluster has no GPU (start the GPU nodes with "
                           "`ray start ... --num-gpus N`, or leave --device auto)")
    captioners = options.captioners or (gpus if gpus else max(1, cpus // 2))
    if gpus and captioners > gpus:
        raise ClusterError(f"{captioners} captioners need a GPU each, but the Ray cluster has {gpus}")
    if captioners >= cpus:
        raise ClusterError(f"the Ray cluster has {cpus} CPU(s): {captioners} captioner(s) reserve one each, "
                           "and decoding needs at least one more")
    return Plan(captioners, 1.0 if gpus else 0.0, "ray:cuda" if gpus else "ray:cpu")


# ------------------------------------------------------------------- the two stages

# Columns between the stages (Arrow has no None for ints, so missing values are -1 / "").
_NO_SIZE = -1
PROCESS_DIED = (
    "the cluster process decoding or captioning this file died, also when it ran alone "
    "(a crash in the image codec, out of memory, or its node was lost)"
)


def decode_batch(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """The decode stage (Ray tasks on any node): images.decode of each file, as in a local run."""
    decoded = [decode(Path(path), image_size) for path in batch["path"]]
    blank = np.zeros((image_size, image_size, 3), np.uint8)
    return {
        "path": batch["path"],
        "size": batch["size"],
        "mtime": batch["mtime"],
        "width": np.array([_NO_SIZE if d.width is None else d.width for d in decoded], np.int64),
        "height": np.array([_NO_SIZE if d.height is None else d.height for d in decoded], np.int64),
        "error": np.array([d.error or "" for d in decoded], object),
        "content_hash": np.array([d.content_hash or "" for d in decoded], object),
        "pixels": np.stack([blank if d.pixels is None else d.pixels for d in decoded]),
    }


class CaptionerActor:
    """The caption stage (an actor pool): one Captioner, its encoder and decoder sessions
    loaded once per actor, on CUDA when the actor was given a GPU.

    Returns each row's CaptionResult pickled (captions, alternatives and attention arrays
    of any length ride as bytes, not as Arrow columns). An exception from the model is
    not a lost batch: it comes back in "fatal" and ends the run, as it does locally.
    """

    def __init__(self, bundle_path: str, model_id: str, device: str, options: SearchOptions,
                 threads: int | None) -> None:
        from caption_cli.captioner import Captioner

        bundle = load_bundle(bundle_path)
        if bundle.model_id != model_id:
            raise BundleError(f"{bundle_path} on this node is {bundle.model_id}, but the driver's is {model_id}: "
                              "every node must see the same bundle at the same path")
        # the float step on every node, so a mixed CPU/GPU cluster stores one model id
        self.captioner = Captioner(bundle, device, options, threads=threads, cpu_decoder=False)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(batch["path"])
        try:
            results = self.caption(batch)
        except Exception as exc:  # noqa: BLE001 - sent to the driver, which stops the run
            fatal = f"{type(exc).__name__}: {exc} (device {self.captioner.device})"
            return {"result": np.array([b""] * rows, object), "fatal": np.array([fatal] * rows, object)}
        blobs = [pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL) for result in results]
        return {"result": np.array(blobs, object), "fatal": np.array([""] * rows, object)}

    def caption(self, batch: dict[str, np.ndarray]) -> list[CaptionResult]:
        errors = batch["error"]
        good = [index for index, error in enumerate(errors) if not error]
        captions = self.captioner.caption(np.ascontiguousarray(batch["pixels"][good])) if good else []
        if len(captions) != len(good):
            raise RuntimeError(f"the captioner returned {len(captions)} captions for {len(good)} images")
        by_row: dict[int, Caption] = dict(zip(good, captions))
        return [_row_result(batch, index, by_row.get(index)) for index in range(len(errors))]


def _row_result(batch: dict[str, np.ndarray], index: int, caption: Caption | None) -> CaptionResult:
    """pipeline.caption_result of one row of the decode stage's columns."""
    path = Path(str(batch["path"][index]))
    key = FileKey(path, int(batch["size"][index]), float(batch["mtime"][index]))
    width, height = int(batch["width"][index]), int(batch["height"][index])
    decoded = DecodedImage(
        path, None,
        None if width == _NO_SIZE else width,
        None if height == _NO_SIZE else height,
        str(batch["error"][index]) or None,
        str(batch["content_hash"][index]) or None,
    )
    return caption_result(key, decoded, caption)


# ---------------------------------------------------------------------------- the run


def annotate(
    roots: Iterable[Path | str],
    captioner: RemoteCaptioner,
    store: StoreLike,
    options: AnnotateOptions | None = None,
    *,
    address: str | None = None,
    cluster: ClusterOptions | None = None,
    argv: Sequence[str] = (),
    on_result: ResultHandler | None = None,
    on_skip: SkipHandler | None = None,
    metadata_writer: Any | None = None,
    on_metadata: MetadataHandler | None = None,
    captioner_actor: type = CaptionerActor,
    decode_stage: Callable[..., dict] = decode_batch,
) -> Summary:
    """pipeline.annotate, with decoding and the model on a Ray cluster (same rows, same summary).

    address: see connect (None: the initialised instance, else "auto"). The store is
    written here, on the driver, one transaction per batch that comes back. Content
    reuse across runs is not looked up on the cluster (the store is the driver's): a
    copy of a stored photo is captioned again, to the same caption. captioner_actor
    and decode_stage are seams for tests (a CaptionerActor subclass, a decode_batch that
    crash on purpose).
    """
    if metadata_writer is not None:
        raise ClusterError("--write-metadata does not run with --ray yet; run `caption-cli write-metadata` "
                           "after the cluster run (it writes what the run stored)")
    options = options or AnnotateOptions()
    cluster = cluster or ClusterOptions()
    with connected(address) as ray:
        shape = plan(ray.cluster_resources(), captioner.requested_device, cluster)
        captioner.device = shape.device
        stages = (decode_stage, captioner_actor)
        return _run(ray, list(roots), captioner, store, options, cluster, shape, argv, on_result, on_skip, stages)


def _run(ray: Any, roots: list[Path | str], captioner: RemoteCaptioner, store: StoreLike,
         options: AnnotateOptions, cluster: ClusterOptions, shape: Plan, argv: Sequence[str],
         on_result: ResultHandler | None, on_skip: SkipHandler | None, stages: tuple) -> Summary:
    model_id = captioner.bundle.model_id
    run = RunRecorder(store, model_id, shape.device, argv, on_result, on_skip)
    _quiet_ray_data(ray)
    try:
        todo = files_to_caption(roots, store, model_id, options, run)
        for chunk in _chunks(todo, cluster.first_chunk, cluster.max_chunk):
            for results in _caption_chunk(ray, chunk, captioner, options, cluster, shape, stages):
                with stops_held(run.summary):  # a stop waits until the rows are stored and counted
                    store.write_batch(results, model_id, run.run_id)
                    run.results(results)
        run.mark_missing_under(roots, options)
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM/SIGHUP (caption_cli.stopping)
        raise Stopped(stop_signal(interrupt), run.summary) from interrupt
    finally:
        with stops_held(run.summary):
            run.finish()
    return run.summary


def _chunks(keys: Iterator[FileKey], first: int, most: int) -> Iterator[list[FileKey]]:
    """Lists of keys: the first small (captioning starts while the walk goes on), then doubling."""
    size = first
    while chunk := list(islice(keys, size)):
        yield chunk
        size = min(2 * size, most)


def _caption_chunk(ray: Any, chunk: list[FileKey], captioner: RemoteCaptioner, options: AnnotateOptions,
                   cluster: ClusterOptions, shape: Plan, stages: tuple) -> Iterator[list[CaptionResult]]:
    """The CaptionResults of these files, a batch at a time as they come back.

    A batch whose process died cluster.retries + 1 times is given up by Ray Data (the run
    goes on: max_errored_blocks); its files then run again one per batch, so only a
    file that kills its process alone is an error row (PROCESS_DIED), as decode_many
    does locally with a decoder that dies.
    """
    returned: set[str] = set()
    for results in _caption_files(ray, chunk, options.batch_size, captioner, cluster, shape, stages, 4):
        returned.update(str(result.path) for result in results)
        yield results
    lost = [key for key in chunk if str(key.path) not in returned]
    if not lost:
        return
    returned.clear()
    # One file per batch and one batch per actor at a time, so a death takes no other file with it.
    for results in _caption_files(ray, lost, 1, captioner, cluster, shape, stages, 1):
        returned.update(str(result.path) for result in results)
        yield results
    died = [CaptionResult(path=key.path, size=key.size, mtime=key.mtime, status="error", error=PROCESS_DIED)
            for key in lost if str(key.path) not in returned]
    for start in range(0, len(died), options.batch_size):
        yield died[start:start + options.batch_size]


def _caption_files(ray: Any, keys: list[FileKey], batch: int, captioner: RemoteCaptioner, cluster: ClusterOptions,
                   shape: Plan, stages: tuple, in_flight: int) -> Iterator[list[CaptionResult]]:
    """One Dataset over these files: decode tasks, then the captioner actor pool (in_flight
    batches queued per actor, so the next batch is there when one finishes)."""
    decode_stage, captioner_actor = stages
    items = [{"path": str(key.path), "size": key.size, "mtime": key.mtime} for key in keys]
    bundle = captioner.bundle
    on_gpu = bool(shape.gpus_per_captioner)
    # "auto" on a GPU actor: CUDA, or the CPU when CUDA cannot start there (as locally).
    device = captioner.requested_device if on_gpu else "cpu"
    with _dataset_settings(ray):
        dataset = (
            ray.data.from_items(items, override_num_blocks=-(-len(items) // batch))
            .map_batches(decode_stage, fn_kwargs={"image_size": bundle.image_size}, batch_size=batch,
                         batch_format="numpy", num_cpus=1, max_retries=cluster.retries)
            .map_batches(captioner_actor,
                         fn_constructor_args=(str(bundle.path), bundle.model_id, device,
                                              captioner.options, None if on_gpu else cluster.threads),
                         batch_size=batch, batch_format="numpy",
                         compute=ray.data.ActorPoolStrategy(size=shape.captioners,
                                                            max_tasks_in_flight_per_actor=in_flight),
                         num_cpus=1, num_gpus=shape.gpus_per_captioner or None,
                         max_restarts=-1, max_task_retries=cluster.retries)
        )
    del items
    batches = iter(dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1))
    try:
        while True:
            try:
                columns = next(batches)
            except StopIteration:
                return
            except ray.exceptions.RayError as exc:  # e.g. no actor could start (a bundle, a device)
                raise ClusterError(f"the cluster run failed: {_first_line(exc)}") from exc
            fatal = next((message for message in columns["fatal"] if message), None)
            if fatal:
                raise ClusterError(f"the model failed on the cluster: {fatal}")
            yield [pickle.loads(blob) for blob in columns["result"]]
    finally:
        close = getattr(batches, "close", None)
        if close is not None:  # stops the Dataset's execution (an interrupted run)
            close()


def _first_line(exc: BaseException) -> str:
    """The cause of a Ray error in one line (Ray's messages carry the remote traceback)."""
    cause = getattr(exc, "cause", None) or exc
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


@contextmanager
def _dataset_settings(ray: Any) -> Iterator[None]:
    """What a Dataset built inside takes along (it copies the DataContext when built)."""
    context = ray.data.DataContext.get_current()
    errored = context.max_errored_blocks
    context.max_errored_blocks = -1  # a batch given up is not the end of the run (see _caption_chunk)
    try:
        with warnings.catch_warnings():
            # Ray 2.60 deprecates retry settings given as ray_remote_args, but has no other way to give them.
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            yield
    finally:
        context.max_errored_blocks = errored


def _quiet_ray_data(ray: Any) -> None:
    """The CLI prints its own progress and summary: no Ray Data progress bars, nor its
    INFO lines (a banner per Dataset, one per chunk); its warnings and errors still show."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled"
    ray.data.DataContext.get_current().enable_progress_bars = False
