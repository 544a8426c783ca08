"""How much CPU time the beam search itself costs per image, with the decoder step made free.

On a GPU the decoder step is cheap and this Python/numpy part can become the limit of
`annotate`, so it is measured on its own: a table-lookup "decoder" with the default
model's sizes (V=2538 words, 9x9 grid) and realistic caption lengths stands in for
decoder.onnx. Prints ms per image for several batch sizes. Not run in CI.

    python benchmarks/search_bench.py [--beam 3] [--images 512]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caption_cli.beam import SearchOptions, beam_search  # noqa: E402

V, L, E, A, H = 2538, 81, 512, 256, 512
START, END, PAD = 1, 2, 0
TABLE_ROWS = 4096


class TableStep:
    """A decoder step that costs almost nothing: rows of a fixed log-prob table.

    The row depends on the previous word and the hidden state, so beams diverge; <end>
    is likely on some rows and not others, so captions end at different lengths.
    """

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        logits = rng.normal(size=(TABLE_ROWS, V)).astype(np.float32) * 2
        logits[:, END] += np.linspace(-6, 4, TABLE_ROWS)[rng.permutation(TABLE_ROWS)]
        self.logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        self.attention = np.full((TABLE_ROWS, L), 1 / L, np.float32)
        self.rows = 0

    def __call__(self, token, hidden, features, keys):
        rows = (token * 7 + hidden[:, 0].astype(np.int64)) % TABLE_ROWS
        self.rows += len(rows)
        return self.logprobs[rows], hidden + 1, self.attention[rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beam", type=int, default=3)
    parser.add_argument("--images", type=int, default=512, help="images searched per batch size")
    args = parser.parse_args()
    options = SearchOptions(beam_size=args.beam, alternatives=args.beam, max_length=21, length_penalty=0.2)
    rng = np.random.default_rng(1)
    print(f"beam {args.beam}, V {V}, grid {L} cells, max_length 21; decoder step = table lookup")
    for batch in (16, 64, 256):
        step = TableStep()
        features, keys = np.zeros((batch, L, E), np.float32), np.zeros((batch, L, A), np.float32)
        hidden = rng.integers(0, 100, (batch, H)).astype(np.float32)
        beam_search(step, features, keys, hidden, options, start_id=START, end_id=END, banned_ids=(PAD,))  # warm-up
        repeats = max(1, args.images // batch)
        step.rows = 0
        started = time.perf_counter()
        for _ in range(repeats):
            beam_search(step, features, keys, hidden, options, start_id=START, end_id=END, banned_ids=(PAD,))
        seconds = time.perf_counter() - started
        per_image = seconds / (repeats * batch)
        print(f"batch {batch:4d}: {per_image * 1000:6.2f} ms/image  ({1 / per_image:7.0f} images/s for the search "
              f"alone; {step.rows / (repeats * batch):.0f} decoder rows per image)")


if __name__ == "__main__":
    main()
