#!/usr/bin/env bash
# One short GPU check of annotate (under 5 minutes on a 16-core host with one GPU).
#
#   bash benchmarks/gpu_check.sh                      # from the repository root
#   FLICKR8K=/data/flickr8k/images CKPT=runs/best.pt OUT=/tmp/out bash benchmarks/gpu_check.sh
#
# 1. an NVIDIA GPU is there (nvidia-smi), else exit 2;
# 2. installs the [gpu] extra in place of the CPU onnxruntime (SKIP_INSTALL=1 skips it);
# 3. proves the CUDA provider really ran: a Captioner on device cuda, and onnxruntime's
#    own profile of one encoder call must show nodes executed by CUDAExecutionProvider,
#    else exit 3 (onnxruntime falls back to the CPU silently);
# 4. annotate_bench.py on cuda over 224 px and 12 MP copies: annotate images/s (in process
#    and as the whole command), annotate / baseline (with CKPT) and annotate / floor.
# Status: written and tested on a CPU-only machine (it stops at step 1 or 3 there with
# the messages below); it has NOT yet run on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
FLICKR8K=${FLICKR8K:-../shared/data/flickr8k/images}
OUT=${OUT:-$(mktemp -d)}
IMAGES=${IMAGES:-1000}          # files per set
COPIES=${COPIES:-300}           # distinct 224 px / 12 MP copies (made once into the cache, all cores)
CORES=$(nproc)
WORKERS=${WORKERS:-$(( CORES > 1 ? CORES - 1 : 1 ))}   # decode workers: the GPU leaves the cores to decoding
BATCH=${BATCH:-256}             # images per caption() call on a GPU (Captioner.preferred_batch)

say() { printf '%s\n' "$*"; }
fail() { say "gpu_check: $2" >&2; exit "$1"; }

# 1. a GPU
command -v nvidia-smi >/dev/null 2>&1 || [ -n "${FORCE_NO_SMI:-}" ] \
    || fail 2 "no nvidia-smi: this machine has no NVIDIA GPU (or no driver); nothing to check"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
[ -d "$FLICKR8K" ] || fail 2 "$FLICKR8K: no Flickr8k image folder (set FLICKR8K=DIR)"

# 2. the GPU build of onnxruntime (the two wheels must not be installed side by side)
if [ -z "${SKIP_INSTALL:-}" ]; then
    timeout 150 "$PY" -m pip uninstall -y -q onnxruntime >/dev/null 2>&1 || true
    timeout 150 "$PY" -m pip install -q -e '.[gpu]' \
        || fail 2 "pip install -e '.[gpu]' failed (no index or wheel cache reachable?)"
fi

# 3. CUDA really runs
"$PY" - <<'PY' || exit 3
import json, os, sys
import numpy as np
import onnxruntime as ort
from caption_cli.bundle import load_bundle
from caption_cli.captioner import Captioner
from caption_cli.errors import CaptionCliError
from caption_cli.session import session_options

print(f"onnxruntime {ort.__version__}, providers built in: {', '.join(ort.get_available_providers())}")
bundle = load_bundle(None)
try:
    captioner = Captioner(bundle, "cuda")
except CaptionCliError as exc:
    sys.exit(f"gpu_check: the CUDA provider does not start: {exc}")
print(f"Captioner.device = {captioner.device}, providers {captioner.providers}")
options = session_options()
options.enable_profiling = True
options.profile_file_prefix = os.path.join(os.environ.get("OUT", "/tmp"), "gpu_check_profile")
session = ort.InferenceSession(str(bundle.encoder_path), options,
                               providers=[("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"])
pixels = np.zeros((8, bundle.image_size, bundle.image_size, 3), np.uint8)
for _ in range(3):
    session.run(None, {"pixels": pixels})
events = json.load(open(session.end_profiling()))
by_provider = {}
for event in events:
    provider = event.get("args", {}).get("provider")
    if event.get("cat") == "Node" and provider:
        by_provider[provider] = by_provider.get(provider, 0) + 1
print(f"encoder nodes run, by provider: {by_provider}")
if not by_provider.get("CUDAExecutionProvider"):
    sys.exit("gpu_check: no node ran on CUDAExecutionProvider: onnxruntime fell back to the CPU")
captions = captioner.caption(np.repeat(pixels[:1], 4, axis=0))
print(f"CUDA caption of a black image: {captions[0].text!r}")
PY

# 4. the numbers
say "== annotate_bench.py on cuda: $IMAGES files per set, $WORKERS decode workers, batch $BATCH =="
timeout 230 "$PY" benchmarks/annotate_bench.py --device cuda --flickr8k "$FLICKR8K" --images "$IMAGES" \
    --small 224 --big --big-copies "$COPIES" --rss-images 0 --batch-size "$BATCH" --workers "$WORKERS" \
    ${CKPT:+--checkpoint "$CKPT"} --json "$OUT/gpu_bench.json"
"$PY" - "$OUT/gpu_bench.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
assert report["device"] == "cuda", f"the benchmark ran on {report['device']}, not cuda"
for label, s in report["sets"].items():
    line = (f"{label:>6}: annotate {s['annotate']['rate']:.1f} img/s (caption-cli {s['cli']['rate']:.1f}), "
            f"floor {s['floor']:.1f}, annotate / floor {s['annotate']['rate'] / s['floor']:.2f}")
    if "baseline" in s:
        line += f", annotate / baseline {s['annotate']['rate'] / s['baseline']['rate']:.1f}x"
    else:
        line += ", annotate / baseline: give CKPT=the checkpoint the bundle came from"
    print(line)
PY
say "numbers in $OUT/gpu_bench.json"
