"""Is `annotate --ray local` as fast as plain annotate on one machine? Prints both and the ratio.

    python benchmarks/ray_bench.py                         # 1000 Flickr8k photos, the default bundle
    python benchmarks/ray_bench.py --images 300 --repeats 3
    python benchmarks/ray_bench.py --big --images 200      # 4000x3000 JPEGs (made once, cached)

Each repeat runs the same files twice, each time into a fresh database:
  (plain) pipeline.annotate with a Captioner in this process, the default decode workers
          and batch size, as `caption-cli annotate DIR` runs them
  (ray)   cluster.annotate on a local Ray instance started once beforehand (as
          `caption-cli annotate DIR --ray local` starts one), with the same batch size
The order alternates between repeats, so a neighbour's load on shared cores falls on both.
Rates are files per second of Summary.seconds (walk to the last stored batch): plain
includes starting its decode workers, ray its actors and its decode tasks (the model
loads in the actors). ray.init is printed apart: it is paid once per command, not per file.
Target: median ray / plain >= 0.8. The two databases must hold the same captions (checked).
Not run by CI: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.annotate_bench import DEFAULT_CACHE, DEFAULT_FLICKR8K, big_copies, source_images  # noqa: E402
from caption_cli import cluster  # noqa: E402
from caption_cli.bundle import DEFAULT_BUNDLE_DIR, load_bundle  # noqa: E402
from caption_cli.captioner import Captioner  # noqa: E402
from caption_cli.pipeline import AnnotateOptions, annotate, default_workers  # noqa: E402
from caption_cli.store import Store  # noqa: E402

TARGET_RATIO = 0.8


def captions(db: Path) -> dict[str, str | None]:
    with Store(db) as store:
        return {row["path"]: row["caption"] for row in store.iter_images()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_BUNDLE_DIR)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--big", action="store_true", help="use 4000x3000 JPEG copies instead")
    parser.add_argument("--flickr8k", type=Path, default=DEFAULT_FLICKR8K)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args(argv)

    ray = cluster.require_ray()
    sources = source_images(args.flickr8k)[: args.images]
    if args.big:
        sources = big_copies(sources, args.cache, len(sources))
    bundle = load_bundle(args.model)
    options = AnnotateOptions(batch_size=args.batch_size, workers=default_workers())
    print(f"model {bundle.model_id}, {len(sources)} files, batch {args.batch_size}, "
          f"plain: {options.workers} decode worker(s), cpus {os.cpu_count()}, load {os.getloadavg()[0]:.2f}")

    started = time.monotonic()
    cluster.connect(ray, "local")
    init_s = time.monotonic() - started
    shape = cluster.plan(ray.cluster_resources(), "auto", cluster.ClusterOptions())
    print(f"ray.init (local) {init_s:.1f} s; {shape.captioners} captioner actor(s), device {shape.device}")

    rates: dict[str, list[float]] = {"plain": [], "ray": []}
    with tempfile.TemporaryDirectory(prefix="ray-bench-") as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for source in sources:
            (folder / source.name).symlink_to(source)
        for repeat in range(args.repeats):
            order = ("plain", "ray") if repeat % 2 == 0 else ("ray", "plain")
            dbs = {}
            for kind in order:
                dbs[kind] = Path(tmp) / f"{kind}-{repeat}.db"
                with Store(dbs[kind]) as store:
                    if kind == "plain":
                        captioner = Captioner(bundle, device="auto")
                        summary = annotate([folder], captioner, store, options)
                        captioner.close()
                    else:
                        summary = cluster.annotate([folder], cluster.RemoteCaptioner(bundle), store, options)
                done = summary.captioned + summary.failed
                rates[kind].append(done / summary.seconds)
                print(f"  repeat {repeat + 1} {kind:>5}: {done} files in {summary.seconds:.1f} s = "
                      f"{rates[kind][-1]:.1f} files/s (failed {summary.failed})")
            same = captions(dbs["plain"]) == captions(dbs["ray"])
            print(f"  repeat {repeat + 1} captions: {'same' if same else 'DIFFERENT'} in both databases")
    ray.shutdown()

    plain, on_ray = statistics.median(rates["plain"]), statistics.median(rates["ray"])
    ratio = on_ray / plain
    verdict = "ok" if ratio >= TARGET_RATIO else "BELOW TARGET"
    print(f"plain annotate     {plain:.1f} files/s (median of {args.repeats})")
    print(f"annotate --ray     {on_ray:.1f} files/s (median of {args.repeats})")
    print(f"ratio ray / plain  {ratio:.2f} (target >= {TARGET_RATIO}: {verdict})")


if __name__ == "__main__":
    main()
