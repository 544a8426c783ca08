"""Measure the annotate pipeline's design choices on synthetic photos; prints ratios.

    python benchmarks/annotate_bench.py                     # decode + store only
    python benchmarks/annotate_bench.py --model BUNDLE_DIR  # also end-to-end annotate

What it measures, each against the obvious alternative:
- JPEG draft (DCT scaling) vs a full decode before the resize, per photo;
- decoding in worker processes vs in the main process (images/s);
- one transaction per batch vs one commit per image (rows/s);
- one resume query per chunk of keys vs one query per image;
- with --model: annotate end to end (images/s), cold and resumed.
Not run by CI: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from caption_cli.images import decode, decode_many, to_rgb, walk
from caption_cli.pipeline import AnnotateOptions, annotate, default_workers
from caption_cli.preprocess import model_pixels
from caption_cli.results import Alternative, Caption, CaptionResult
from caption_cli.store import Store


def make_photos(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """Camera-sized JPEGs with smooth gradients plus noise (compress like photos do)."""
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    paths = []
    for i in range(count):
        base = np.stack([xx / w * 255, yy / h * 255, np.full_like(xx, 40.0 * (i % 6))], axis=-1)
        noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"photo{i:04d}.jpg"
        Image.fromarray(noisy).save(path, quality=88)
        paths.append(path)
    return paths


def full_decode(path: Path, size: int) -> np.ndarray:
    """decode() without the JPEG draft: what a naive loader does."""
    with Image.open(path) as image:
        image.load()
        return model_pixels(to_rgb(ImageOps.exif_transpose(image)), size)


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def fake_result(i: int) -> CaptionResult:
    words = "a dog runs on the grass".split()
    caption = Caption(" ".join(words), -0.5, words, np.full((len(words), 7, 7), 1 / 49, np.float32),
                      [Alternative(" ".join(words), -0.5), Alternative("a dog", -0.9), Alternative("a cat", -1.2)])
    return CaptionResult(Path(f"/bench/{i:06d}.jpg"), 1000 + i, 1.0 + i, "ok", 4000, 3000, caption=caption)


def bench_decode(paths: list[Path], size: int, workers: int) -> None:
    n = min(len(paths), 12)
    draft = timed(lambda: [decode(p, size) for p in paths[:n]])
    full = timed(lambda: [full_decode(p, size) for p in paths[:n]])
    print(f"decode, per photo:      draft {draft / n * 1000:7.1f} ms   full {full / n * 1000:7.1f} ms"
          f"   -> draft is {full / draft:4.1f}x faster")
    inline = timed(lambda: list(decode_many(paths, size, workers=0)))
    pooled = timed(lambda: list(decode_many(paths, size, workers=workers)))
    print(f"decode_many, images/s:  in-process {len(paths) / inline:7.1f}"
          f"   {workers} workers {len(paths) / pooled:7.1f}   -> {inline / pooled:4.2f}x (includes starting them)")


def bench_store(folder: Path, rows: int, batch: int) -> None:
    results = [fake_result(i) for i in range(rows)]
    with Store(folder / "batched.db") as store:
        batched = timed(lambda: [store.write_batch(results[i:i + batch], "bench@0", 1)
                                 for i in range(0, rows, batch)])
        keys = [(r.path, r.size, r.mtime) for r in results]
        chunked = timed(lambda: [store.already_done(keys[i:i + 256], "bench@0") for i in range(0, rows, 256)])
        conn = store.db.conn
        single = timed(lambda: [conn.execute(
            "select 1 from images where path = ? and size = ? and mtime = ? and model_id = ? and status = 'ok'",
            (str(p), s, m, "bench@0")).fetchone() for p, s, m in keys])
    with Store(folder / "per-row.db") as store:
        per_row = timed(lambda: [store.write_batch([r], "bench@0", 1) for r in results[: rows // 4]]) * 4
    print(f"store writes, rows/s:   batch of {batch} {rows / batched:9.0f}   commit per row {rows / per_row:9.0f}"
          f"   -> {per_row / batched:5.1f}x")
    print(f"resume look-up, keys/s: chunks of 256 {rows / chunked:9.0f}   query per key {rows / single:9.0f}"
          f"   -> {single / chunked:5.1f}x")


def bench_annotate(folder: Path, model: Path, workers: int, batch: int) -> None:
    from caption_cli.bundle import load_bundle
    from caption_cli.captioner import Captioner

    captioner = Captioner(load_bundle(model), device="auto")
    count = sum(1 for _ in walk([folder]))
    options = AnnotateOptions(batch_size=batch, workers=workers)
    with Store(folder.parent / "annotate.db") as store:
        cold = annotate([folder], captioner, store, options)
        warm = annotate([folder], captioner, store, options)
    print(f"annotate {count} photos on {captioner.device}: {cold.images_per_second:.1f} images/s"
          f" ({cold.seconds:.1f} s); resumed run skipped {warm.skipped} in {warm.seconds:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=48)
    parser.add_argument("--photo-size", type=int, nargs=2, default=(3000, 2000), metavar=("W", "H"))
    parser.add_argument("--size", type=int, default=224, help="model image size")
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", type=Path, help="a bundle folder: also time annotate end to end")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        paths = make_photos(folder, args.photos, tuple(args.photo_size))
        print(f"{len(paths)} JPEGs of {args.photo_size[0]}x{args.photo_size[1]}, model size {args.size}, "
              f"sqlite {sqlite3.sqlite_version}")
        bench_decode(paths, args.size, args.workers)
        bench_store(Path(tmp), args.rows, args.batch_size)
        if args.model:
            bench_annotate(folder, args.model, args.workers, args.batch_size)


if __name__ == "__main__":
    main()
