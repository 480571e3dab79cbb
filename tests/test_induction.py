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
    InductionTransformer,
    copy_chance,
    determined_predictions,
    in_context_accuracy,
    induction_inputs,
    induction_loss,
    induction_metrics,
    induction_scores,
    previous_token_accuracy,
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


TWO_TASKS = TINY.model_copy(update={"d_vocab": 24, "previous_token_share": 0.5, "positions": "first_layer_qk"})


def test_the_previous_token_task_reads_the_upper_half_and_asks_for_the_token_before() -> None:
    ids = induction_inputs(TWO_TASKS, 512, torch.Generator().manual_seed(0))
    second = ids[:, 0] == 25
    assert 0.4 < float(second.float().mean()) < 0.6 and ((ids[:, 0] == 24) | second).all()
    assert (ids[second, 1:] >= 12).all() and (ids[~second, 1:] < 12).all()  # the halves of the vocabulary
    assert all(len(set(row.tolist())) == TWO_TASKS.n_ctx for row in ids[second])  # distinct, so no repeat
    predicted, answer = determined_predictions(ids, 24)
    assert predicted[second, 2:].all() and not predicted[second, :2].any()
    assert torch.equal(answer[second, 2:], ids[second, 1:-1])
    assert torch.equal(predicted[~second], repeat_positions(ids[~second])[0])
    assert torch.equal(answer[~second][predicted[~second]], ids[~second].roll(-1, 1)[predicted[~second]])
    perfect = torch.nn.functional.one_hot(answer.clamp(max=23), 24).float()  # BOS answers: undetermined
    assert previous_token_accuracy(perfect, ids) == 1.0 and in_context_accuracy(perfect, ids) == 1.0
    assert previous_token_accuracy(perfect.roll(1, 1), ids) == 0.0


def test_first_layer_positions_reach_layer_one_only_through_layer_zero() -> None:
    """With `positions: first_layer_qk` the positions enter layer 0's queries and keys alone: with layer 0's output
    weight at 0, moving them changes neither layer's values nor layer 1's attention."""
    model = InductionTransformer(TWO_TASKS)
    ids = induction_inputs(TWO_TASKS, 8, torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.blocks[0]["attn"]["o_proj"].weight.zero_()
        before = model.run(ids)[1]
        model.pos_embed.add_(torch.randn_like(model.pos_embed))
        after = model.run(ids)[1]
    assert not torch.allclose(before[0], after[0]) and torch.equal(before[1], after[1])
    residual, ids = InductionTransformer(TINY), induction_inputs(TINY, 8, torch.Generator().manual_seed(1))
    with torch.no_grad():
        residual.blocks[0]["attn"]["o_proj"].weight.zero_()
        before = residual.run(ids)[1]
        residual.pos_embed.add_(torch.randn_like(residual.pos_embed))
        assert not torch.allclose(before[1], residual.run(ids)[1][1])  # the default: positions in the residual


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
    untrained = InductionTransformer(TINY)
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


def test_the_idle_write_penalty_is_the_last_layers_mean_square_write_on_the_previous_token_task() -> None:
    config = TINY.model_copy(update={"d_vocab": 24, "previous_token_share": 0.5})
    ids = induction_inputs(config, 16, torch.Generator().manual_seed(3))
    model = InductionTransformer(config)
    logits, _, writes = model.run(ids)
    predicted, answer = determined_predictions(ids, config.d_vocab)
    cross_entropy = torch.nn.functional.cross_entropy(logits[predicted], answer[predicted])
    assert torch.equal(induction_loss(model, ids), cross_entropy)
    second = ids[:, 0] == config.d_vocab + 1
    by_hand = writes[1][second, 2:].pow(2).mean()  # every position from 2 on of the second task's sequences
    model.idle_write_coeff = 0.5
    assert second.any() and torch.allclose(induction_loss(model, ids), cross_entropy + 0.5 * by_hand)


@pytest.mark.slow
def test_the_preset_target_forms_a_previous_token_and_an_induction_head() -> None:
    config = api.load_run_config("induction").target
    target, _ = train_target(config)
    scores = induction_metrics(target.model, config)
    assert scores["in_context_accuracy"] > 0.99
    assert scores["previous_token_score/0.0"] > 0.85 and scores["induction_score/1.0"] > 0.95
    assert scores["previous_token_score/1.0"] < 0.2 and scores["induction_score/0.0"] < 0.2


@pytest.mark.slow
def test_the_two_task_target_needs_layer_one_for_induction_alone() -> None:
    config = api.load_run_config("induction-two-tasks").target
    target, _ = train_target(config)
    scores = induction_metrics(target.model, config)
    assert scores["in_context_accuracy"] > 0.99 and scores["previous_token_accuracy"] > 0.99
    assert scores["previous_token_score/0.0"] > 0.85 and scores["induction_score/1.0"] > 0.95
    assert scores["last_layer_write_rms/previous_token_task"] < 1e-3 * scores["last_layer_write_rms/induction_task"]
    ids = induction_inputs(config, 2048, torch.Generator().manual_seed(0))
    with torch.no_grad():
        target.model.blocks[1]["attn"]["o_proj"].weight.zero_()
        logits = target.model(ids)
    assert in_context_accuracy(logits, ids) < 0.1 and previous_token_accuracy(logits, ids) > 0.99


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
        (["target.previous_token_share=0.5", "target.d_vocab=38"], "from half the vocabulary"),
        (["target.previous_token_share=0.5", "target.d_vocab=44", "target.min_repeat=2"], "upper half"),
        (["target.positions=last_layer"], "positions"),
        (["target.idle_write_coeff=1"], "set previous_token_share above 0"),
        (["target.previous_token_share=0.5", "target.d_vocab=48", "target.idle_write_coeff=-1"], "idle_write_coeff"),
    ],
)
def test_bad_induction_configs_name_the_problem(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        api.load_run_config("induction", overrides)
