"""How fast is `annotate`, against a seed-style baseline and against its own floor? Prints ratios.

    python benchmarks/annotate_bench.py --checkpoint CKPT.pt                 # default bundle
    python benchmarks/annotate_bench.py --model BUNDLE --checkpoint CKPT.pt --big --json out.json
    python benchmarks/annotate_bench.py --model BUNDLE --checkpoint CKPT.pt --quick   # smoke test

One run measures, on Flickr8k images (and with --big on 4000x3000 JPEG upscales of them):
  (a) baseline: what the seed repos' caption.py does, one image at a time: full PIL decode and
      resize, eager PyTorch backbone + encoder, a per-image beam search stepping the model's
      decoder in torch. Same weights (the checkpoint the bundle was exported from), same beam.
  (b) annotate: caption_cli.pipeline.annotate with a Captioner on the bundle and a Store in a
      temporary folder, default workers and batch size, as `caption-cli annotate` runs it.
  (c) the floor: decode+resize alone (images.decode_many) and the encoder.onnx session alone on
      batches of decoded pixels: what annotate would reach if the beam search, the store and
      the hand-offs between stages cost nothing. On a CPU also the work ceiling: the beam
      search and the confidence scorer alone on encoded batches (their CPU seconds per image,
      on the threads annotate gives them), added to the floor's work with every core busy:
      what annotate would reach if only the hand-offs cost nothing, so annotate / ceiling says
      how well the stages share the cores and ceiling / floor how far the search's own work
      lets annotate / floor go.
  (d) memory: annotate over a folder of --rss-images (10k) files in a fresh process; its peak
      RSS after --rss-first (1k) files and at the end.
  (e) with --compare-model OLD: annotate with this bundle and with OLD on the same files, in
      turns (--compare-rounds each), so a new model's speed is judged against the one it
      replaces on the same machine in the same run.
Targets (PASS/FAIL): annotate >= 15x the baseline; annotate >= 0.75 x 1/(1/decode + 1/encoder) on
a CPU (decode and encoder share the cores) or >= 0.75 x min(decode, encoder) on a GPU; peak RSS
grows under 50 MB from 1k to 10k images; annotate >= 0.6x the --compare-model bundle.
Not run by CI: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from itertools import cycle, islice
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

from caption_cli.beam import SearchOptions  # noqa: E402
from caption_cli.bundle import DEFAULT_BUNDLE_DIR, load_bundle  # noqa: E402
from caption_cli.captioner import Captioner, search_threads  # noqa: E402
from caption_cli.errors import CaptionCliError  # noqa: E402
from caption_cli.images import decode_many, is_image_name  # noqa: E402
from caption_cli.pipeline import AnnotateOptions, annotate, default_workers  # noqa: E402
from caption_cli.preprocess import model_pixels  # noqa: E402
from caption_cli.session import default_threads, open_session  # noqa: E402
from caption_cli.store import Store  # noqa: E402

DEFAULT_FLICKR8K = REPO.parent / "shared" / "data" / "flickr8k" / "images"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "caption-cli-bench"
BIG_SIZE = (4000, 3000)  # 12 megapixels, a phone camera's frame
BIG_QUALITY = 90
TARGET_BASELINE = 15.0  # annotate / baseline
TARGET_FLOOR_CPU = 0.75  # annotate / (1 / (1/decode + 1/encoder)), each stage at its best setting
TARGET_FLOOR_GPU = 0.75  # annotate / min(decode, encoder)
TARGET_RSS_GROWTH_MB = 50.0
TARGET_VS_PREVIOUS = 0.6  # annotate with this bundle / annotate with --compare-model's
CPUS = os.cpu_count() or 1
ENCODER_SWEEP_BATCHES = (8, 16, 32)
ENCODER_SWEEP_IMAGES = 256  # per setting of the sweep
# defaults of the sizes, for --quick and for a full run
QUICK = {"images": 64, "baseline_images": 8, "rss_images": 1000, "rss_first": 300, "big_copies": 16}
FULL = {"images": 1000, "baseline_images": 50, "rss_images": 10000, "rss_first": 1000, "big_copies": 300}


def say(text: str = "") -> None:
    print(text, flush=True)


# ----------------------------------------------------------------------------- inputs


def source_images(folder: Path) -> list[Path]:
    paths = sorted(p for p in folder.iterdir() if is_image_name(p.name) and not p.name.startswith("."))
    if not paths:
        raise SystemExit(f"{folder}: no images in it (give --flickr8k DIR)")
    return paths


def _upscale(source: Path, target: Path, size: tuple[int, int] = BIG_SIZE) -> None:
    """One resized copy, written under a temporary name so an interrupted run leaves no half file."""
    with Image.open(source) as image:
        big = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    partial = target.with_name(f".{target.name}.part")
    big.save(partial, "JPEG", quality=BIG_QUALITY)
    os.replace(partial, target)


def big_copies(sources: list[Path], cache: Path, count: int, size: tuple[int, int] = BIG_SIZE) -> list[Path]:
    """`count` JPEG q90 copies at `size` (4000x3000 by default) of the first sources, made once into the cache."""
    folder = cache / f"flickr8k-{size[0]}x{size[1]}-q{BIG_QUALITY}"
    folder.mkdir(parents=True, exist_ok=True)
    pairs = [(src, folder / src.name) for src in sources[:count]]
    missing = [(src, dst) for src, dst in pairs if not dst.exists()]
    if missing:
        say(f"making {len(missing)} {size[0]}x{size[1]} copies in {folder} (once) ...")
        # spawn, not fork: this process may already run torch's and onnxruntime's threads
        with ProcessPoolExecutor(os.cpu_count() or 1, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_upscale, *zip(*missing), [size] * len(missing)))
    return [dst for _, dst in pairs]


def distinct_folder(sources: list[Path], count: int, folder: Path) -> list[Path]:
    """`count` distinct files with distinct names, cycling over sources.

    Not symlinks: walk() yields real paths, so links to one file are one file. Hard links
    (real copies across file systems) keep distinct paths, but files that cycle share
    their bytes, which annotate's content reuse would copy instead of captioning: every
    run here passes AnnotateOptions(force=True), which turns skip and reuse off.
    """
    folder.mkdir(parents=True)
    paths = []
    for i, source in enumerate(islice(cycle(sources), count)):
        path = folder / f"{i:06d}_{source.name}"
        try:
            os.link(source.resolve(), path)
        except OSError:  # another file system, or links not allowed
            shutil.copyfile(source, path)
        paths.append(path)
    return paths


def measuring_options(**kwargs: Any) -> AnnotateOptions:
    """Options that make annotate caption every file it is given (see distinct_folder)."""
    return AnnotateOptions(force=True, **kwargs)


# ----------------------------------------------------------------------- (a) baseline


class SeedBaseline:
    """sgrvinod caption.py's `caption_image_beam_search`, driven through our model's step.

    Per image: PIL decode of the whole file and resize (no JPEG draft), eager backbone
    and encoder, then a beam search that keeps k rows, drops finished beams and stops
    when none is left or at max_length; the best finished caption by length-normalised
    score wins. Flat indices are split with // (the seed's `/` breaks on new PyTorch).
    """

    def __init__(self, checkpoint: Path, device: str, beam_size: int, max_length: int,
                 length_penalty: float) -> None:
        import torch

        from export.bundle_writer import load_checkpoint, model_from_checkpoint
        from training.features import PixelsToGrid

        self.torch = torch
        self.device = torch.device(device)
        data = load_checkpoint(checkpoint)
        model, backbone = model_from_checkpoint(data, checkpoint)
        self.model = model.to(self.device)
        self.to_grid = PixelsToGrid(backbone).eval().to(self.device)
        self.size = backbone.spec.image_size
        self.vocab = list(data["vocab"])
        self.special = model.cfg.special
        self.beam_size, self.max_length, self.length_penalty = beam_size, max_length, length_penalty

    def load(self, path: Path) -> np.ndarray:
        with Image.open(path) as image:
            return model_pixels(image.convert("RGB"), self.size)  # full decode, then resize

    def encode(self, pixels: np.ndarray) -> tuple:
        """uint8 [N, S, S, 3] -> features [N, L, E], keys [N, L, A], hidden0 [N, H] (torch)."""
        with self.torch.no_grad():
            grid = self.to_grid(self.torch.tensor(pixels, device=self.device))  # [N, L, D]
            return self.model.encoder(grid)

    def caption(self, path: Path) -> str:
        features, keys, hidden = self.encode(self.load(path)[None])
        with self.torch.no_grad():
            tokens = self._beam_search(features, keys, hidden)
        return " ".join(self.vocab[t] for t in tokens if t != self.special["end"])

    def _beam_search(self, features, keys, hidden) -> list[int]:
        torch, F = self.torch, self.torch.nn.functional
        start, end = self.special["start"], self.special["end"]
        k = self.beam_size
        vocab_size = len(self.vocab)
        features = features.expand(k, -1, -1)  # [k, L, E]
        keys = keys.expand(k, -1, -1)  # [k, L, A]
        hidden = hidden.expand(k, -1)  # [k, H]
        prev = torch.full((k,), start, dtype=torch.long, device=self.device)  # [k]
        seqs = prev[:, None]  # [k, 1]
        top = torch.zeros(k, 1, device=self.device)  # [k, 1] running sums of log-probs
        complete: list[tuple[list[int], float]] = []
        for step in range(self.max_length):
            logits, hidden, _ = self.model.step(prev, hidden, features, keys)  # [k, V], [k, H]
            scores = top + F.log_softmax(logits, dim=1)  # [k, V]
            flat = scores[0] if step == 0 else scores.view(-1)  # at step 0 all k rows are the same
            top_scores, top_ids = flat.topk(k)  # [k]
            beam, word = top_ids // vocab_size, top_ids % vocab_size
            seqs = torch.cat([seqs[beam], word[:, None]], dim=1)  # [k, step + 2]
            ended = word == end
            complete += zip(seqs[ended].tolist(), top_scores[ended].tolist())
            keep = ~ended
            k = int(keep.sum())
            if k == 0:
                break
            seqs, top, prev = seqs[keep], top_scores[keep][:, None], word[keep]
            rows = beam[keep]
            hidden, features, keys = hidden[rows], features[rows], keys[rows]
        if not complete:  # nothing reached <end> within max_length: take the running beams
            complete = list(zip(seqs.tolist(), top[:, 0].tolist()))
        best, _ = max(complete, key=lambda c: c[1] / max(1, len(c[0]) - 1) ** self.length_penalty)
        return best[1:]

    def same_weights(self, captioner: Captioner, pixels: np.ndarray) -> dict[str, float]:
        """Largest differences between this model and the bundle on one image: proves the
        baseline runs the bundle's weights (a mismatch makes every ratio meaningless)."""
        torch = self.torch
        features, keys, hidden0 = self.encode(pixels)  # torch, on self.device
        token = np.full((pixels.shape[0],), self.special["start"], dtype=np.int64)
        with torch.no_grad():
            logits, _, _ = self.model.step(torch.from_numpy(token).to(self.device), hidden0, features, keys)
            ours_step = torch.log_softmax(logits, dim=1).cpu().numpy()  # [N, V]
        theirs = captioner.encode(pixels)  # features, keys, hidden0 (numpy)
        theirs_step = captioner.step(token, theirs[2], theirs[0], theirs[1])[0]  # [N, V]
        return {"features": float(np.abs(features.cpu().numpy() - theirs[0]).max()),
                "hidden0": float(np.abs(hidden0.cpu().numpy() - theirs[2]).max()),
                "logprobs": float(np.abs(ours_step - theirs_step).max())}


def baseline_rate(baseline: SeedBaseline, paths: list[Path]) -> tuple[float, list[str]]:
    """Images/s of the baseline, and its captions (to compare with what annotate stored)."""
    baseline.caption(paths[0])  # warm-up: first-call allocations, lazy initialisation
    started = time.perf_counter()
    captions = [baseline.caption(path) for path in paths]
    if baseline.device.type == "cuda":
        baseline.torch.cuda.synchronize()
    return len(paths) / (time.perf_counter() - started), captions


def same_captions(db: Path, paths: list[Path], captions: list[str]) -> int:
    """How many baseline captions equal annotate's (a check that both did the same work;
    12 MP files may differ a little, as annotate decodes them with JPEG draft scaling)."""
    with Store(db) as store:
        stored = [(store.get_image(path) or {}).get("caption") for path in paths]
    return sum(a == b for a, b in zip(stored, captions))


# -------------------------------------------------------------------------- (c) floor

def encoder_rates(captioner: Captioner, pixels: np.ndarray, total: int) -> list[dict]:
    """The encoder session alone at each batch size and intra-op thread count.

    The floor takes the best of them, not the runtime's setting: a floor measured at the
    runtime's own (slower) chunk size would hide part of annotate's gap.
    """
    threads = [None] if captioner.device == "cuda" else sorted({1, CPUS})
    rows = []
    for count in threads:
        rows += [{"threads": count, "batch": batch, "rate": rate}
                 for batch, rate in encoder_rate(captioner, pixels, total, count, ENCODER_SWEEP_BATCHES).items()]
    return rows


def encoder_rate(captioner: Captioner, pixels: np.ndarray, total: int, threads: int | None,
                 batches: tuple[int, ...]) -> dict[int, float]:
    """Images/s of a fresh encoder session with `threads` at each batch size."""
    (name,), outputs = captioner.bundle.tensor_names("encoder")
    session = open_session(captioner.bundle.encoder_path, captioner.device, threads=threads)
    rates = {batch: model_rate(lambda chunk: session.run(outputs, {name: chunk}), pixels, batch, total)
             for batch in batches if batch <= len(pixels)}
    del session  # its arena holds the largest batch's activations
    return rates


def floor_in_turns(label: str, paths: list[Path], folder: Path, args: argparse.Namespace, captioner: Captioner,
                   first: dict, pixels: np.ndarray, tmp: Path) -> dict:
    """--floor-rounds: decode alone, the encoder alone (each at the setting the sweep chose) and
    annotate, again and again in turns, so that drift in the machine's speed during the run
    hits the floor and annotate alike. `first` holds round 1 (the sweep's best and the profiled
    annotate); the medians over all rounds are what the floor targets use."""
    size = captioner.bundle.image_size
    rounds = {"decode": [first["decode"]], "encoder": [first["encoder"]], "annotate": [first["annotate"]]}
    if first["search"] is not None:
        rounds["search"] = [first["search"]]
    options = measuring_options(batch_size=args.batch_size, workers=args.workers)
    for round_ in range(1, args.floor_rounds):
        rounds["decode"].append(decode_rate(paths, size, first["decode_workers"], keep=1)[0])
        rounds["encoder"].append(encoder_rate(captioner, pixels, min(args.images, ENCODER_SWEEP_IMAGES),
                                              first["threads"], (first["batch"],))[first["batch"]])
        with Store(tmp / f"{label}-floor-{round_}.db") as store:
            rounds["annotate"].append(annotate([folder], captioner, store, options).images_per_second)
        if "search" in rounds:
            rounds["search"].append(search_cpu(captioner, pixels, args.batch_size))
    medians = {part: float(np.median(values)) for part, values in rounds.items()}
    for part, values in rounds.items():
        if part == "search":
            say(f"    (in turns) {part:<13} {medians[part] * 1000:8.2f} ms    CPU per image, median of "
                f"{', '.join(f'{v * 1000:.2f}' for v in values)}")
        else:
            say(f"    (in turns) {part:<13} {medians[part]:8.1f} img/s   median of {', '.join(f'{v:.1f}' for v in values)}")
    return {"rounds": rounds, "medians": medians}




def search_cpu(captioner: Captioner, pixels: np.ndarray, batch: int) -> float:
    """CPU seconds per image of the beam search and the confidence scorer alone, in batches
    of `batch` already encoded, on a Captioner with the threads annotate gives them on a CPU
    (search_threads): the caller's-thread work that the floor leaves out. Process CPU time
    (getrusage), so a search session on two threads counts both."""
    searcher = Captioner(captioner.bundle, "cpu", captioner.options, threads=search_threads(None, overlap=True))
    encoded = [searcher._encode_all(pixels[start:start + batch]) for start in range(0, len(pixels), batch)]
    import resource  # POSIX only, like this part of the benchmark (the CPU parts)

    searcher._search_and_score(encoded[0])  # warm-up: the first run of each row count allocates
    before = resource.getrusage(resource.RUSAGE_SELF)
    for part in encoded:
        searcher._captions(searcher._search_and_score(part))
    after = resource.getrusage(resource.RUSAGE_SELF)
    seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds / len(pixels)


def ceiling_of(decode: float, encoder: float, search_seconds: float, cores: int) -> float:
    """Images/s with every core busy on the measured work and nothing lost between stages.
    Decode and the encoder were measured on all the cores (the caller checks), so each image
    costs cores/rate CPU seconds of each, plus the search's own CPU seconds. The store, the
    walk and the hand-offs between stages are left out (the profile puts the store near 2%),
    so this is an estimate of how far annotate could go, not a bound."""
    return cores / (cores / decode + cores / encoder + search_seconds)


def decode_rate(paths: list[Path], size: int, workers: int, keep: int) -> tuple[float, np.ndarray]:
    """Images/s of decode_many alone, and the first `keep` decoded pixel arrays."""
    kept: list[np.ndarray] = []
    failed = 0
    started = time.perf_counter()
    for decoded in decode_many(paths, size, workers):
        if decoded.error:
            failed += 1
        elif len(kept) < keep:
            kept.append(decoded.pixels)
    seconds = time.perf_counter() - started
    if failed:
        say(f"  warning: {failed} of {len(paths)} files failed to decode")
    return len(paths) / seconds, np.stack(kept)


def model_rate(run, pixels: np.ndarray, batch: int, total: int) -> float:
    """Images/s of `run(batch of pixels)` over `total` images, cycling the decoded pixels."""
    batches = [pixels[i:i + batch] for i in range(0, len(pixels) - batch + 1, batch)] or [pixels]
    run(batches[0])  # warm-up
    done = 0
    started = time.perf_counter()
    for chunk in cycle(batches):
        if done >= total:
            break
        run(chunk)
        done += len(chunk)
    return done / (time.perf_counter() - started)


# ------------------------------------------------------------------------ (b) annotate


class TimedStore:
    """A Store whose batch writes are timed; everything else passes through."""

    def __init__(self, store: Store) -> None:
        self.store, self.seconds = store, 0.0

    def write_batch(self, *args: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        self.store.write_batch(*args, **kwargs)
        self.seconds += time.perf_counter() - started

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def annotate_profiled(folder: Path, captioner: Captioner, options: AnnotateOptions, db: Path) -> dict:
    """annotate() over the folder, with where its wall time went (one run's profile).

    The pipeline hands the captioner a stream of batches (Captioner.caption_stream); the
    time spent in that stream, less the time it spent pulling the next batch (decoding,
    walking), is the captioner's share of the caller's thread."""
    plain_stream = captioner.caption_stream
    spent = {"stream": 0.0, "pulling": 0.0}

    def timed(items: Iterator, key: str) -> Iterator:
        while True:
            started = time.perf_counter()
            try:
                item = next(items)
            except StopIteration:
                return
            finally:
                spent[key] += time.perf_counter() - started
            yield item

    def timed_stream(batches: Iterable) -> Iterator:
        return timed(iter(plain_stream(timed(iter(batches), "pulling"))), "stream")

    captioner.times.reset()
    captioner.caption_stream = timed_stream  # type: ignore[method-assign]
    try:
        with Store(db) as store:
            timed_store = TimedStore(store)
            summary = annotate([folder], captioner, timed_store, options)
    finally:
        del captioner.caption_stream  # the class's method again
    if summary.failed:
        say(f"  warning: annotate failed on {summary.failed} files")
    times, wall = captioner.times, summary.seconds
    in_caption = spent["stream"] - spent["pulling"]
    encoder_inline = times.encoder_wait if captioner.overlap else times.encoder
    profile = {"wall": wall, "encoder": times.encoder, "encoder wait": encoder_inline,
               "decoder steps": times.steps, "python search": times.search - times.steps,
               "confidence scorer": times.scoring,
               "caption other": in_caption - times.search - times.scoring - encoder_inline,
               "store": timed_store.seconds, "decode wait + walk": wall - in_caption - timed_store.seconds,
               "steps_run": times.steps_run, "overlap": captioner.overlap}
    return {"rate": summary.images_per_second, "captioned": summary.captioned, "failed": summary.failed,
            "seconds": wall, "profile": profile}


def say_profile(profile: dict) -> None:
    """Shares of the wall time on the caller's thread; with overlap the encoder runs on its
    own thread, so its share is printed apart (it overlaps the others)."""
    wall = profile["wall"] or 1.0
    inline = ("decode wait + walk", "encoder wait" if profile["overlap"] else "encoder", "decoder steps",
              "python search", "confidence scorer", "caption other", "store")
    shares = ", ".join(f"{name} {profile[name] / wall:.0%}" for name in inline)
    note = f"; encoder on its own thread {profile['encoder'] / wall:.0%}" if profile["overlap"] else ""
    say(f"    profile of that run      {shares} of {wall:.1f} s wall{note}, {profile['steps_run']} decoder calls")


def _cli(folder: Path, args: argparse.Namespace, db: Path) -> float:
    """Wall seconds of `caption-cli annotate FOLDER` in a fresh process (captions everything)."""
    command = [sys.executable, "-m", "caption_cli", "annotate", str(folder), "--db", str(db), "--force",
               "--model", str(args.model), "--device", args.device, "--batch-size", str(args.batch_size),
               "--workers", str(args.workers)] + (["--beam", str(args.beam)] if args.beam else [])
    started = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"caption-cli annotate failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    return seconds


def whole_process(folder: Path, args: argparse.Namespace, db: Path) -> dict:
    files = sum(1 for _ in folder.iterdir())
    seconds = _cli(folder, args, db)
    return {"rate": files / seconds, "seconds": seconds, "files": files}


def time_to_first_caption(path: Path, args: argparse.Namespace, folder: Path) -> float:
    """Seconds from starting `caption-cli annotate` on one file to its exit: imports,
    bundle check, session creation, one decode and one search."""
    folder.mkdir()
    distinct_folder([path], 1, folder / "one")
    return _cli(folder / "one", args, folder / "first.db")




# -------------------------------------------------------------------------- (d) memory


def _status_mb(pid: str, field: str) -> float:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return 0.0


def memory_now() -> dict[str, float]:
    """Peak and current RSS of this process, and the current RSS of its decoder workers (MB)."""
    if not Path("/proc/self/status").exists():  # not Linux: peak only, from getrusage
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"peak_mb": peak / (1 << 20 if sys.platform == "darwin" else 1024), "rss_mb": 0.0, "workers_mb": 0.0}
    children = []
    for task in Path("/proc/self/task").iterdir():
        try:
            children += (task / "children").read_text().split()
        except OSError:
            continue
    return {"peak_mb": _status_mb("self", "VmHWM"), "rss_mb": _status_mb("self", "VmRSS"),
            "workers_mb": sum(_status_mb(pid, "VmRSS") for pid in children)}


def rss_child(spec: dict) -> None:
    """Runs in a fresh process (no torch, nothing from the other parts): annotate the
    folder, sampling memory once `first` files are done and again at the end."""
    captioner = Captioner(load_bundle(spec["model"]), spec["device"], SearchOptions(beam_size=spec["beam"]),
                          overlap=True)  # as caption-cli annotate builds it
    samples: dict[str, Any] = {"workers_max_mb": 0.0}
    done = 0

    def on_result(_result) -> None:
        nonlocal done
        done += 1
        if done in (spec["first"], spec["total"]) or done % 1000 == 0:
            memory = memory_now()
            samples["workers_max_mb"] = max(samples["workers_max_mb"], memory["workers_mb"])
            if done == spec["first"]:
                samples["first"] = {"images": done, **memory}
            if done == spec["total"]:
                samples["last"] = {"images": done, **memory}
            print(f"  rss: {done}/{spec['total']} images, peak {memory['peak_mb']:.0f} MB", file=sys.stderr,
                  flush=True)

    options = measuring_options(batch_size=spec["batch"], workers=spec["workers"])
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "rss.db") as store:
        summary = annotate([spec["folder"]], captioner, store, options, on_result=on_result)
    samples.setdefault("last", {"images": done, **memory_now()})  # fewer files than expected
    samples["rate"] = summary.images_per_second
    samples["failed"] = summary.failed
    print(json.dumps(samples), flush=True)


def rss_run(folder: Path, args: argparse.Namespace, first: int, total: int) -> dict:
    spec = {"folder": str(folder), "model": str(args.model), "device": args.device, "beam": args.beam,
            "batch": args.batch_size, "workers": args.workers, "first": first, "total": total}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--rss-child", json.dumps(spec)],
                          stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the memory run failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------- reporting


@dataclass
class Target:
    name: str
    value: float
    threshold: float
    kind: str  # ">=" or "<"

    @property
    def passed(self) -> bool:
        return self.value >= self.threshold if self.kind == ">=" else self.value < self.threshold

    def line(self, unit: str = "") -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return f"  {self.name:<34} {self.value:8.2f}{unit:<3} (target {self.kind} {self.threshold:g}{unit})  {verdict}"


def floor_of(decode: float, encoder: float, device: str) -> tuple[float, str]:
    if device == "cuda":
        return min(decode, encoder), "min(decode, encoder): GPU encoder runs beside the CPU decoders"
    return 1 / (1 / decode + 1 / encoder), "1/(1/decode + 1/encoder): both share the CPU cores"


def run_set(label: str, sources: list[Path], args: argparse.Namespace, captioner: Captioner,
            baseline: SeedBaseline | None, tmp: Path) -> tuple[dict, list[Target]]:
    """Parts (a), (b), (c) on one image set; prints as it goes."""
    size = captioner.bundle.image_size
    say(f"\n== {label}: {args.images} files (cycling {len(sources)} distinct images) ==")
    paths = distinct_folder(sources, args.images, tmp / label)
    result: dict[str, Any] = {"files": args.images, "distinct": len(sources)}

    decodes = {w: decode_rate(paths, size, w, keep=max(args.batch_size, 256)) for w in sorted({args.workers, CPUS})}
    for workers, (rate, _) in decodes.items():
        say(f"(c) decode + resize only     {rate:8.1f} img/s   images.decode_many, {workers} workers")
    decode_workers, (decode, pixels) = max(decodes.items(), key=lambda item: item[1][0])
    encoders = encoder_rates(captioner, pixels, min(args.images, ENCODER_SWEEP_IMAGES))
    for row in encoders:
        say(f"(c) encoder only             {row['rate']:8.1f} img/s   encoder.onnx on {captioner.device}, "
            f"batch {row['batch']}, {row['threads'] or 'default'} threads")
    best = max(encoders, key=lambda row: row["rate"])
    encoder = best["rate"]
    floor, how = floor_of(decode, encoder, captioner.device)
    say(f"    floor                    {floor:8.1f} img/s   {how}; decode at {decode_workers} workers, "
        f"encoder at batch {best['batch']}, {best['threads'] or 'default'} threads (each at its best)")
    search, cores = None, default_threads()
    all_cores = decode_workers >= cores and (best["threads"] or cores) >= cores
    if captioner.device == "cpu" and not all_cores:
        say(f"    work ceiling             not computed: the best decode ({decode_workers} workers) or encoder "
            f"({best['threads']} threads) setting used fewer than the {cores} cores the formula assumes")
    elif captioner.device == "cpu":
        search = search_cpu(captioner, pixels, args.batch_size)
        ceiling = ceiling_of(decode, encoder, search, cores)
        say(f"(c) search + scorer only     {search * 1000:8.2f} ms    CPU per image, batches of {args.batch_size} "
            f"already encoded, {search_threads(None, overlap=True)} thread(s) as annotate gives them")
        say(f"    work ceiling             {ceiling:8.1f} img/s   {cores}/({cores}/decode + {cores}/encoder + search CPU): "
            f"every core busy, nothing lost between stages; {ceiling / floor:.2f} of the floor")
    model_only = model_rate(captioner.caption, pixels, args.batch_size, min(args.images, len(pixels)))
    say(f"    (info) encoder + beam    {model_only:8.1f} img/s   Captioner.caption on decoded batches")

    options = measuring_options(batch_size=args.batch_size, workers=args.workers)
    annotated = annotate_profiled(tmp / label, captioner, options, tmp / f"{label}.db")
    say(f"(b) annotate                 {annotated['rate']:8.1f} img/s   {annotated['captioned']} captioned, "
        f"{annotated['failed']} failed in {annotated['seconds']:.1f} s (in this process, warm Captioner)")
    say_profile(annotated["profile"])
    annotate_rate = annotated["rate"]
    if args.floor_rounds > 1:
        turns = floor_in_turns(label, paths, tmp / label, args, captioner,
                               {"decode": decode, "encoder": encoder, "annotate": annotated["rate"], "search": search,
                                "decode_workers": decode_workers, "threads": best["threads"], "batch": best["batch"]},
                               pixels, tmp)
        result["floor_in_turns"] = turns
        decode, encoder, annotate_rate = (turns["medians"][part] for part in ("decode", "encoder", "annotate"))
        search = turns["medians"].get("search")
        floor, how = floor_of(decode, encoder, captioner.device)
        say(f"    floor (in turns)         {floor:8.1f} img/s   {how}, from the medians; the targets use it "
            f"and annotate's median")
    if search is not None:
        ceiling = ceiling_of(decode, encoder, search, cores)
        result.update(search_cpu=search, ceiling=ceiling)
        say(f"    annotate / work ceiling  {annotate_rate / ceiling:8.2f}        ceiling {ceiling:.1f} img/s = "
            f"{ceiling / floor:.2f} of the floor (information: the rest is mostly the stages sharing the cores)")
    whole = whole_process(tmp / label, args, tmp / f"{label}-cli.db")
    say(f"(b) caption-cli annotate     {whole['rate']:8.1f} img/s   the whole command: {args.images} files in "
        f"{whole['seconds']:.1f} s, process start and session creation included")
    first = time_to_first_caption(paths[0], args, tmp / f"{label}-first")
    say(f"    time to first caption    {first:8.2f} s       caption-cli annotate on one file, process start to exit")

    result.update(decode=decode, decode_workers=decode_workers, decode_rates={w: r for w, (r, _) in decodes.items()},
                  encoder=encoder, encoder_best=best, encoder_rates=encoders, floor=floor, floor_rule=how,
                  encoder_and_beam=model_only, annotate=annotated, annotate_rate=annotate_rate, cli=whole,
                  time_to_first_caption=first)
    floor_target = TARGET_FLOOR_GPU if captioner.device == "cuda" else TARGET_FLOOR_CPU
    targets = [Target(f"{label}: annotate / floor", annotate_rate / floor, floor_target, ">="),
               Target(f"{label}: caption-cli / floor", whole["rate"] / floor, floor_target, ">=")]
    if baseline is not None:
        count = min(args.baseline_images, len(paths))
        rate, captions = baseline_rate(baseline, paths[:count])
        same = same_captions(tmp / f"{label}.db", paths[:count], captions)
        say(f"(a) seed-style baseline      {rate:8.1f} img/s   {count} images one at a time, "
            f"eager PyTorch on {baseline.device.type}; {same}/{count} captions identical to annotate's")
        result["baseline"] = {"rate": rate, "images": count, "device": baseline.device.type,
                              "same_captions": same}
        targets.insert(0, Target(f"{label}: annotate / baseline", annotated["rate"] / rate, TARGET_BASELINE, ">="))
    else:
        say("(a) seed-style baseline      skipped: give --checkpoint (the checkpoint the bundle came from)")
    if args.compare_model:
        other = Captioner(load_bundle(args.compare_model), args.device, SearchOptions(beam_size=args.beam),
                          overlap=True)
        result["compare"], versus = compare_in_turns(label, tmp / label, args, captioner, other, tmp,
                                                     f"{other.bundle.model_id:<14.14}", "previous bundle")
        result["compare"]["bundle"] = str(args.compare_model)
        targets.append(versus)
    if args.compare_turns:
        turns = Captioner(load_bundle(args.model), args.device, SearchOptions(beam_size=args.beam), overlap=False)
        result["compare_turns"], versus = compare_in_turns(label, tmp / label, args, captioner, turns, tmp,
                                                           "in turns", "")
        say(f"  {label}: annotate / encoder and search in turns   {versus.value:.2f}x   (information)")
    for target in targets:
        say(target.line("x"))
    return result, targets


def compare_in_turns(label: str, folder: Path, args: argparse.Namespace, captioner: Captioner, other: Captioner,
                     tmp: Path, other_name: str, target_name: str) -> tuple[dict, Target]:
    """(e) annotate with this captioner and with `other` (--compare-model's bundle, or
    --compare-turns' captioner without overlap) in turns on the same files: the median of
    each, so drift in the machine's speed during the run hits both alike."""
    options = measuring_options(batch_size=args.batch_size, workers=args.workers)
    rates: dict[str, list[float]] = {"this": [], "other": []}
    for round_ in range(args.compare_rounds):
        for name, which in (("this", captioner), ("other", other)):
            db = tmp / f"{label}-compare-{name}-{round_}.db"
            with Store(db) as store:
                summary = annotate([folder], which, store, options)
            rates[name].append(summary.images_per_second)
    medians = {name: float(np.median(values)) for name, values in rates.items()}
    say(f"(e) annotate, this one       {medians['this']:8.1f} img/s   median of {', '.join(f'{r:.1f}' for r in rates['this'])}")
    say(f"(e) annotate, {other_name:<14.14} {medians['other']:8.1f} img/s   median of "
        f"{', '.join(f'{r:.1f}' for r in rates['other'])} (in turns with this one)")
    result = {"model": other.bundle.model_id, "overlap": other.overlap, "rates": rates, "medians": medians}
    return result, Target(f"{label}: annotate / {target_name}", medians["this"] / medians["other"],
                          TARGET_VS_PREVIOUS, ">=")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model bundle folder (default: the shipped bundle)")
    parser.add_argument("--checkpoint", type=Path, help="training checkpoint the bundle was exported from "
                        "(for the PyTorch baseline; without it the baseline is skipped)")
    parser.add_argument("--images", type=int, help="files for the throughput parts (default 1000; quick 64)")
    parser.add_argument("--baseline-images", type=int, help="images for the slow baseline (default 50; quick 8)")
    parser.add_argument("--rss-images", type=int, help="files for the memory run (default 10000; quick 1000); "
                        "0 skips it")
    parser.add_argument("--rss-first", type=int, help="files after which peak RSS is first sampled "
                        "(default 1000; quick 300); the growth is measured from there to --rss-images")
    parser.add_argument("--big", action="store_true", help="also run on 4000x3000 JPEG q90 copies")
    parser.add_argument("--small", type=int, metavar="PX", help="also run on PXxPX JPEG copies (e.g. 224)")
    parser.add_argument("--big-copies", type=int, help="distinct 12 MP copies to make/reuse (default 300; quick 16)")
    parser.add_argument("--quick", action="store_true", help="a small smoke-test run (64 images, memory 300/1000)")
    parser.add_argument("--compare-model", type=Path, help="another bundle (e.g. the previous default) to "
                        "annotate the same files with, in turns: prints this bundle's rate / that one's")
    parser.add_argument("--floor-rounds", type=int, default=1, help="measure decode alone, the encoder alone "
                        "and annotate this many times in turns and judge the floor targets on the medians "
                        "(1: once each, as before)")
    parser.add_argument("--compare-turns", action="store_true", help="also annotate with the encoder and the "
                        "search taking turns (Captioner(overlap=False): annotate's way on a CPU before 2026-12-06), "
                        "in turns with the default: prints the ratio")
    parser.add_argument("--compare-rounds", type=int, default=3, help="runs of each for --compare-model / "
                        "--compare-turns")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--beam", type=int, help="beam size for annotate and the baseline (default: the bundle's)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="decoder processes (annotate's default)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per model call (annotate's default)")
    parser.add_argument("--flickr8k", type=Path, default=DEFAULT_FLICKR8K, help="folder of Flickr8k JPEGs")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the 12 MP copies are kept")
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        return args
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.rss_images and not 1 <= args.rss_first < args.rss_images:
        args.rss_first = max(1, args.rss_images // 10)
    args.model = args.model or DEFAULT_BUNDLE_DIR
    if not (args.model / "model.json").is_file():
        parser.error(f"--model {args.model}: no model bundle there (model.json missing)")
    if args.compare_model and not (args.compare_model / "model.json").is_file():
        parser.error(f"--compare-model {args.compare_model}: no model bundle there (model.json missing)")
    if args.compare_rounds < 1 or args.floor_rounds < 1:
        parser.error("--compare-rounds and --floor-rounds must be >= 1")
    if args.checkpoint and not args.checkpoint.is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no such file")
    if not args.flickr8k.is_dir():
        parser.error(f"--flickr8k {args.flickr8k}: no such folder")
    if min(args.images, args.baseline_images, args.big_copies) < 1 or args.rss_images < 0 or args.batch_size < 1:
        parser.error("--images, --baseline-images, --big-copies, --batch-size must be >= 1, --rss-images >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.rss_child:
        rss_child(json.loads(args.rss_child))
        return
    bundle = load_bundle(args.model)
    captioner = Captioner(bundle, args.device, SearchOptions(beam_size=args.beam), overlap=True)  # as annotate
    options = captioner.options
    args.beam = options.beam_size
    machine = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
               "processor": platform.processor()}
    say(f"model    {bundle.model_id}  ({args.model})")
    say(f"device   {captioner.device}  providers {', '.join(captioner.providers)}")
    say(f"machine  {machine['cpus']} CPUs, {machine['platform']}; load average "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    say(f"search   beam {options.beam_size}, max_length {options.max_length}, length_penalty "
        f"{options.length_penalty}; annotate batch {args.batch_size}, {args.workers} decoder workers")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "rss_child"}
    report: dict[str, Any] = {"model": bundle.model_id, "bundle": str(args.model), "device": captioner.device,
                              "providers": captioner.providers, "machine": machine, "args": settings, "sets": {}}

    sources = source_images(args.flickr8k)
    baseline = None
    if args.checkpoint:
        import torch

        device = "cuda" if captioner.device == "cuda" and torch.cuda.is_available() else "cpu"
        if captioner.device == "cuda" and device == "cpu":
            say("note     this torch build has no CUDA: the baseline runs on the CPU, the ratio is not like for like")
        baseline = SeedBaseline(args.checkpoint, device, options.beam_size, options.max_length,
                                options.length_penalty)
        probe = baseline.load(sources[0])[None]
        diffs = baseline.same_weights(captioner, probe)
        same = diffs["logprobs"] < 1e-2 and diffs["features"] < 1e-2
        say(f"weights  checkpoint vs bundle, max |diff|: features {diffs['features']:.1e}, hidden0 "
            f"{diffs['hidden0']:.1e}, step log-probs {diffs['logprobs']:.1e}  "
            f"{'same' if same else 'DIFFERENT: the bundle was not exported from this checkpoint'}")
        report["weights_diff"] = diffs

    targets: list[Target] = []
    with tempfile.TemporaryDirectory(prefix="annotate-bench-") as tmp_name:
        tmp = Path(tmp_name)
        sets = [("flickr8k-224", sources)]
        if args.small:
            sets.append((f"{args.small}px", big_copies(sources, args.cache, args.big_copies, (args.small, args.small))))
        if args.big:
            sets.append(("12mp", big_copies(sources, args.cache, args.big_copies)))
        for label, images in sets:
            result, found = run_set(label, images, args, captioner, baseline, tmp)
            report["sets"][label] = result
            targets += found

        if args.rss_images:
            say(f"\n== (d) memory: annotate over {args.rss_images} files in a fresh process ==")
            folder = tmp / "rss"
            distinct_folder(sources, args.rss_images, folder)
            memory = rss_run(folder, args, args.rss_first, args.rss_images)
            last = memory["last"]
            first = memory.get("first", last)  # absent only if fewer files than --rss-first were captioned
            for sample in (first, last):
                say(f"after {sample['images']:>6} images: peak RSS {sample['peak_mb']:7.1f} MB, "
                    f"now {sample['rss_mb']:7.1f} MB")
            say(f"child processes (decoder workers), largest sampled total: {memory['workers_max_mb']:.1f} MB; "
                f"annotate rate in that run: {memory['rate']:.1f} img/s, {memory['failed']} failed")
            report["rss"] = memory
            growth = Target(f"peak RSS growth {first['images']} -> {last['images']}",
                            last["peak_mb"] - first["peak_mb"], TARGET_RSS_GROWTH_MB, "<")
            say(growth.line(" MB"))
            targets.append(growth)

    passed = sum(t.passed for t in targets)
    say(f"\n== targets: {passed}/{len(targets)} PASS ==")
    for target in targets:
        say(target.line(" MB" if target.kind == "<" else "x"))
    report["targets"] = [{**asdict(t), "passed": t.passed} for t in targets]
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        say(f"numbers written to {args.json}")


if __name__ == "__main__":
    try:
        main()
    except CaptionCliError as exc:  # a bad bundle or checkpoint, a device that cannot start
        raise SystemExit(f"error: {exc}") from None
