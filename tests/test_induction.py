"""The induction-head toy: its sequences and their determined predictions, the ground-truth metrics on hand-built
logits and attention patterns, a little training, and SPD on the preset."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from unmerge import api
from unmerge.config import InductionConfig, OptimConfig, TrainConfig
from unmerge.errors import ConfigError
from unmerge.targets.induction import (
    copy_chance,
    in_context_accuracy,
    induction_inputs,
    induction_metrics,
    induction_model,
    induction_scores,
    previous_token_scores,
    repeat_positions,
)
from unmerge.targets.toys import train_target

TINY = InductionConfig(
    d_vocab=16,
    min_repeat=3,
    max_repeat=5,
    d_model=16,
    train=TrainConfig(steps=150, batch_size=64, optim=OptimConfig(lr=1e-2)),
)


def test_sequences_repeat_a_segment_of_distinct_tokens() -> None:
    ids = induction_inputs(TINY, 256, torch.Generator().manual_seed(0))
    assert ids.shape == (256, TINY.n_ctx) and (ids[:, 0] == TINY.d_vocab).all() and (ids[:, 1:] < 16).all()
    predicted, earlier = repeat_positions(ids)
    repeats = predicted.sum(1) + 1  # the repeat's length n: n − 1 determined predictions
    assert repeats.min() == TINY.min_repeat and repeats.max() == TINY.max_repeat
    n = repeats[:, None]
    position = torch.arange(TINY.n_ctx)
    assert torch.equal(ids[:, -TINY.min_repeat :], ids.gather(1, (position[-TINY.min_repeat :] - n)))
    distinct = [len(set(row[1:].tolist())) for row in ids]
    assert distinct == (2 * TINY.max_repeat - repeats).tolist()  # nothing but the segment occurs twice
    answer = ids.gather(1, (earlier + 1).clamp(max=TINY.n_ctx - 1))
    assert torch.equal(answer[predicted], ids.roll(-1, 1)[predicted])


def test_metrics_on_hand_built_logits_and_patterns() -> None:
    ids = induction_inputs(TINY, 64, torch.Generator().manual_seed(1))
    predicted, earlier = repeat_positions(ids)
    perfect = torch.nn.functional.one_hot(ids.roll(-1, 1) % TINY.d_vocab, TINY.d_vocab).float()
    assert in_context_accuracy(perfect, ids) == 1.0
    assert in_context_accuracy(-perfect, ids) == 0.0
    seq = TINY.n_ctx
    back = torch.eye(seq).roll(-1, 1)
    back[0] = torch.eye(seq)[0]  # BOS attends to itself
    previous = back.expand(64, 1, seq, seq)
    assert previous_token_scores(previous, ids).tolist() == [1.0]
    assert induction_scores(previous, ids).tolist() == [0.0]
    onto = torch.where(predicted, earlier + 1, 0)
    induction = torch.nn.functional.one_hot(onto, seq).float()[:, None]
    assert induction_scores(induction, ids).tolist() == [1.0]
    uniform = torch.ones(seq, seq).tril()
    uniform = (uniform / uniform.sum(1, keepdim=True)).expand(64, 2, seq, seq)
    assert 0.05 < float(previous_token_scores(uniform, ids)[1]) < 0.3
    assert 1 / TINY.d_vocab < copy_chance(ids) < 1 / TINY.max_repeat


def test_the_target_trains_and_is_deterministic() -> None:
    untrained = induction_model(TINY)
    chance = induction_metrics(untrained, TINY)
    assert chance["in_context_accuracy"] < 3 / TINY.d_vocab and chance["chance_accuracy"] == 1 / 16
    target, loss = train_target(TINY)
    again, _ = train_target(TINY)
    assert all(torch.equal(a, b) for a, b in zip(target.model.parameters(), again.model.parameters(), strict=True))
    trained = induction_metrics(target.model, TINY)
    assert loss < math.log(TINY.d_vocab) - 0.5 and trained["in_context_loss"] < chance["in_context_loss"] - 0.5
    ids = induction_inputs(TINY, 8, torch.Generator().manual_seed(2))
    logits = target.model(ids)
    assert logits.shape == (8, TINY.n_ctx, 16) and (logits[~repeat_positions(ids)[0]] == 0).all()


@pytest.mark.slow
def test_the_preset_target_forms_a_previous_token_and_an_induction_head() -> None:
    config = api.load_run_config("induction").target
    target, _ = train_target(config)
    scores = induction_metrics(target.model, config)
    assert scores["in_context_accuracy"] > 0.99
    assert scores["previous_token_score/0.0"] > 0.85 and scores["induction_score/1.0"] > 0.95
    assert scores["previous_token_score/1.0"] < 0.2 and scores["induction_score/0.0"] < 0.2


def test_spd_runs_on_the_preset(tmp_path: Path) -> None:
    tiny = [
        "target.d_vocab=16",
        "target.min_repeat=3",
        "target.max_repeat=5",
        "target.d_model=16",
        "target.train.steps=50",
        "target.train.batch_size=32",
        "method.sites.0.C=8",
        "train.steps=10",
        "train.batch_size=32",
        "train.eval_batch_size=64",
        "train.checkpoint_every=5",
        "method.faithfulness_warmup_steps=5",
    ]
    result = api.decompose(api.load_run_config("induction", tiny), tmp_path / "run")
    assert {f"alive/blocks.{layer}.attn.{w}_proj" for layer in (0, 1) for w in "qkvo"} <= result.metrics.keys()
    assert math.isfinite(result.metrics["ci_masked_recon"]) and result.metrics["faithfulness"] >= 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.output_loss=mse"], "output_loss must be 'kl' for an algorithmic toy"),
        (["target.d_vocab=8"], "too small for distinct tokens"),
        (["target.min_repeat=13"], "exceeds max_repeat"),
    ],
)
def test_bad_induction_configs_name_the_problem(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        api.load_run_config("induction", overrides)
