"""Does re-annotating a copied folder reuse every caption, and how much faster is it? Prints ratios.

    python benchmarks/reuse_bench.py                      # 1000 Flickr8k photos, the default bundle
    python benchmarks/reuse_bench.py --big --images 300   # 4000x3000 JPEGs (made once, cached)

One run, on a fresh database in a temporary folder:
  (1) annotate FOLDER          the first run: every photo decoded and captioned by the model
  (2) copy FOLDER to COPY      real copies (cp), so every file has a new path, inode and mtime
  (3) annotate COPY            should run no model: every caption is reused by content hash
Prints both times, the ratio (1)/(3) and the model calls in (3). Target: no model call and
>= 20x. Both runs are plain pipeline.annotate calls with the default workers and batch size,
as `caption-cli annotate` runs them (process start-up is not included in either).
Not run by CI: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.annotate_bench import DEFAULT_CACHE, DEFAULT_FLICKR8K, big_copies, source_images  # noqa: E402
from caption_cli.bundle import DEFAULT_BUNDLE_DIR, load_bundle  # noqa: E402
from caption_cli.captioner import Captioner  # noqa: E402
from caption_cli.pipeline import AnnotateOptions, annotate, default_workers  # noqa: E402
from caption_cli.store import Store  # noqa: E402

TARGET_SPEEDUP = 20.0


class CountingCaptioner:
    """The real captioner, counting the images it is asked to caption."""

    def __init__(self, captioner: Captioner) -> None:
        self.inner = captioner
        self.bundle = captioner.bundle
        self.device = captioner.device
        self.images = 0

    def caption(self, pixels):
        self.images += len(pixels)
        return self.inner.caption(pixels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_BUNDLE_DIR)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--big", action="store_true", help="use 4000x3000 JPEG copies instead")
    parser.add_argument("--flickr8k", type=Path, default=DEFAULT_FLICKR8K)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args(argv)

    sources = source_images(args.flickr8k)[: args.images]
    if args.big:
        sources = big_copies(sources, args.cache, len(sources))
    captioner = CountingCaptioner(Captioner(load_bundle(args.model), device="cpu"))
    options = AnnotateOptions(workers=default_workers())
    with tempfile.TemporaryDirectory(prefix="reuse-bench-") as tmp:
        folder, copy = Path(tmp) / "photos", Path(tmp) / "photos copy"
        folder.mkdir()
        for source in sources:
            shutil.copyfile(source, folder / source.name)
        with Store(Path(tmp) / "captions.db") as store:
            started = time.monotonic()
            first = annotate([folder], captioner, store, options)
            first_s = time.monotonic() - started
            model_images_first = captioner.images
            shutil.copytree(folder, copy)
            captioner.images = 0
            started = time.monotonic()
            second = annotate([copy], captioner, store, options)
            second_s = time.monotonic() - started
    speedup = first_s / second_s if second_s > 0 else float("inf")
    label = "4000x3000 JPEG" if args.big else "Flickr8k JPEG"
    print(f"{len(sources)} {label} photos, {options.workers} decode workers, device {captioner.device}")
    print(f"  first run : {first_s:7.2f} s  captioned {first.captioned}, model saw {model_images_first} images")
    print(f"  copy      : {second_s:7.2f} s  reused {second.reused}, captioned {second.captioned},"
          f" model saw {captioner.images} images")
    verdict = "PASS" if captioner.images == 0 and speedup >= TARGET_SPEEDUP and second.reused == len(sources) else "FAIL"
    print(f"  speed-up  : {speedup:7.1f}x  (target >= {TARGET_SPEEDUP:.0f}x, no model call)  {verdict}")


if __name__ == "__main__":
    main()
