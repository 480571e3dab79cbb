"""A finished dictionary run's files: `dictionary.safetensors` (the trained dictionary, normalisation folded in,
without the training bookkeeping) and `ground_truth.safetensors` (the true features it was scored against)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from unmerge import runs
from unmerge.config import DictionaryRunConfig
from unmerge.data.source import ActivationSource
from unmerge.errors import CheckpointError, ConfigError
from unmerge.io import save_tensors_atomic
from unmerge.sae.arch import build_dictionary
from unmerge.sae.dictionary import Dictionary
from unmerge.sae.method import TRAINING_BUFFERS, DictionaryMethod
from unmerge.targets.base import Target
from unmerge.targets.toys import cached_target


def save_trained(run_dir: Path, method: DictionaryMethod) -> None:
    """Write the trained dictionary and, for a source with known features, the truth it was scored against
    (`true_features`, and `parents` on the hierarchy toy)."""
    save_tensors_atomic(run_dir / runs.DICTIONARY_FILE, method.dictionary_state())
    source: ActivationSource = method.source
    truth = {
        name: value
        for name, value in (("true_features", source.true_features), ("parents", source.parents))
        if value is not None
    }
    if truth:
        save_tensors_atomic(run_dir / runs.GROUND_TRUTH_FILE, truth)


def load_dictionary(run_dir: Path) -> tuple[DictionaryRunConfig, Dictionary]:
    """A finished `train-dictionary` run's config and trained dictionary (normalisation folded in), in eval mode."""
    run_dir = Path(run_dir)
    config = runs.saved_config(run_dir, DictionaryRunConfig)
    weights_path = run_dir / runs.DICTIONARY_FILE
    if not weights_path.is_file():
        raise CheckpointError(
            f"{run_dir} has no {runs.DICTIONARY_FILE}: the run has not finished; rerun its "
            "train-dictionary command to resume and finish it"
        )
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(
            f"{weights_path} cannot be read ({error}); rerun the train-dictionary command "
            "after deleting it (the run re-evaluates from its newest checkpoint)"
        ) from None
    transcoder = bool(getattr(config.data, "transcoder", False))
    try:
        module = build_dictionary(
            weights["W_e"].shape[0], config.method, torch.Generator(), weights["W_d"].shape[1] if transcoder else None
        )
        module.load_state_dict({name: value for name, value in weights.items() if name not in TRAINING_BUFFERS})
    except (KeyError, RuntimeError) as error:
        reason = " ".join(str(error).split())
        raise CheckpointError(
            f"{weights_path} does not fit the dictionary its {runs.RUN_CONFIG} describes "
            f"({reason}); it was written by another unmerge version or edited: train it again"
        ) from None
    return config, module.eval()


def load_dictionary_of_target(run_dir: Path, target: Target) -> Dictionary:
    """A finished dictionary run's dictionary, checked to be trained on `target`'s very weights (e.g. the target
    of an SPD run, to compare or combine the two)."""
    config, dictionary = load_dictionary(run_dir)
    trained_on = cached_target(config.data.target).model.state_dict() if hasattr(config.data, "target") else {}
    wanted = target.model.state_dict()
    if trained_on.keys() != wanted.keys() or not all(torch.equal(trained_on[k], v) for k, v in wanted.items()):
        raise ConfigError(
            f"the dictionary in {run_dir} was not trained on the activations of {target.name} as "
            "given (a different target or trained weights); train both from the same preset"
        )
    return dictionary
