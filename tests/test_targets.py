"""Toy targets: seeded training is deterministic, save/load round-trips, the cache reuses (and one process trains
what several need at once), ground truth is right."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from unmerge.config import OptimConfig, ResidMLPConfig, TMSConfig, TrainConfig
from unmerge.errors import CheckpointError
from unmerge.io import cache_lock, cache_root
from unmerge.targets import cached_target, load_target, save_target, train_target
from unmerge.targets.toys import CONFIG_FILE, target_cache_dir, train_and_save_target
from unmerge.train.rng import step_generator

from .conftest import torchrun

TMS = TMSConfig(
    n_features=5,
    n_hidden=2,
    identity=True,
    train=TrainConfig(steps=200, batch_size=256, optim=OptimConfig(lr=5e-3, weight_decay=0.01)),
)


def test_training_is_seeded_and_deterministic() -> None:
    a, loss_a = train_target(TMS)
    b, loss_b = train_target(TMS)
    c, _ = train_target(TMS.model_copy(update={"train": TMS.train.model_copy(update={"seed": 1})}))
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key])
    assert loss_a == loss_b
    assert not torch.equal(a.model.linear1.weight, c.model.linear1.weight)
    assert torch.equal(a.model.hidden.weight, torch.eye(2))  # the inserted identity stays fixed


def test_save_load_round_trip_and_cache(tmp_path: Path) -> None:
    target, _ = train_target(TMS)
    save_target(target, TMS, tmp_path)
    loaded, config = load_target(tmp_path)
    assert config == TMS
    x = target.sample_inputs(64, step_generator(0, "test"))
    assert torch.equal(loaded.model(x), target.model(x))
    assert torch.equal(loaded.model.linear2.weight, loaded.model.linear1.weight.T)  # tied after loading
    first = cached_target(TMS)
    assert any(cache_root().glob("targets/tms-5-2-id-*/model.safetensors"))
    assert torch.equal(cached_target(TMS).model.linear1.weight, first.model.linear1.weight)


WAITER = """
import sys
import torch.distributed as dist
from unmerge.config import TMSConfig
from unmerge.targets import cached_target
from unmerge.train import distributed

if distributed.launched_by_torchrun():
    dist.init_process_group("gloo")
print(cached_target(TMSConfig.model_validate_json(sys.argv[1])).model.linear1.weight.sum().item(), flush=True)
distributed.stop()
"""


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_process_needing_a_target_another_is_training_waits_then_loads_it(tmp_path: Path, ranks: int) -> None:
    """Two processes needing one untrained target used to train it side by side and collide on its checkpoints;
    the second now waits on the cache lock and loads what the first saved (here: weights no training gives). A
    torchrun job waits as one: rank 0 holds the lock, the other ranks wait for it."""
    config = TMS.model_copy(update={"train": TMS.train.model_copy(update={"seed": 6 + ranks})})  # no other test's
    directory = target_cache_dir(config)
    script = tmp_path / "waiter.py"
    script.write_text(WAITER)
    command = [*([sys.executable] if ranks == 1 else torchrun(ranks)), str(script), config.model_dump_json()]
    stderr_file = tmp_path / "stderr"
    with cache_lock(directory):
        with stderr_file.open("w") as stderr:
            waiter = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
        deadline = time.monotonic() + 120
        while "waiting for it to finish" not in stderr_file.read_text():
            assert waiter.poll() is None and time.monotonic() < deadline, stderr_file.read_text()
            time.sleep(0.1)
        assert not (directory / CONFIG_FILE).exists()
        target = train_and_save_target(config, directory)[0]
        with torch.no_grad():
            target.model.linear1.weight.mul_(2)
        save_target(target, config, directory)
    out, _ = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, stderr_file.read_text()
    printed = [float(line) for line in out.split()]
    assert len(printed) == ranks
    assert printed == pytest.approx([target.model.linear1.weight.sum().item()] * ranks, rel=1e-6)


def test_damaged_target_is_a_clear_error(tmp_path: Path) -> None:
    target, _ = train_target(TMS)
    save_target(target, TMS, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot load target weights"):
        load_target(tmp_path)
    with pytest.raises(CheckpointError, match="holds no trained target"):
        load_target(tmp_path / "missing")


def test_data_distributions() -> None:
    generator = step_generator(0, "data")
    x = train_target(TMS)[0].sample_inputs(20_000, generator)
    assert 0.045 < float((x > 0).float().mean()) < 0.055 and float(x.max()) <= 1.0 and float(x.min()) == 0.0
    resid = ResidMLPConfig(n_features=100, d_embed=20, d_mlp=5, train=TrainConfig(steps=1, batch_size=8))
    target, _ = train_target(resid)
    y = target.sample_inputs(20_000, generator)
    assert 0.009 < float((y != 0).float().mean()) < 0.011 and float(y.min()) >= -1.0 and float(y.max()) <= 1.0
    torch.testing.assert_close(target.model.W_E.norm(dim=1), torch.ones(100))
    truth = target.ground_truth
    assert truth.feature_sites == {"W_in": ["layers.0.mlp_in"]}
    assert truth.dense_sites == {"W_out": (["layers.0.mlp_out"], 5)}
