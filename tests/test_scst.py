"""Self-critical sequence training: the CIDEr-D reward, the baseline, the masked loss, the loop.

The reward and the pieces of the loss are checked against hand-computed numbers; the loop
learns a toy memorisable set from random weights, resumes exactly, and runs through
`caption-cli train --scst-from` on the synthetic shapes of tests/test_train.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from training.cider import CiderD  # noqa: E402
from training.model import ModelConfig, ShowAttendTell  # noqa: E402
from training.scst import (ScstConfig, advantages, caption_rewards, mask_through_end, resolve_scst_config,  # noqa: E402
                           sample_captions, scst_loss, scst_step, train_scst)
from training.train import resolve_config, train  # noqa: E402
from training.vocab import END, PAD, Vocab, tokenize  # noqa: E402
from tests.test_train import TINY, _dataset, _without_one_train_image, shapes  # noqa: E402,F401  (shapes: the session's synthetic data set)

# --- CIDEr-D -------------------------------------------------------------------

# Two images, one reference each. N = 2 images, so an n-gram's weight is tf * (log 2 - log df):
# "a" is in both (weight 0); "dog", "cat", "a dog", "a cat" are in one (weight log 2 each).
TWO = {"A": ["A dog."], "B": ["a cat"]}


@pytest.mark.parametrize("hypothesis, expected", [
    # 1-grams: cos({a: 0, dog: log2}, same) = 1; 2-grams: cos = 1; no 3-, 4-grams: 0.
    # mean over n = 2/4, x10 -> 5; same length -> no penalty
    ("a dog", 5.0),
    # 1-grams: cos = log2*log2 / (log2*log2) = 1; no bigrams; length (bigrams) 0 vs 1:
    # penalty exp(-1 / (2 * 6^2)); 10 * 1/4 * penalty
    ("Dog!", 2.5 * math.exp(-1 / 72)),
    # clipping: the hypothesis' "dog" weighs 2 log2, clipped to the reference's log2:
    # min(2log2, log2) * log2 / (2log2 * log2) = 1/2; "dog dog" is no reference bigram: 0
    ("dog dog", 1.25),
    ("a cat", 0.0),  # only "a", of weight 0, is shared with A's reference
])
def test_cider_d_of_a_hand_computed_example(hypothesis: str, expected: float) -> None:
    assert CiderD(TWO).score(["A"], [hypothesis])[0] == pytest.approx(expected, abs=1e-12)


CORPUS = {
    "a": ["A dog runs on the grass.", "a brown dog running", "the dog is on grass"],
    "b": ["a cat sleeps", "A cat on a sofa", "cat sleeping on a red sofa", "a cat"],
    "c": ["two men ride bikes", "men riding bicycles on a road"],
}
HYPOTHESES = {"a": "a dog runs on grass", "b": "a cat a cat a cat", "c": "a dog on the road on the road"}


def test_cider_d_equals_pycocoevalcap_given_the_same_references() -> None:
    """pycocoevalcap's Cider (CIDEr-D) takes its document frequencies from the references it is
    given: with the whole corpus given, both must agree to rounding."""
    from pycocoevalcap.cider.cider import Cider

    ids = sorted(HYPOTHESES)
    tokens = lambda text: " ".join(tokenize(text))  # noqa: E731
    _, theirs = Cider().compute_score({i: [tokens(c) for c in CORPUS[i]] for i in ids},
                                      {i: [tokens(HYPOTHESES[i])] for i in ids})
    ours = CiderD(CORPUS).score(ids, [HYPOTHESES[i] for i in ids])
    assert ours == pytest.approx(theirs, abs=1e-12)
    assert len(set(ours.round(6))) == 3 and min(ours) > 0


def test_cider_d_weights_come_from_the_corpus_not_the_batch() -> None:
    """One image scored alone keeps its corpus score (pycocoevalcap would give 0: log 1 - log 1)."""
    scorer = CiderD(CORPUS)
    batch = scorer.score(["a", "b", "c", "a"], [HYPOTHESES[i] for i in "abca"])
    alone = scorer.score(["b"], [HYPOTHESES["b"]])
    assert alone[0] == pytest.approx(batch[1], abs=1e-12) and alone[0] > 0.1
    assert batch[0] == batch[3]
    with pytest.raises(ValueError, match="'z' is not among the references"):
        scorer.score(["z"], ["a dog"])


# --- baseline, mask, loss ------------------------------------------------------

def test_mean_of_samples_baseline_leaves_advantages_summing_to_zero_per_image() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.5, 0.5, 0.5, 0.5], [0.0, 4.0, 0.0, 0.0]])  # [N=3, K=4]
    advantage = advantages(rewards)
    # image 0: the baseline of sample 0 is (2 + 3 + 6) / 3 = 11/3
    assert advantage[0, 0].item() == pytest.approx(1.0 - 11 / 3)
    assert advantage.sum(dim=1).abs().max().item() < 1e-6
    assert advantage[1].abs().max().item() == 0  # equal samples teach nothing
    assert advantage[2].tolist() == pytest.approx([-4 / 3, 4.0, -4 / 3, -4 / 3])
    greedy = advantages(rewards, torch.tensor([1.0, 0.0, 2.0]))
    assert greedy[2].tolist() == [-2.0, 2.0, -2.0, -2.0]


def test_masked_log_prob_stops_after_end() -> None:
    tokens = torch.tensor([[5, 6, END, 7, END], [5, END, PAD, 6, 6], [5, 6, 7, 8, 9]])  # [B=3, T=5]
    assert mask_through_end(tokens, END).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    logprobs = torch.full((3, 5), -0.5, requires_grad=True)
    advantage = torch.tensor([2.0, -1.0, 0.5])
    loss = scst_loss(logprobs, mask_through_end(tokens, END), advantage)
    # -(2 * 3 * -0.5 + -1 * 2 * -0.5 + 0.5 * 5 * -0.5) / 3
    assert loss.item() == pytest.approx(-(-3.0 + 1.0 - 1.25) / 3)
    loss.backward()
    assert (logprobs.grad[0, 3:] == 0).all() and (logprobs.grad[1, 2:] == 0).all()
    assert logprobs.grad[0, :3].tolist() == pytest.approx([-2 / 3] * 3)


# --- a toy memorisable set -----------------------------------------------------

TOY_REFS = {"img0": ["a red circle", "a red circle on blue"], "img1": ["a green square", "a green square on red"],
            "img2": ["a blue circle", "a blue circle on green"], "img3": ["a red square", "a red square on green"]}


def _toy(seed: int = 0) -> tuple[ShowAttendTell, torch.Tensor, Vocab]:
    vocab = Vocab.build((c for captions in TOY_REFS.values() for c in captions), min_count=1)
    torch.manual_seed(seed)
    grid = torch.randn(len(TOY_REFS), 4, 8)  # [N=4, L=4, D=8]: one random grid per image
    cfg = ModelConfig(vocab_size=len(vocab), feature_dim=8, grid=(2, 2), encoder_dim=16, attention_dim=16,
                      hidden_dim=32, embed_dim=16, dropout=0.0, max_length=8)
    return ShowAttendTell(cfg), grid, vocab


def _greedy_reward(model: ShowAttendTell, grid: torch.Tensor, vocab: Vocab, cider: CiderD) -> float:
    model.eval()
    with torch.no_grad():
        tokens, _ = sample_captions(model, grid, 1, model.cfg.max_length - 1, greedy=True)
    model.train()
    return float(caption_rewards(cider, vocab, list(TOY_REFS), tokens).mean())


def test_sampling_never_draws_banned_words() -> None:
    model, grid, vocab = _toy()
    with torch.no_grad():
        model.step.out.bias[[PAD, 1, 3]] = 12.0  # <pad>, <start>, <unk> would win everything
        model.step.out.bias[END] = 6.0
        tokens, logprobs = sample_captions(model, grid, 5, 7)
    assert tokens.shape == logprobs.shape and tokens.shape[0] == 4 * 5
    assert not torch.isin(tokens, torch.tensor([PAD, 1, 3])).any()
    assert (tokens[:, 0] != END).all()  # never an empty caption
    assert (tokens[:, 1] == END).float().mean() > 0.5  # <end> is drawn, from the second word on


def test_scst_steps_raise_the_greedy_reward_on_a_memorisable_set() -> None:
    """From random weights, 200 SCST steps (mean-of-samples baseline) take the greedy caption's
    CIDEr-D from noise to most of the references' words."""
    torch.set_num_threads(1)
    model, grid, vocab = _toy()
    cider = CiderD(TOY_REFS)
    before = _greedy_reward(model, grid, vocab, cider)
    cfg = ScstConfig(samples=5, lr=5e-3)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    torch.manual_seed(1)
    rewards = [scst_step(model, optimizer, grid, list(TOY_REFS), cider, vocab, cfg)["reward"] for _ in range(200)]
    after = _greedy_reward(model, grid, vocab, cider)
    assert before < 1.0 and after > 5.0, (before, after)
    assert sum(rewards[-20:]) / 20 > sum(rewards[:20]) / 20 + 3.0


def test_greedy_baseline_also_learns() -> None:
    torch.set_num_threads(1)
    model, grid, vocab = _toy()
    cider = CiderD(TOY_REFS)
    cfg = ScstConfig(samples=3, lr=5e-3, baseline="greedy")
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    torch.manual_seed(1)
    stats = [scst_step(model, optimizer, grid, list(TOY_REFS), cider, vocab, cfg) for _ in range(150)]
    assert stats[-1]["greedy_reward"] > stats[0]["greedy_reward"] + 3.0


# --- config --------------------------------------------------------------------

def test_scst_options_follow_the_trainers_rules(tmp_path: Path) -> None:
    file = tmp_path / "scst.json"
    file.write_text(json.dumps({"samples": 4, "lr": 1e-5}))
    cfg = resolve_scst_config(file, {"lr": 3e-5, "epochs": None})
    assert (cfg.samples, cfg.lr, cfg.epochs, cfg.baseline) == (4, 3e-5, 5, "mean")
    with pytest.raises(ValueError, match="unknown SCST option\\(s\\): dropout"):
        resolve_scst_config(None, {"dropout": 0.1})
    with pytest.raises(ValueError, match="baseline must be one of mean, greedy"):
        resolve_scst_config(None, {"baseline": "beam"})
    with pytest.raises(ValueError, match="needs samples >= 2"):
        resolve_scst_config(None, {"samples": 1})
    assert resolve_scst_config(None, {"samples": 1, "baseline": "greedy"}).samples == 1


# --- the loop on the synthetic shapes ------------------------------------------

@pytest.fixture(scope="module")
def ce_checkpoint(shapes: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """A briefly cross-entropy-trained tiny model: knows some words, not yet the captions."""
    out = tmp_path_factory.mktemp("ce")
    cfg = resolve_config(None, {**TINY, "out": str(out), "cache": str(shapes["cache"]), "epochs": 12,
                                "batch_size": 8, "lr": 3e-3, "patience": 100})
    train(_dataset(shapes), cfg, log=lambda line: None)
    return out / "last.pt"


def _scst(shapes: dict[str, Path], out: Path, **options) -> ScstConfig:  # noqa: F811
    base = {"out": str(out), "cache": str(shapes["cache"]), "samples": 2, "batch_size": 8, "lr": 3e-3,
            "patience": 100, "threads": 1}
    return resolve_scst_config(None, {**base, **options})


def test_resumed_scst_equals_an_uninterrupted_run(shapes: dict[str, Path], ce_checkpoint: Path,  # noqa: F811
                                                   tmp_path: Path) -> None:
    """8 images, 4 per step (8 samples of 2): 2 steps per epoch; stopped after 2 of 4 epochs and resumed."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_scst(_dataset(shapes), _scst(shapes, straight, epochs=4), ce_checkpoint, log=lambda line: None)
    train_scst(_dataset(shapes), _scst(shapes, split, epochs=4, limit_steps=4), ce_checkpoint, log=lambda line: None)
    lines: list[str] = []
    train_scst(_dataset(shapes), _scst(shapes, split, epochs=4), ce_checkpoint, resume=True, log=lines.append,
               dataset_name="shapes")
    assert f"resumed from {split / 'last.pt'}: epoch 2, step 4" in lines
    one = torch.load(straight / "last.pt", weights_only=True)
    two = torch.load(split / "last.pt", weights_only=True)
    assert (one["epoch"], one["step"]) == (two["epoch"], two["step"]) == (4, 8)
    assert [entry["epoch"] for entry in two["history"]] == [0, 1, 2, 3, 4]  # 0: the cross-entropy start
    for name in one["model"]:
        assert torch.equal(one["model"][name], two["model"][name]), name
    source = torch.load(ce_checkpoint, weights_only=True)
    assert not torch.equal(one["model"]["step.out.weight"], source["model"]["step.out.weight"])
    # a resumed run names its own data and keeps its start's, not nested one level deeper
    assert two["dataset"]["name"] == "shapes" and one["dataset"]["name"] == source["dataset"]["name"]
    assert two["dataset"]["scst_from"] == one["dataset"]["scst_from"] == source["dataset"]


def test_resumed_scst_refuses_other_data(shapes: dict[str, Path], ce_checkpoint: Path,  # noqa: F811
                                         tmp_path: Path) -> None:
    out = tmp_path / "scst"
    train_scst(_dataset(shapes), _scst(shapes, out, epochs=1), ce_checkpoint, log=lambda line: None)
    with pytest.raises(ValueError, match=r"last.pt was trained on other data \(8 train / 2 val images then, 7 / 2"):
        train_scst(_without_one_train_image(shapes), _scst(shapes, out, epochs=2), ce_checkpoint, resume=True,
                   log=lambda line: None)
    # a fresh SCST run may use other data than its cross-entropy start: no check there
    train_scst(_without_one_train_image(shapes), _scst(shapes, tmp_path / "other", epochs=1), ce_checkpoint,
               log=lambda line: None)
    # and its checkpoint names the data it trained on, not its start's (export's model.json reads it)
    other = torch.load(tmp_path / "other" / "last.pt", weights_only=True)["dataset"]
    source = torch.load(ce_checkpoint, weights_only=True)["dataset"]
    assert (other["images"], source["images"]) == (7, 8)
    captions = sum(len(r.captions) for r in _without_one_train_image(shapes).split("train"))
    assert other["captions"] == captions and other["scst_from"] == source
    assert other["fingerprint"]["train_images"] == 7


def test_scst_refuses_to_overwrite_its_source(shapes: dict[str, Path], ce_checkpoint: Path) -> None:  # noqa: F811
    with pytest.raises(ValueError, match="holds last.pt, the checkpoint SCST starts from"):
        train_scst(_dataset(shapes), _scst(shapes, ce_checkpoint.parent), ce_checkpoint, log=lambda line: None)


def test_train_scst_from_the_command_line(shapes: dict[str, Path], ce_checkpoint: Path,  # noqa: F811
                                          tmp_path: Path) -> None:
    """`caption-cli train --scst-from` writes checkpoints that evaluate and export's loader accept."""
    from typer.testing import CliRunner

    from caption_cli.cli import app
    from export.bundle_writer import load_checkpoint, model_from_checkpoint

    root, out = shapes["root"], tmp_path / "scst"
    data = ["--data", "kaggle", "--images", str(root / "images"), "--annotations", str(root / "captions.csv"),
            "--splits", str(root), "--cache", str(shapes["cache"])]
    runner = CliRunner()
    result = runner.invoke(app, ["train", *data, "--scst-from", str(ce_checkpoint), "--out", str(out),
                                 "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--set", "samples=2",
                                 "--set", "threads=1"])
    assert result.exit_code == 0, result.output
    assert "2 samples per image, mean baseline" in result.output
    assert f"best checkpoint: {out / 'best.pt'}" in result.output
    checkpoint = load_checkpoint(out / "last.pt")
    model_from_checkpoint(checkpoint, out / "last.pt")
    assert (checkpoint["epoch"], checkpoint["step"]) == (2, 4)
    assert checkpoint["train_config"]["scst"]["samples"] == 2 and checkpoint["train_config"]["hidden_dim"] == 96
    assert checkpoint["scst"]["source"]["checkpoint"] == str(ce_checkpoint)
    assert len((out / "history.jsonl").read_text().splitlines()) == 3

    scored = runner.invoke(app, ["evaluate", *data, "--split", "val", "--checkpoint", str(out / "best.pt"),
                                 "--beam", "2", "--json"])
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout[scored.stdout.index("{"):])["2"]["images"] == 2

    bad = runner.invoke(app, ["train", *data, "--scst-from", str(ce_checkpoint), "--out", str(out),
                              "--backbone", "efficientnet-lite1"], env={"COLUMNS": "400"})
    assert bad.exit_code == 2 and "come from the checkpoint" in bad.output
    unknown = runner.invoke(app, ["train", *data, "--scst-from", str(ce_checkpoint), "--out", str(out),
                                  "--set", "dropout=0.1"], env={"COLUMNS": "400"})
    assert unknown.exit_code == 1 and "unknown SCST option(s): dropout" in unknown.output
