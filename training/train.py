"""Teacher-forced training of the captioner on cached backbone grids.

Runs as a plain process or under `torchrun` (DDP: gloo on CPU, nccl on GPU): every
rank trains on its shard of the captions, rank 0 validates, saves and decides on
early stopping, and the decision is broadcast so all ranks stop together.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from training.datasets import DataSet, Record
from training.features import FeatureCache, extract_features
from training.backbone import spec_for
from training.metrics import score_captions
from training.model import ModelConfig, ShowAttendTell, caption_loss, greedy_decode
from training.vocab import PAD, Vocab


@dataclass
class TrainConfig:
    # --- data -----------------------------------------------------------------
    out: str = "runs/default"  # checkpoints and logs go here
    cache: str = "cache/features"  # backbone feature cache (shared between runs)
    backbone: str = "efficientnet-lite0"
    image_size: int = 0  # 0: the backbone's native size
    min_count: int = 5  # words seen fewer times map to <unk>
    top_k: int = 0  # 0: no cap on vocabulary size
    max_length: int = 22  # tokens incl. <start>/<end>; longer captions are cut
    # --- model ----------------------------------------------------------------
    encoder_dim: int = 512
    attention_dim: int = 512
    hidden_dim: int = 512
    embed_dim: int = 512
    dropout: float = 0.5
    # --- optimisation ---------------------------------------------------------
    epochs: int = 10
    batch_size: int = 80  # captions per step, per process (all captions of batch_size/5 images)
    lr: float = 4e-4
    weight_decay: float = 0.0
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * this
    grad_clip: float = 5.0
    label_smoothing: float = 0.1
    attention_lambda: float = 1.0  # doubly stochastic regularisation weight
    patience: int = 3  # epochs without a better validation score before stopping
    select_metric: str = "CIDEr"  # or "BLEU-4"
    val_images: int = 0  # 0: all validation images (greedy decoding)
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0: leave torch's default
    limit_steps: int = 0  # stop after this many steps (tests)


def resolve_config(file: Path | None, overrides: dict[str, Any], kind: type = TrainConfig,
                   what: str = "training") -> Any:
    """Defaults, then a JSON file, then flags; an unknown key is an error.

    `kind` is the config dataclass (TrainConfig; training.scst passes its ScstConfig)."""
    values: dict[str, Any] = {}
    if file is not None:
        values.update(json.loads(Path(file).read_text()))
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {what} option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return kind(**values)


# --- distributed helpers -------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return Dist()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    return Dist(dist.get_rank(), dist.get_world_size())


def device_for(ctx: Dist) -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


# --- data ----------------------------------------------------------------------

@dataclass
class EncodedSplit:
    """Grids of a split held in memory (float16) plus every caption as ids."""

    ids: list[str]  # image ids, row order of `grids`
    grids: np.ndarray  # float16 [N, L, D]
    pairs: np.ndarray  # int64 [C, 1 + T]: (image row, token ids padded to T)
    references: dict[str, list[str]] = field(default_factory=dict)  # raw captions by image id


def encode_split(records: Sequence[Record], cache: FeatureCache, vocab: Vocab, max_length: int) -> EncodedSplit:
    ids = [r.image_id for r in records]
    rows = []
    for row, record in enumerate(records):
        for caption in record.captions:
            tokens = vocab.encode(caption, max_length - 2)  # words + <start>/<end> fit max_length
            rows.append([row] + tokens + [PAD] * (max_length - len(tokens)))
    return EncodedSplit(ids=ids, grids=cache.get(ids, np.float16),
                        pairs=np.array(rows, dtype=np.int64),
                        references={r.image_id: list(r.captions) for r in records})


def batches(split: EncodedSplit, batch_size: int, epoch: int, seed: int, ctx: Dist) -> Iterator[np.ndarray]:
    """Shuffled batches of about `batch_size` captions holding ALL captions of their images,
    so each image's grid goes through the encoder once per step, not once per caption.
    Each rank takes every world-th batch (the same count on every rank, so DDP never hangs)."""
    rows = split.pairs[:, 0]
    per_image = max(1, round(len(rows) / len(split.ids)))
    images_per_batch = max(1, batch_size // per_image)
    order = np.random.default_rng(seed + epoch).permutation(len(split.ids))
    usable = len(order) // (images_per_batch * ctx.world) * images_per_batch * ctx.world
    starts = np.searchsorted(rows, np.arange(len(split.ids) + 1))  # pairs are grouped by image row
    for first in range(ctx.rank * images_per_batch, usable, images_per_batch * ctx.world):
        chosen = order[first:first + images_per_batch]
        yield np.concatenate([split.pairs[starts[r]:starts[r + 1]] for r in chosen])


def to_tensors(split: EncodedSplit, pairs: np.ndarray,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grid [N, L, D] of the batch's distinct images, tokens [B, T+1], image_index [B]."""
    images, image_index = np.unique(pairs[:, 0], return_inverse=True)
    grid = torch.from_numpy(split.grids[images].astype(np.float32)).to(device)  # [N, L, D]
    tokens = torch.from_numpy(pairs[:, 1:]).to(device)  # [B, T+1]
    length = int((tokens != PAD).sum(dim=1).max())
    return grid, tokens[:, :length], torch.from_numpy(image_index).to(device)  # trim shared padding


# --- resume: the same data -----------------------------------------------------

def data_fingerprint(train_records: Sequence[Record], val_records: Sequence[Record]) -> dict[str, Any]:
    """Which images and captions a run trains and selects on, saved in its checkpoints.

    Images missing from --images are skipped with one warning line, so a resumed run
    whose image folder lost a part (an unmounted disk, a dangling link) would quietly
    go on training on another data set; the fingerprint lets resume refuse instead.
    """
    digest = hashlib.sha256()
    for split, records in (("train", train_records), ("val", val_records)):
        for record in sorted(records, key=lambda r: r.image_id):
            digest.update(json.dumps([split, record.image_id, list(record.captions)]).encode())
    return {"train_images": len(train_records), "val_images": len(val_records), "sha256": digest.hexdigest()}


def check_same_data(saved: dict[str, Any] | None, now: dict[str, Any], checkpoint: Path) -> None:
    """Refuse to resume on other data (checkpoints older than the fingerprint carry none)."""
    if saved and saved["sha256"] != now["sha256"]:
        raise ValueError(
            f"{checkpoint} was trained on other data ({saved['train_images']} train / {saved['val_images']} val "
            f"images then, {now['train_images']} / {now['val_images']} now: images missing from --images, or "
            "another annotations file?); resume with the same data, or start a new run in another --out")


# --- schedule, checkpoints -----------------------------------------------------

def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The torch seed of one epoch on one rank: distinct per rank, repeatable on resume."""
    return (seed * 1_000_003 + epoch) * 1_009 + rank


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(path: Path, model: ShowAttendTell, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    vocab: Vocab, state: dict[str, Any], dataset: dict[str, Any]) -> None:
    """State dicts and plain data only, never pickled modules; written atomically."""
    spec = spec_for(cfg.backbone, cfg.image_size or None)
    checkpoint = {
        "model": model.state_dict(),
        "model_config": model.cfg.to_dict(),
        "backbone": {"name": spec.name, "image_size": spec.image_size},
        "vocab": list(vocab.tokens),
        "train_config": dataclasses.asdict(cfg),
        "optimizer": optimizer.state_dict(),
        "dataset": dataset,
        **state,
    }
    write_checkpoint(path, checkpoint)


def write_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    """torch.save to a temporary file, then rename: a kill never leaves half a checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


# --- the loop ------------------------------------------------------------------

def evaluate_greedy(model: ShowAttendTell, split: EncodedSplit, vocab: Vocab, device: torch.device,
                    limit: int = 0, batch_size: int = 100) -> dict[str, float]:
    """Quick validation scores (greedy, Python-only metrics) used for model selection."""
    model.eval()
    n = len(split.ids) if not limit else min(limit, len(split.ids))
    hyps = {}
    for start in range(0, n, batch_size):
        grid = torch.from_numpy(split.grids[start:min(n, start + batch_size)].astype(np.float32)).to(device)
        for offset, ids in enumerate(greedy_decode(model, grid).tolist()):
            hyps[split.ids[start + offset]] = vocab.decode(ids)
    model.train()
    return score_captions(split.references, hyps, meteor=False, ptb=False)


def train(dataset: DataSet, cfg: TrainConfig, resume: bool = False, log=print,
          dataset_name: str = "custom") -> Path:
    """Train on dataset's train split, select on val; returns the best checkpoint's path."""
    ctx = init_distributed()
    device = device_for(ctx)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    train_records, val_records = dataset.split("train"), dataset.split("val")
    if not val_records:
        raise ValueError("the data set has no validation split; the reader should hold out part of train")
    spec = spec_for(cfg.backbone, cfg.image_size or None)
    all_ids = [r.image_id for r in train_records + val_records]
    if ctx.main:  # one process fills the cache; the others wait at the barrier
        extract_features(dataset.image_root, all_ids, Path(cfg.cache), spec.name, spec.image_size)
    if ctx.world > 1:
        dist.barrier()
    cache = FeatureCache(Path(cfg.cache), spec, sorted(set(all_ids)))

    vocab = Vocab.build((c for r in train_records for c in r.captions), min_count=cfg.min_count,
                        top_k=cfg.top_k or None)
    train_split = encode_split(train_records, cache, vocab, cfg.max_length)
    val_split = encode_split(val_records, cache, vocab, cfg.max_length)
    model_cfg = ModelConfig(vocab_size=len(vocab), feature_dim=spec.channels, grid=spec.grid,
                            encoder_dim=cfg.encoder_dim, attention_dim=cfg.attention_dim,
                            hidden_dim=cfg.hidden_dim, embed_dim=cfg.embed_dim, dropout=cfg.dropout,
                            max_length=cfg.max_length)
    model = ShowAttendTell(model_cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state: dict[str, Any] = {"epoch": 0, "step": 0, "best_score": -1.0, "best_epoch": -1, "stale": 0, "history": []}
    last, best = out / "last.pt", out / "best.pt"
    fingerprint = data_fingerprint(train_records, val_records)
    if resume and last.exists():
        checkpoint = torch.load(last, map_location=device, weights_only=False)
        check_same_data(checkpoint["dataset"].get("fingerprint"), fingerprint, last)
        if tuple(checkpoint["vocab"]) != vocab.tokens:
            raise ValueError(f"{last} was trained with another vocabulary; resume with the same data and options")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = {k: checkpoint[k] for k in state}
        log(f"resumed from {last}: epoch {state['epoch']}, step {state['step']}")
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if ctx.world > 1 else model
    dataset_info = {"name": dataset_name, "images": len(train_records),
                    "captions": int(len(train_split.pairs)), "fingerprint": fingerprint}
    steps_per_epoch = sum(1 for _ in batches(train_split, cfg.batch_size, 0, cfg.seed, ctx))
    total_steps = steps_per_epoch * cfg.epochs
    if ctx.main:
        log(f"train {len(train_records)} images / {len(train_split.pairs)} captions, val {len(val_records)} images, "
            f"vocab {len(vocab)}, grid {spec.grid}, {ctx.world} process(es) on {device}")

    model.train()
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[info]}")]
    with Progress(*columns, disable=not ctx.main) as progress:
        while state["epoch"] < cfg.epochs:
            epoch = state["epoch"]
            # dropout draws from a stream fixed by (seed, epoch, rank), so a resumed run
            # repeats exactly what an uninterrupted one would have done
            torch.manual_seed(epoch_seed(cfg.seed, epoch, ctx.rank))
            task = progress.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=steps_per_epoch, info="")
            started, tokens_seen, loss_sum, loss_n = time.time(), 0, 0.0, 0
            for pairs in batches(train_split, cfg.batch_size, epoch, cfg.seed, ctx):
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(state["step"], total_steps, cfg)
                grid, tokens, image_index = to_tensors(train_split, pairs, device)
                logits, targets, attention = ddp_model(grid, tokens, image_index)
                loss = caption_loss(logits, targets, attention, cfg.attention_lambda, cfg.label_smoothing)
                n_tokens = targets.numel()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # DDP all-reduces gradients here: the ranks' sync point
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                state["step"] += 1
                tokens_seen += int(n_tokens)
                loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
                rate = tokens_seen * ctx.world / max(1e-6, time.time() - started)
                progress.update(task, advance=1, info=f"loss {loss_sum / loss_n:.3f} · {rate:,.0f} tok/s")
                if ctx.main and not progress.console.is_terminal and state["step"] % 100 == 0:
                    log(f"step {state['step']} loss {loss_sum / loss_n:.3f} {rate:,.0f} tok/s")  # logs have no bar
                if cfg.limit_steps and state["step"] >= cfg.limit_steps:
                    break
            state["epoch"] += 1
            stop = torch.zeros(1)
            if ctx.main:
                scores = evaluate_greedy(model, val_split, vocab, device, cfg.val_images)
                score = scores[cfg.select_metric]
                entry = {"epoch": state["epoch"], "step": state["step"], "train_loss": loss_sum / max(1, loss_n),
                         "seconds": round(time.time() - started, 1),
                         **{k: round(v, 4) for k, v in scores.items() if isinstance(v, float)}}
                state["history"].append(entry)
                improved = score > state["best_score"]
                if improved:
                    state.update(best_score=score, best_epoch=state["epoch"], stale=0)
                else:
                    state["stale"] += 1
                save_checkpoint(last, model, optimizer, cfg, vocab, {**state, "scores": scores}, dataset_info)
                if improved:
                    save_checkpoint(best, model, optimizer, cfg, vocab, {**state, "scores": scores}, dataset_info)
                log(json.dumps(entry))
                with open(out / "history.jsonl", "a") as fh:
                    fh.write(json.dumps(entry) + "\n")
                if state["stale"] >= cfg.patience or (cfg.limit_steps and state["step"] >= cfg.limit_steps):
                    stop[0] = 1
            if ctx.world > 1:
                dist.broadcast(stop, src=0)  # every rank leaves the loop together
            if stop.item():
                break
    if ctx.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return best
