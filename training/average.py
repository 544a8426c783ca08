"""Average the weights of several checkpoints of one run (a cheap ensemble).

Late checkpoints of a cosine-decayed run sit in the same basin; their mean usually
scores a little better than any one of them and costs nothing at inference time.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

import torch


def average_checkpoints(paths: Sequence[Path], out: Path) -> Path:
    """Write a checkpoint whose model weights are the mean of `paths`' (metadata from the last)."""
    if len(paths) < 2:
        raise ValueError("averaging needs at least two checkpoints")
    checkpoints = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    first = checkpoints[0]
    for path, checkpoint in zip(paths[1:], checkpoints[1:]):
        if checkpoint["model_config"] != first["model_config"] or checkpoint["vocab"] != first["vocab"]:
            raise ValueError(f"{path} is from another model (config or vocabulary differs from {paths[0]})")
    merged = dict(checkpoints[-1])
    merged["model"] = {name: torch.stack([c["model"][name].float() for c in checkpoints]).mean(dim=0)
                       .to(first["model"][name].dtype) for name in first["model"]}
    merged["averaged_from"] = [str(p) for p in paths]
    merged.pop("optimizer", None)  # an average has no optimizer state to resume from
    tmp = out.with_suffix(".tmp")
    torch.save(merged, tmp)
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(average_checkpoints(args.checkpoints, args.out))
