"""Algorithmic toy transformers: max-of-K learns and is scored on every input, modular addition's split and
full-batch sampler, the Fourier key frequencies of a planted embedding, and SPD on both (attention weights and a
token-indexed embedding site, KL of the logits)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from unmerge import api
from unmerge.config import MaxOfKConfig, ModularAdditionConfig, OptimConfig, TrainConfig
from unmerge.errors import ConfigError
from unmerge.targets.algorithmic import (
    key_frequencies,
    max_of_k_accuracy,
    modular_addition_inputs,
    modular_addition_loss,
    modular_addition_model,
    modular_addition_split,
)
from unmerge.targets.toys import train_target

TINY_MAX = [
    "target.d_vocab=6",
    "target.n_ctx=3",
    "target.d_model=16",
    "target.train.steps=600",
    "target.train.batch_size=64",
    "target.train.optim={lr: 0.01}",
]
TINY_RUN = [
    "train.steps=20",
    "train.batch_size=64",
    "train.eval_batch_size=128",
    "train.checkpoint_every=10",
    "method.faithfulness_warmup_steps=5",
]


def test_max_of_k_learns_and_is_scored_on_every_input() -> None:
    config = MaxOfKConfig(
        d_vocab=6, n_ctx=3, d_model=16, train=TrainConfig(steps=600, batch_size=64, optim=OptimConfig(lr=0.01))
    )
    target, loss = train_target(config)
    scores = max_of_k_accuracy(target.model, config)
    assert scores["inputs"] == 6**3 and scores["accuracy_all_inputs"] > 0.95 and loss < 0.3
    ids = torch.tensor([[0, 5, 1], [2, 2, 2]])
    assert target.model(ids).shape == (2, 6)


def test_modular_addition_split_and_full_batch_sampler() -> None:
    config = ModularAdditionConfig(p=7, d_model=8, n_heads=2, d_mlp=16, train_fraction=0.3)
    train, test = modular_addition_split(config)
    assert train.shape == (15, 3) and test.shape == (34, 3) and (train[:, 2] == 7).all()
    pairs = {tuple(row[:2].tolist()) for row in torch.cat([train, test])}
    assert len(pairs) == 49  # every pair exactly once
    assert torch.equal(modular_addition_inputs(config, 100, torch.Generator()), train)
    assert modular_addition_inputs(config, 4, torch.Generator().manual_seed(0)).shape == (4, 3)


def test_last_position_fast_path_gives_the_same_logits() -> None:
    config = ModularAdditionConfig(p=7, d_model=8, n_heads=2, d_mlp=16)
    model = modular_addition_model(config)
    ids = torch.cat([modular_addition_split(config)[0], modular_addition_split(config)[1]])
    assert torch.allclose(model(ids), model.last_position_logits(ids), atol=1e-6)
    weights = dict(model.named_parameters())
    assert float(weights["mlp.fc_out.weight"].detach().std()) == pytest.approx(8**-0.5, rel=0.3)  # Nanda et al.'s scale
    assert not weights["mlp.fc_in.bias"].any()
    loss = modular_addition_loss(model, ids)
    assert loss.dtype == torch.float64 and bool(torch.isfinite(loss.detach()))


def test_key_frequencies_find_a_planted_frequency() -> None:
    p = 113
    angles = 2 * math.pi * 17 * torch.arange(p) / p
    embedding = torch.stack([torch.cos(angles), torch.sin(angles), 0.05 * torch.randn(p)], dim=1)
    frequencies = key_frequencies(torch.cat([embedding, torch.zeros(1, 3)]), p, share=0.9)
    assert frequencies[0][0] == 17 and frequencies[0][1] > 0.9 and len(frequencies) == 1


def test_spd_on_max_of_k_attention_and_modular_addition_embedding(tmp_path: Path) -> None:
    result = api.decompose(api.load_run_config("max-of-k", TINY_MAX + TINY_RUN), tmp_path / "max")
    assert {"alive/attn.q_proj", "alive/attn.o_proj"} <= result.metrics.keys()
    assert math.isfinite(result.metrics["ci_masked_recon"])
    tiny_add = [
        "target.p=7",
        "target.d_model=8",
        "target.n_heads=2",
        "target.d_mlp=16",
        "target.train.steps=50",
        "target.train.batch_size=15",
        "method.sites=[{pattern: embed, C: 8}]",
    ]
    result = api.decompose(api.load_run_config("modular-addition", tiny_add + TINY_RUN), tmp_path / "add")
    assert result.metrics["alive/embed"] >= 0 and math.isfinite(result.metrics["stochastic_recon"])


def test_an_algorithmic_toy_needs_the_kl_output_loss() -> None:
    with pytest.raises(ConfigError, match="output_loss must be 'kl' for an algorithmic toy"):
        api.load_run_config("max-of-k", ["method.output_loss=mse"])
