"""The small LM target: shapes, causality, SPD-ready module names, ignored ids, learning, seeding, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unmerge.config import OptimConfig, SiteConfig, SmallLMConfig, TrainConfig
from unmerge.errors import CheckpointError
from unmerge.spd.sites import find_sites
from unmerge.targets.small_lm import SmallLM, load_small_lm, next_token_loss, save_small_lm, train_small_lm

VOCAB, SEQ, BOS, PAD = 20, 12, 0, 19
CONFIG = SmallLMConfig(
    n_layers=2,
    d_model=16,
    n_heads=2,
    d_mlp=32,
    train=TrainConfig(steps=100, batch_size=16, optim=OptimConfig(lr=1e-2), log_every=10),
)


def cycle_windows() -> torch.Tensor:
    """BOS, then the cycle 1 → 2 → … → 18 → 1 from every starting phase: trivially learnable."""
    phases = torch.arange(18).unsqueeze(1) + torch.arange(SEQ - 1)
    return torch.cat([torch.full((18, 1), BOS), phases % 18 + 1], dim=1)


def fresh_model(seed: int = 0) -> SmallLM:
    torch.manual_seed(seed)
    return SmallLM(CONFIG, VOCAB, SEQ)


def test_logits_shape_causality_and_site_names() -> None:
    model = fresh_model()
    ids = torch.randint(VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))
    logits = model(ids)
    assert logits.shape == (3, SEQ, VOCAB)
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % VOCAB
    after = model(changed)
    torch.testing.assert_close(after[:, :6], logits[:, :6], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, 6:], logits[:, 6:])
    modules = dict(model.named_modules())
    for name in (
        "blocks.0.attn.q_proj",
        "blocks.1.attn.o_proj",
        "blocks.0.mlp.fc_in",
        "blocks.0.mlp.fc_out",
        "unembed",
    ):
        assert isinstance(modules[name], nn.Linear), name
    assert modules["unembed"].weight is not model.embed.weight  # untied
    patterns = ["blocks.*.attn.*_proj", "blocks.*.mlp.fc_in", "unembed"]
    assert len(find_sites(model, [SiteConfig(pattern=p, C=4) for p in patterns])) == 2 * 5 + 1


def test_each_projection_runs_once_per_forward() -> None:
    model = fresh_model()
    calls: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    model(cycle_windows()[:2])
    assert len(calls) == 2 * 6 + 1 and set(calls.values()) == {1}


def test_loss_counts_only_ordinary_pairs_by_id() -> None:
    model = fresh_model()
    batch = cycle_windows()[:4].clone()
    batch[1, 5] = PAD  # a special token mid-window: both predictions touching it are dropped
    ignore = (BOS, PAD)
    logp = F.log_softmax(model(batch)[:, :-1], dim=-1).gather(-1, batch[:, 1:, None]).squeeze(-1)
    ordinary = (batch != BOS) & (batch != PAD)
    counted = ordinary[:, :-1] & ordinary[:, 1:]
    expected = -(logp * counted).sum() / counted.sum()
    loss = next_token_loss(model, batch, ignore)
    torch.testing.assert_close(loss, expected)
    useless = torch.stack([torch.full((SEQ,), PAD), torch.tensor([BOS, 5] * (SEQ // 2))])  # no ordinary pair
    torch.testing.assert_close(next_token_loss(model, torch.cat([batch, useless]), ignore), loss)
    assert next_token_loss(model, useless, ignore).item() == 0.0


def test_training_learns_a_cycle_and_is_seeded() -> None:
    windows = cycle_windows()
    model, metrics = train_small_lm(CONFIG, windows, windows[:5], VOCAB, (BOS,))
    assert metrics["heldout_ce"] < 0.05  # measured 0.0064–0.0069 nats over seeds 0–3; untrained ≈ log 20 ≈ 3.0
    assert metrics["train_loss"] < 0.05
    assert metrics["parameters"] == sum(p.numel() for p in model.parameters())
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    again, metrics_again = train_small_lm(CONFIG, windows, windows[:5], VOCAB, (BOS,))
    assert metrics_again == metrics
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    other_seed = CONFIG.model_copy(update={"train": CONFIG.train.model_copy(update={"seed": 1, "steps": 1})})
    other, _ = train_small_lm(other_seed, windows, windows[:5], VOCAB, (BOS,))
    assert not torch.equal(other.embed.weight, model.embed.weight)


def test_save_load_round_trip_and_damaged_file(tmp_path: Path) -> None:
    model = fresh_model().eval()
    save_small_lm(model, tmp_path)
    loaded = load_small_lm(CONFIG, VOCAB, SEQ, tmp_path)
    ids = cycle_windows()
    assert torch.equal(loaded(ids), model(ids))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*delete"):
        load_small_lm(CONFIG, VOCAB, SEQ, tmp_path)
    with pytest.raises(CheckpointError, match="delete"):
        load_small_lm(CONFIG, VOCAB, SEQ, tmp_path / "missing")
