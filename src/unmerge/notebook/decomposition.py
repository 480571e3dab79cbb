"""`unmerge.decompose(model, data, sites=...)`: SPD of any model a notebook holds, on its own data, and the
`Decomposition` it returns to explore: causal importances, subcomponents, components after grouping, ablated
models, metrics, a report, and the same run directory the command line writes (`save`, `Decomposition.load`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from unmerge import api, runs
from unmerge.analysis.grouping import DEFAULT_ALPHA, DEFAULT_MIN_ACTIVE, DEFAULT_THRESHOLD, group_subcomponents
from unmerge.analysis.interventions import unlearned_model
from unmerge.config import OwnModelConfig, RunConfig, SiteConfig, SPDConfig, TrainConfig, validate
from unmerge.errors import ConfigError
from unmerge.io import write_json_atomic
from unmerge.notebook.options import Section, section_data, sectioned
from unmerge.report.figures import spd_figures
from unmerge.report.run import publish
from unmerge.spd.method import SPD
from unmerge.targets.base import Divergence
from unmerge.targets.own import (
    Data,
    Forward,
    OwnModel,
    batch_of,
    describe_data,
    describe_model,
    first_batch,
    keys_of,
    own_target,
    pack,
)
from unmerge.train import checkpoint

DEFAULT_METHOD: dict[str, Any] = {"importance_minimality_coeff": 1e-3}
DEFAULT_TRAIN: dict[str, Any] = {"steps": 2000, "batch_size": 256}
OutputLoss = str | Divergence  # "mse", "kl" (of logits), or a function (output, original) → scalar


@dataclass(frozen=True)
class Subcomponents:
    """One site's rank-1 subcomponents: its weight is approximated by `U @ V`, subcomponent c being
    `U[:, c] V[c]` (U is (d_out, C), V is (C, d_in), in the site's `(d_out, d_in)` orientation).

    Example:
        >>> pieces = found.subcomponents["0"]
        >>> pieces.C, pieces.weight.shape        # (20, torch.Size([16, 8]))
    """

    U: Tensor
    V: Tensor

    @property
    def C(self) -> int:
        """How many subcomponents the site has."""
        return self.V.shape[0]

    @property
    def weight(self) -> Tensor:
        """`U @ V`, the site's weight as the decomposition has it."""
        return self.U @ self.V


@dataclass(frozen=True)
class Component:
    """A group of subcomponents that fire together (a mechanism), named `site/c`; `index` 0 is the largest.

    Example:
        >>> largest = found.components()[0]
        >>> largest.subcomponents, largest.sites  # (['0/3', '2/7'], ['0', '2'])
    """

    index: int
    subcomponents: list[str]

    @property
    def sites(self) -> list[str]:
        """The sites its subcomponents belong to, in order of first appearance."""
        return list(dict.fromkeys(unit.rsplit("/", 1)[0] for unit in self.subcomponents))


def _site_list(sites: Mapping[str, int] | Sequence[SiteConfig | Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(sites, Mapping):
        return [{"pattern": pattern, "C": C} for pattern, C in sites.items()]
    return [section_data(site) for site in sites]


def own_run_config(
    model: nn.Module,
    data: Data,
    sites: Mapping[str, int] | Sequence[SiteConfig | Mapping[str, Any]] | None,
    output_loss: str,
    method: Section,
    train: Section,
    options: Mapping[str, Any],
    name: str | None,
) -> RunConfig:
    """The run config `decompose` trains: notebook defaults, then the given sections, then the keyword options."""
    placed = sectioned(
        options, {"method": SPDConfig.model_fields, "train": TrainConfig.model_fields}, "unmerge.decompose"
    )
    if section_data(method).get("kind", "spd") != "spd":
        raise ConfigError(
            "unmerge.decompose runs SPD; APD (the baseline) runs from a config: unmerge.api.decompose(config, run_dir)"
        )
    method_data = {**DEFAULT_METHOD, **section_data(method), "output_loss": output_loss, **placed["method"]}
    if sites is not None:
        method_data["sites"] = _site_list(sites)
    if not method_data.get("sites"):
        raise ConfigError(
            "unmerge.decompose: say which weights to decompose, e.g. sites={'layers.*.mlp_in': 100} (fnmatch "
            "patterns over the model's module names, each with its number of subcomponents C)"
        )
    described, weights = describe_model(model)
    recorded = describe_data(data, keys_of(first_batch(data)))
    target = {"kind": "own_model", "model": described, "weights": weights, "data": recorded}
    config = {
        "name": name or type(model).__name__,
        "target": target,
        "method": method_data,
        "train": {**DEFAULT_TRAIN, **section_data(train), **placed["train"]},
    }
    return validate(RunConfig, config, "unmerge.decompose")


def decompose(
    model: nn.Module,
    data: Data,
    sites: Mapping[str, int] | Sequence[SiteConfig | Mapping[str, Any]] | None = None,
    *,
    output_loss: OutputLoss = "mse",
    forward: Forward | None = None,
    run_dir: str | Path | None = None,
    method: Section = None,
    train: Section = None,
    name: str | None = None,
    **options: Any,
) -> Decomposition:
    """Decompose any `nn.Module`'s weights with SPD on your own data; returns a `Decomposition` to explore.

    Args:
        model: the trained model (frozen while decomposed: eval mode, no gradients).
        data: its inputs, examples along the first axis: a tensor, a dict of tensors (e.g. `input_ids`,
            `attention_mask`: passed to the model as keywords), or a re-iterable (a list, a `DataLoader`) of
            such batches; a tuple batch gives its first element (labels are not needed).
        sites: which weights to decompose: fnmatch patterns over module names with the number of rank-1
            subcomponents each, `{"layers.*.mlp_in": 100}`, or a list of `SiteConfig`s.
        output_loss: how the masked model's output is compared with the original's: `"mse"`, `"kl"` (of logits),
            or a function `(output, original) -> scalar tensor`.
        forward: how to run the model on a batch when `model(x)` / `model(**x)` is not it:
            `forward(model, batch)` returning its output (a tensor, a Hugging Face output's logits are read).
        run_dir: None (default) trains in memory; a directory checkpoints there and resumes an interrupted run
            (the files `unmerge decompose` writes).
        method, train: the `SPDConfig` / `TrainConfig` sections (objects or dicts) to start from.
        name: the run's name (default: the model's class name).
        **options: any field of `SPDConfig` or `TrainConfig` by name (`steps`, `batch_size`, `seed`,
            `importance_minimality_coeff`, `optim={"lr": 1e-3}`, `device`, ...). Defaults here: steps 2000,
            batch_size 256, importance_minimality_coeff 1e-3; everything else as in the configs.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
        >>> found = unmerge.decompose(model, torch.randn(1024, 8), sites={"0": 20, "2": 20}, steps=200)
        >>> found.causal_importance(torch.randn(4, 8))["0"].shape
        torch.Size([4, 20])
    """
    if isinstance(model, (RunConfig, str, Path)):
        raise ConfigError(
            "unmerge.decompose takes a model and its data; to run a preset or config file use "
            "unmerge.api.decompose(unmerge.load_run_config(...), run_dir), then unmerge.Decomposition.load(run_dir)"
        )
    divergence = output_loss if callable(output_loss) else None
    if divergence is None and output_loss not in ("mse", "kl"):
        raise ConfigError(
            f"unmerge.decompose: output_loss must be 'mse', 'kl' (of logits) or a function (output, original) -> "
            f"scalar tensor, not {output_loss!r}"
        )
    config = own_run_config(
        model, data, sites, "function" if divergence else str(output_loss), method, train, options, name
    )
    target = own_target(model, data, forward, divergence, pool_rows=config.train.eval_batch_size)
    run_dir = None if run_dir is None else Path(run_dir)
    with contextlib.nullcontext() if run_dir is None else runs.opened(config, run_dir):
        spd, result = api.train_decomposition(target, config, run_dir)
    metrics = spd.evaluate() if result is None else result.metrics
    return Decomposition(spd, config, run_dir, metrics, config.train.steps)


class Decomposition:
    """A trained SPD decomposition: the target's sites, each a sum of rank-1 subcomponents, with a causal
    importance function saying per input which of them the model needs. Returned by `unmerge.decompose`, or
    loaded from any SPD run directory (`Decomposition.load`). `spd` is the underlying `unmerge.spd.method.SPD`,
    `final_metrics` the metrics at the end of training.

    Example:
        >>> found = unmerge.decompose(model, data, sites={"0": 20, "2": 20}, steps=500)
        >>> found.causal_importance(data[:4])["0"]      # (4, 20), in [0, 1]
        >>> mechanisms = found.components()
        >>> edited = found.ablate(mechanisms[0])        # a copy of the model without that mechanism
        >>> found.metrics(held_out)["ci_masked_recon"]
        >>> found.save("runs/mine"); again = unmerge.Decomposition.load("runs/mine", model=model, data=data)
    """

    def __init__(self, spd: SPD, config: RunConfig, run_dir: Path | None, metrics: dict[str, float], step: int):
        self.spd = spd
        self.config = config
        self.run_dir = run_dir
        self.final_metrics = metrics
        self.step = step

    def __repr__(self) -> str:
        sites = ", ".join(f"{name} (C={C})" for name, C in self.spd.model.site_C.items())
        return f"Decomposition({self.config.name}: {sites}; step {self.step})"

    @property
    def sites(self) -> list[str]:
        """The decomposed modules' names."""
        return list(self.spd.model.site_names)

    @property
    def subcomponents(self) -> dict[str, Subcomponents]:
        """Per site, its subcomponents' `U` and `V` (detached copies on the CPU)."""
        return {
            name: Subcomponents(
                self.spd.model.site_components(name).U.detach().cpu().clone(),
                self.spd.model.site_components(name).V.detach().cpu().clone(),
            )
            for name in self.sites
        }

    def _inputs(self, x: Any) -> Tensor:
        """A batch in the form the data had (a tensor, a dict of tensors), packed for the target's model."""
        batch = batch_of(x)
        model = self.spd.target.model
        if isinstance(model, OwnModel) and keys_of(batch) != model.keys:
            raise ConfigError(f"the inputs have keys {keys_of(batch)}, but the model was decomposed on {model.keys}")
        return pack(batch).to(self.spd.device)

    @torch.no_grad()
    def causal_importance(self, x: Any) -> dict[str, Tensor]:
        """Per site, the causal importance of each subcomponent in [0, 1] on inputs `x` (shaped like the data):
        `(*positions, C)` (for a sequence model, one row per token)."""
        with self.spd.model.attached():
            clipped = self.spd.importances(self.spd.model.clean_pass(self._inputs(x))).clipped()
        return {name: g.cpu() for name, g in clipped.items()}

    def components(
        self,
        n_inputs: int = 16_384,
        threshold: float = DEFAULT_THRESHOLD,
        alpha: float = DEFAULT_ALPHA,
        min_active: int = DEFAULT_MIN_ACTIVE,
    ) -> list[Component]:
        """Subcomponents grouped into components by the description length of which groups fire
        (`unmerge.analysis.grouping`; README "Grouping"), on `n_inputs` rows sampled from the data; active
        means CI > `threshold`, subcomponents active on fewer than `min_active` rows are left out, and `alpha` is
        the bits it costs to name one active subcomponent (higher: fewer, larger components). With a run
        directory the grouping is saved there as `grouping.json` (what `unmerge unlearn --component` reads)."""
        grouping = group_subcomponents(self.spd, n_inputs, min(n_inputs, 1024), threshold, alpha, min_active)
        if self.run_dir is not None:
            write_json_atomic(self.run_dir / runs.GROUPING_FILE, grouping.summary(), indent=1)
        return [Component(i, members) for i, members in enumerate(grouping.components())]

    def ablate(self, component: Component | Sequence[str] | str) -> nn.Module:
        """A copy of the model with a component's (or the named subcomponents', `site/c`) weights removed
        permanently; the model itself is untouched."""
        units = component.subcomponents if isinstance(component, Component) else component
        edited = unlearned_model(self.spd, [units] if isinstance(units, str) else list(units))
        return edited.wrapped if isinstance(edited, OwnModel) else edited

    def metrics(self, data: Data | None = None) -> dict[str, float]:
        """Faithfulness, reconstruction losses (stochastic, CI-masked, unmasked), alive subcomponents and CI-L0
        per site, and ground-truth scores on toys: on `data` (up to `eval_batch_size` rows of it), or on the
        run's fixed evaluation batch."""
        if data is None:
            return self.spd.evaluate()
        return self.spd.evaluate(self._rows(data))

    def _rows(self, data: Data) -> Tensor:
        if isinstance(data, (Tensor, Mapping)):
            return self._inputs(data)
        rows, count = [], 0
        for item in data:
            rows.append(self._inputs(item))
            count += len(rows[-1])
            if count >= self.config.train.eval_batch_size:
                break
        if not rows:
            raise ConfigError("the data given to metrics() yields no batches")
        return torch.cat(rows)[: self.config.train.eval_batch_size]

    def report(self, path: str | Path) -> Path:
        """Write the run's metrics, figures and `report.html` into `path` (with a run directory, its training
        curves too); returns the report's path."""
        path = Path(path)
        figures = spd_figures(self.spd, path / runs.FIGURES_DIR)
        return publish(path, f"SPD: {self.config.name}", self.final_metrics, figures)[1]

    def save(self, path: str | Path) -> Path:
        """Write the run directory the command line writes (`config.yaml`, the checkpoint, `metrics.json`,
        figures, `report.html`) into `path`, which must be empty or hold this same run; returns `path`."""
        path = Path(path)
        if self.run_dir is not None and path.resolve() == self.run_dir.resolve():
            return path
        with runs.saving(self.config, path):
            tensors = {name: value.detach() for name, value in self.spd.module.state_dict().items()}
            checkpoint.save_checkpoint(path, self.step, tensors, {"lr": 0.0, "world_size": 1}, keep=1)
            self.report(path)
        return path

    @classmethod
    def load(
        cls,
        path: str | Path,
        model: nn.Module | None = None,
        data: Data | None = None,
        *,
        forward: Forward | None = None,
        output_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> Decomposition:
        """Load the SPD run directory `path`, from `unmerge decompose` or from `save` / `decompose(run_dir=...)`,
        at its newest checkpoint. A run of a model passed from Python needs that model and its data again (the model is
        checked against the weights' sha256 recorded in the run), and its `forward` and divergence function
        (`output_loss`) if it had them; a configured run (presets, config files) rebuilds its target by itself."""
        path = Path(path)
        config = runs.saved_config(path, RunConfig)
        if not isinstance(config.target, OwnModelConfig):
            config, spd, step = api.load_spd_run(path)
        else:
            spd, step = _load_own(path, config, model, data, forward, output_loss)
        metrics = runs.read_metrics(path) if runs.is_finished(path) else {}
        return cls(spd, config, path, metrics, step)


def _load_own(
    path: Path,
    config: RunConfig,
    model: nn.Module | None,
    data: Data | None,
    forward: Forward | None,
    output_loss: Callable[[Tensor, Tensor], Tensor] | None,
) -> tuple[SPD, int]:
    """A model passed from Python, checked against the run's record, and the run's SPD restored onto it."""
    recorded = config.target
    assert isinstance(recorded, OwnModelConfig)
    if model is None or data is None:
        raise ConfigError(
            f"{path} decomposed a model passed from Python ({recorded.model}): pass it and its data, "
            "Decomposition.load(path, model=..., data=...)"
        )
    if describe_model(model)[1] != recorded.weights:
        raise ConfigError(
            f"the model given is not the one {path} decomposed ({recorded.model}): its weights' sha256 differs; "
            "pass the same model with the same weights"
        )
    if config.method.output_loss == "function" and output_loss is None:
        raise ConfigError(f"{path} was decomposed with a divergence function: pass it again as output_loss=...")
    target = own_target(model, data, forward, output_loss, pool_rows=config.train.eval_batch_size)
    spd = SPD(target, config.method, seed=config.train.seed, eval_batch_size=config.train.eval_batch_size)
    state = checkpoint.restore_newest(path, spd.module)
    if not state:
        raise ConfigError(f"{path} has no checkpoint yet; rerun unmerge.decompose(..., run_dir={str(path)!r})")
    return spd, int(state["step"])
