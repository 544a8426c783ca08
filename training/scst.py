"""Self-critical sequence training (Rennie et al. 2017) after the cross-entropy phase.

Starting from a cross-entropy checkpoint, each step samples K captions per image with the
model's one DecoderStep, scores them with CIDEr-D against the image's training references
(document frequencies of the whole training set: training/cider.py) and follows the
policy gradient
    loss = -(r - b) * sum_t log p(w_t)      (the sampled words up to and including <end>)
where the baseline b is the mean reward of the image's OTHER K-1 samples (the "new
self-critical" baseline, Luo 2020: no extra decoding, and an image's advantages sum to 0)
or, as an option, the reward of the image's greedy caption (the paper's).
Words the search never emits (<pad>, <start>, <unk>: caption_cli.beam.never_emitted) are
never sampled, nor <end> first, so the policy trained is the one the runtime searches.

Grids come from the trainer's feature cache; checkpoints (last.pt every epoch, best.pt on
validation CIDEr with the trainer's greedy check) have the trainer's format, so `export`
and `evaluate` take them unchanged. One process: SCST is short, DDP is not supported.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from caption_cli.beam import never_emitted
from training.backbone import spec_for
from training.cider import CiderD
from training.datasets import DataSet
from training.features import FeatureCache, extract_features
from training.model import ModelConfig, ShowAttendTell
from training.train import (Dist, check_same_data, data_fingerprint, device_for, encode_split, epoch_seed,
                            evaluate_greedy, resolve_config, write_checkpoint)
from training.vocab import Vocab

BASELINES = ("mean", "greedy")
METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr")  # what evaluate_greedy scores


@dataclass
class ScstConfig:
    # --- data -----------------------------------------------------------------
    out: str = "runs/scst"  # checkpoints and logs go here; not the cross-entropy run's folder
    cache: str = "cache/features"  # the trainer's backbone feature cache
    # --- self-critical training -----------------------------------------------
    epochs: int = 5
    batch_size: int = 80  # sampled captions per step: batch_size // samples images
    samples: int = 5  # K captions sampled per image
    baseline: str = "mean"  # "mean": of the image's other K-1 samples; "greedy": its greedy caption's reward
    lr: float = 2e-5  # Adam, constant; a small step keeps the language model intact
    grad_clip: float = 5.0
    patience: int = 3  # epochs without a better validation score before stopping
    select_metric: str = "CIDEr"  # or "BLEU-4"
    val_images: int = 0  # 0: all validation images (greedy decoding)
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0: leave torch's default
    limit_steps: int = 0  # stop after this many steps (tests)


def resolve_scst_config(file: Path | None, overrides: dict[str, Any]) -> ScstConfig:
    """Defaults, then a JSON file, then flags (the trainer's rule); bad values are errors."""
    cfg: ScstConfig = resolve_config(file, overrides, kind=ScstConfig, what="SCST")
    if cfg.baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {cfg.baseline!r}")
    if cfg.samples < (2 if cfg.baseline == "mean" else 1):
        raise ValueError(f"the mean-of-samples baseline needs samples >= 2, got {cfg.samples} "
                         "(or use baseline=greedy)")
    if cfg.batch_size < cfg.samples:
        raise ValueError(f"batch_size ({cfg.batch_size}) counts sampled captions per step; "
                         f"it must be at least samples ({cfg.samples})")
    if cfg.lr <= 0:
        raise ValueError(f"lr must be positive, got {cfg.lr}")
    if cfg.select_metric not in METRICS:
        raise ValueError(f"select_metric must be one of {', '.join(METRICS)}, got {cfg.select_metric!r}")
    return cfg


# --- sampling, reward, loss ----------------------------------------------------

def sample_captions(model: ShowAttendTell, grid: torch.Tensor, samples: int, max_steps: int,
                    greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """K captions per image drawn word by word through the model's DecoderStep.

    grid [N, L, D] -> tokens [N*K, T] (image i's samples are rows i*K .. i*K+K-1; a row
    goes on after its <end>, see mask_through_end) and the log-probabilities [N*K, T] of
    the drawn words under the sampling distribution (banned words removed), with their graph.
    greedy: argmax instead of drawing (the greedy baseline; the caller passes samples=1).
    """
    special = model.cfg.special
    banned = torch.tensor(never_emitted(special), device=grid.device)
    features, keys, hidden = model.encoder(grid)  # [N, L, E], [N, L, A], [N, H]
    features, keys, hidden = (x.repeat_interleave(samples, dim=0) for x in (features, keys, hidden))  # [B=N*K, ...]
    token = torch.full((features.shape[0],), special["start"], dtype=torch.long, device=grid.device)  # [B]
    finished = torch.zeros_like(token, dtype=torch.bool)  # [B]
    tokens, logprobs = [], []
    for t in range(max_steps):
        logits, hidden, _ = model.step(token, hidden, features, keys)  # [B, V], [B, H]
        logits = logits.index_fill(1, banned, float("-inf"))
        if t == 0:  # say at least one word, as the search does
            logits = logits.index_fill(1, banned.new_tensor([special["end"]]), float("-inf"))
        logp = F.log_softmax(logits, dim=1)  # [B, V]
        if greedy:
            token = logp.argmax(dim=1)  # [B]
        else:
            token = torch.multinomial(logp.detach().exp(), 1).squeeze(1)  # [B]
        tokens.append(token)
        logprobs.append(logp.gather(1, token.unsqueeze(1)).squeeze(1))  # [B]
        finished = finished | (token == special["end"])
        if bool(finished.all()):
            break
    return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1)  # [B, T], [B, T]


def mask_through_end(tokens: torch.Tensor, end_id: int) -> torch.Tensor:
    """float [B, T]: 1 for each word up to and including the first <end>, 0 after it."""
    is_end = (tokens == end_id).long()  # [B, T]
    ends_before = is_end.cumsum(dim=1) - is_end  # [B, T]: <end>s strictly before t
    return (ends_before == 0).float()


def advantages(rewards: torch.Tensor, baseline_rewards: torch.Tensor | None = None) -> torch.Tensor:
    """r - b [N, K] for rewards [N, K]: b is baseline_rewards [N] (greedy) when given, else the
    mean of the image's other K-1 samples, (sum_j r_j - r_i) / (K - 1)."""
    if baseline_rewards is not None:
        return rewards - baseline_rewards.unsqueeze(1)
    k = rewards.shape[1]
    baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)  # [N, K]
    return rewards - baseline


def scst_loss(logprobs: torch.Tensor, mask: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
    """-(r - b) * sum_t log p(w_t), words after <end> masked out, mean over the B samples.
    logprobs [B, T], mask [B, T], advantage [B] (a constant: no gradient flows into the reward)."""
    return -(advantage.detach() * (logprobs * mask).sum(dim=1)).mean()


def caption_rewards(cider: CiderD, vocab: Vocab, image_ids: Sequence[str], tokens: torch.Tensor) -> torch.Tensor:
    """float32 [B] CIDEr-D of each row of tokens [B, T] (decoded up to <end>) against its image."""
    captions = [vocab.decode(row) for row in tokens.tolist()]
    return torch.from_numpy(cider.score(image_ids, captions)).float()


def scst_step(model: ShowAttendTell, optimizer: torch.optim.Optimizer, grid: torch.Tensor,
              image_ids: Sequence[str], cider: CiderD, vocab: Vocab, cfg: ScstConfig) -> dict[str, float]:
    """One policy-gradient update on N images (grid [N, L, D]); returns the step's numbers."""
    n, k = grid.shape[0], cfg.samples
    max_steps = model.cfg.max_length - 1  # as the search and greedy_decode: words + <end>
    tokens, logprobs = sample_captions(model, grid, k, max_steps)  # [N*K, T], [N*K, T]
    repeated = [image_id for image_id in image_ids for _ in range(k)]
    rewards = caption_rewards(cider, vocab, repeated, tokens).view(n, k)  # [N, K]
    stats: dict[str, float] = {"reward": float(rewards.mean())}
    baseline = None
    if cfg.baseline == "greedy":
        model.eval()  # the test-time caption: no dropout
        with torch.no_grad():
            greedy, _ = sample_captions(model, grid, 1, max_steps, greedy=True)  # [N, T]
        model.train()
        baseline = caption_rewards(cider, vocab, image_ids, greedy)  # [N]
        stats["greedy_reward"] = float(baseline.mean())
    advantage = advantages(rewards, baseline).view(-1).to(logprobs.device)  # [N*K]
    mask = mask_through_end(tokens, model.cfg.special["end"])  # [N*K, T]
    loss = scst_loss(logprobs, mask, advantage)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    stats.update(loss=loss.item(), words=float(mask.sum()))
    return stats


# --- the loop ------------------------------------------------------------------

def _load(path: Path, device: torch.device) -> dict[str, Any]:
    missing = []
    try:
        data = torch.load(path, map_location=device, weights_only=True)  # plain data only, never modules
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"{path}: not a readable training checkpoint ({type(error).__name__})") from None
    if isinstance(data, dict):
        missing = [key for key in ("model", "model_config", "backbone", "vocab") if key not in data]
    if not isinstance(data, dict) or missing:
        raise ValueError(f"{path}: not a training checkpoint (lacks {', '.join(missing) or 'a dict'})")
    return data


def train_scst(dataset: DataSet, cfg: ScstConfig, source: Path, resume: bool = False, log=print,
               dataset_name: str | None = None) -> Path:
    """SCST on dataset's train split from the checkpoint `source`, select on val; returns best.pt's path.

    dataset_name: what the checkpoints record as their data (default: the starting checkpoint's name)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("SCST runs in one process; start it without torchrun")
    out, source = Path(cfg.out), Path(source)
    last, best = out / "last.pt", out / "best.pt"
    if source.resolve() in (last.resolve(), best.resolve()):
        raise ValueError(f"--out {out} holds {source.name}, the checkpoint SCST starts from; "
                         "write the SCST run to another folder")
    device = device_for(Dist())
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    resumed = resume and last.exists()
    checkpoint = _load(last if resumed else source, device)
    if resumed and "scst" not in checkpoint:
        raise ValueError(f"{last} is not an SCST checkpoint; use another --out for SCST")
    model = ShowAttendTell(ModelConfig.from_dict(checkpoint["model_config"])).to(device)
    model.load_state_dict(checkpoint["model"])
    vocab = Vocab(checkpoint["vocab"])
    backbone = dict(checkpoint["backbone"])
    # the checkpoint's own training options, with this stage's under "scst"
    base_config = {k: v for k, v in (checkpoint.get("train_config") or {}).items() if k != "scst"}
    origin = checkpoint["scst"]["source"] if resumed else {
        "checkpoint": str(source), "epoch": checkpoint.get("epoch"), "step": checkpoint.get("step")}

    train_records, val_records = dataset.split("train"), dataset.split("val")
    if not val_records:
        raise ValueError("the data set has no validation split; the reader should hold out part of train")
    spec = spec_for(backbone["name"], backbone.get("image_size"))
    all_ids = [r.image_id for r in train_records + val_records]
    extract_features(dataset.image_root, all_ids, Path(cfg.cache), spec.name, spec.image_size)
    cache = FeatureCache(Path(cfg.cache), spec, sorted(set(all_ids)))
    train_split = encode_split(train_records, cache, vocab, model.cfg.max_length)
    val_split = encode_split(val_records, cache, vocab, model.cfg.max_length)
    started = time.time()
    cider = CiderD(train_split.references)  # document frequencies over ALL training references, once
    log(f"SCST: train {len(train_records)} images, val {len(val_records)}, vocab {len(vocab)}, "
        f"{cfg.samples} samples per image, {cfg.baseline} baseline, on {device} "
        f"(CIDEr-D document frequencies in {time.time() - started:.1f} s)")

    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)  # fresh: the cross-entropy moments do not apply
    state: dict[str, Any] = {"epoch": 0, "step": 0, "best_score": -1.0, "best_epoch": -1, "stale": 0, "history": []}
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = data_fingerprint(train_records, val_records)
    if resumed:
        check_same_data(checkpoint["scst"].get("data"), fingerprint, last)
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = {k: checkpoint[k] for k in state}
        log(f"resumed from {last}: epoch {state['epoch']}, step {state['step']}")
    else:  # the starting point, for comparison (epoch 0 in the history)
        scores = evaluate_greedy(model, val_split, vocab, device, cfg.val_images)
        entry = {"epoch": 0, "step": 0, **{k: round(v, 4) for k, v in scores.items() if isinstance(v, float)}}
        state["history"].append(entry)
        log(json.dumps(entry))
        with open(out / "history.jsonl", "a") as fh:
            fh.write(json.dumps(entry) + "\n")
    # what THIS stage trained on (export writes it to model.json's training), and the data of
    # the checkpoint it started from (a resumed run's checkpoint holds it under scst_from; one
    # written before that field held the start's data as its own)
    source_data = checkpoint.get("dataset") or {}
    if resumed and "scst_from" in source_data:
        source_data = source_data["scst_from"]
    dataset_info = {"name": dataset_name or (source_data or {}).get("name", "custom"), "images": len(train_records),
                    "captions": int(len(train_split.pairs)), "fingerprint": fingerprint,
                    "scst_from": source_data}

    def save(path: Path, scores: dict[str, Any]) -> None:
        write_checkpoint(path, {
            "model": model.state_dict(), "model_config": model.cfg.to_dict(), "backbone": backbone,
            "vocab": list(vocab.tokens), "train_config": {**base_config, "scst": dataclasses.asdict(cfg)},
            "optimizer": optimizer.state_dict(), "dataset": dataset_info,
            "scst": {"source": origin, "data": fingerprint}, **state, "scores": scores})

    images_per_step = max(1, cfg.batch_size // cfg.samples)
    steps_per_epoch = len(train_split.ids) // images_per_step
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_split.ids)} training images cannot fill one step of {images_per_step}")
    model.train()
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[info]}")]
    with Progress(*columns) as progress:
        while state["epoch"] < cfg.epochs:
            epoch = state["epoch"]
            # sampling and dropout draw from a stream fixed by (seed, epoch): a resumed run
            # repeats exactly what an uninterrupted one would have done
            torch.manual_seed(epoch_seed(cfg.seed, epoch, 0))
            order = np.random.default_rng(cfg.seed + epoch).permutation(len(train_split.ids))
            task = progress.add_task(f"SCST epoch {epoch + 1}/{cfg.epochs}", total=steps_per_epoch, info="")
            began, n_samples, reward_sum, steps = time.time(), 0, 0.0, 0
            for first in range(0, steps_per_epoch * images_per_step, images_per_step):
                rows = order[first:first + images_per_step]
                grid = torch.from_numpy(train_split.grids[rows].astype(np.float32)).to(device)  # [N, L, D]
                stats = scst_step(model, optimizer, grid, [train_split.ids[r] for r in rows], cider, vocab, cfg)
                state["step"] += 1
                steps, n_samples = steps + 1, n_samples + len(rows) * cfg.samples
                reward_sum += stats["reward"]
                rate = n_samples / max(1e-6, time.time() - began)
                greedy = f" · greedy {stats['greedy_reward']:.3f}" if "greedy_reward" in stats else ""
                info = f"reward {reward_sum / steps:.3f}{greedy} · {rate:,.1f} samples/s"
                progress.update(task, advance=1, info=info)
                if not progress.console.is_terminal and state["step"] % 100 == 0:
                    log(f"step {state['step']} {info}")  # logs have no bar
                if cfg.limit_steps and state["step"] >= cfg.limit_steps:
                    break
            state["epoch"] += 1
            scores = evaluate_greedy(model, val_split, vocab, device, cfg.val_images)
            score = scores[cfg.select_metric]
            entry = {"epoch": state["epoch"], "step": state["step"], "train_reward": round(reward_sum / max(1, steps), 4),
                     "seconds": round(time.time() - began, 1),
                     **{k: round(v, 4) for k, v in scores.items() if isinstance(v, float)}}
            state["history"].append(entry)
            improved = score > state["best_score"]
            if improved:
                state.update(best_score=score, best_epoch=state["epoch"], stale=0)
            else:
                state["stale"] += 1
            save(last, scores)
            if improved:
                save(best, scores)
            log(json.dumps(entry))
            with open(out / "history.jsonl", "a") as fh:
                fh.write(json.dumps(entry) + "\n")
            if state["stale"] >= cfg.patience or (cfg.limit_steps and state["step"] >= cfg.limit_steps):
                break
    return best
