"""Show, Attend and Tell (Xu et al. 2015), soft attention, over a cached backbone grid.

Reads top to bottom: the config, the three small parts (Encoder, Attention,
DecoderStep), then the assembled Captioner. Dimension names used in shape comments:
    B batch, L grid cells (h*w), D backbone channels, E encoder dim, A attention dim,
    H hidden dim, W word-embedding dim, V vocabulary, T caption steps.
The decoder has ONE step method; teacher-forced training, the reference search and
the ONNX export all call it, so they cannot drift apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    vocab_size: int  # V
    feature_dim: int = 1280  # D: backbone channels per grid cell
    grid: tuple[int, int] = (7, 7)  # (h, w); L = h * w
    encoder_dim: int = 512  # E
    attention_dim: int = 512  # A
    hidden_dim: int = 512  # H
    embed_dim: int = 512  # W
    dropout: float = 0.5
    max_length: int = 22  # tokens incl. <start>/<end> seen in training; search limit
    special: dict[str, int] = field(default_factory=lambda: {"pad": 0, "start": 1, "end": 2, "unk": 3})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        data = dict(data)
        data["grid"] = tuple(data["grid"])
        return cls(**data)


class Encoder(nn.Module):
    """Projects each grid cell into E dims and precomputes what every step reuses."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.project = nn.Linear(cfg.feature_dim, cfg.encoder_dim)
        self.norm = nn.LayerNorm(cfg.encoder_dim)
        self.dropout = nn.Dropout(cfg.dropout * 0.5)
        self.key = nn.Linear(cfg.encoder_dim, cfg.attention_dim)
        self.init_hidden = nn.Linear(cfg.encoder_dim, cfg.hidden_dim)

    def forward(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.dropout(F.relu(self.norm(self.project(grid))))  # [B, L, E]
        keys = self.key(features)  # [B, L, A]: attention's feature projection, once per image
        hidden0 = torch.tanh(self.init_hidden(features.mean(dim=1)))  # [B, H] from the mean annotation
        return features, keys, hidden0


class Attention(nn.Module):
    """Bahdanau (additive) attention: alpha = softmax(v . tanh(keys + W h))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.query = nn.Linear(cfg.hidden_dim, cfg.attention_dim)
        self.score = nn.Linear(cfg.attention_dim, 1)

    def forward(self, features: torch.Tensor, keys: torch.Tensor,
                hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        energy = torch.tanh(keys + self.query(hidden).unsqueeze(1))  # [B, L, A]
        alpha = torch.softmax(self.score(energy).squeeze(2), dim=1)  # [B, L]
        context = (alpha.unsqueeze(2) * features).sum(dim=1)  # [B, E]
        return context, alpha


class DecoderStep(nn.Module):
    """One word: attend, gate the context, update the GRU, score the next word."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.attention = Attention(cfg)
        self.gate = nn.Linear(cfg.hidden_dim, cfg.encoder_dim)  # beta: how much the image matters now
        self.gru = nn.GRUCell(cfg.embed_dim + cfg.encoder_dim, cfg.hidden_dim)
        # deep output layer: L_o(E y_{t-1} + L_h h_t + L_z z_t)
        self.out_hidden = nn.Linear(cfg.hidden_dim, cfg.embed_dim)
        self.out_context = nn.Linear(cfg.encoder_dim, cfg.embed_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(cfg.embed_dim, cfg.vocab_size)

    def forward(self, token: torch.Tensor, hidden: torch.Tensor, features: torch.Tensor,
                keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        word = self.embed(token)  # [B, W]
        context, alpha = self.attention(features, keys, hidden)  # [B, E], [B, L]
        context = torch.sigmoid(self.gate(hidden)) * context  # [B, E]
        hidden = self.gru(torch.cat([self.dropout(word), context], dim=1), hidden)  # [B, H]
        deep = word + self.out_hidden(hidden) + self.out_context(context)  # [B, W]
        logits = self.out(self.dropout(torch.tanh(deep)))  # [B, V]
        return logits, hidden, alpha


class ShowAttendTell(nn.Module):
    """Encoder + decoder step; `forward` runs the step with teacher forcing."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.step = DecoderStep(cfg)

    def forward(self, grid: torch.Tensor, tokens: torch.Tensor,
                image_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher forcing. grid [N, L, D]; tokens [B, T+1] (<start> ... <end> <pad>...);
        image_index [B]: which of the N images each caption describes (default: caption i -> image i),
        so an image's several captions share one encoder pass.

        Captions are sorted by length and a row leaves the batch once it has emitted <end>,
        so no work is spent on padding. Returns the P real predictions packed step by step:
        logits [P, V], their targets [P], and attention [B, T, L] (zero after a caption ends).
        """
        features, keys, hidden0 = self.encoder(grid)  # [N, L, E], [N, L, A], [N, H]
        if image_index is not None:
            features, keys, hidden0 = features[image_index], keys[image_index], hidden0[image_index]  # [B, ...]
        steps = tokens.shape[1] - 1
        lengths = (tokens != self.cfg.special["pad"]).sum(dim=1) - 1  # [B] predictions per caption
        order = lengths.argsort(descending=True)  # [B]
        tokens, features, keys, hidden = tokens[order], features[order], keys[order], hidden0[order]
        active = [int((lengths > t).sum()) for t in range(steps)]  # rows still decoding at step t
        logits, targets, alphas = [], [], []
        for t, n in enumerate(active):
            step_logits, step_hidden, alpha = self.step(tokens[:n, t], hidden[:n], features[:n], keys[:n])
            hidden = torch.cat([step_hidden, hidden[n:]]) if n < hidden.shape[0] else step_hidden  # [B, H]
            logits.append(step_logits)  # [n, V]
            targets.append(tokens[:n, t + 1])  # [n]
            alphas.append(F.pad(alpha, (0, 0, 0, tokens.shape[0] - n)))  # [B, L]
        attention = torch.stack(alphas, dim=1)[order.argsort()]  # [B, T, L] in the caller's row order
        return torch.cat(logits), torch.cat(targets), attention


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, attention: torch.Tensor,
                 attention_lambda: float, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy over the real tokens plus doubly stochastic attention regularisation.

    The regulariser lambda * (1 - sum_t alpha_ti)^2 pushes the model to look at every
    part of the image over the whole caption, not only the most salient cell. It is
    averaged over the L cells (as in sgrvinod's tutorial) rather than summed as in the
    paper: summed over 81 cells it outweighs the cross-entropy several times over.
    """
    ce = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)  # logits [P, V], targets [P]
    coverage = attention.sum(dim=1)  # [B, L]: attention is zero after each caption's end
    regulariser = ((1.0 - coverage) ** 2).mean()
    return ce + attention_lambda * regulariser


@torch.no_grad()
def greedy_decode(model: ShowAttendTell, grid: torch.Tensor, max_length: int | None = None) -> torch.Tensor:
    """Argmax caption ids [B, T] for quick validation; the beam search lives in caption_cli.beam."""
    special = model.cfg.special
    features, keys, hidden = model.encoder(grid)
    token = torch.full((grid.shape[0],), special["start"], dtype=torch.long)
    out = []
    for _ in range((max_length or model.cfg.max_length) - 1):
        logits, hidden, _ = model.step(token, hidden, features, keys)
        token = logits.argmax(dim=1)  # [B]
        out.append(token)
    return torch.stack(out, dim=1)
