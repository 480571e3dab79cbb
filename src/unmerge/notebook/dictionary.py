"""`unmerge.train_dictionary(...)`: a sparse dictionary (SAE, transcoder) trained on the activations of any model a
notebook holds, at one of its modules, on its own data, or on activations given directly; and the `Dictionary` it
returns to encode, decode and score with, and to save as the run directory `unmerge train-dictionary` writes
(`save`, `Dictionary.load`) or in SAELens's format (`to_saelens`)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from unmerge import api, runs
from unmerge.config import (
    ARCHITECTURE_CONFIGS,
    DictionaryRunConfig,
    OwnActivationsConfig,
    TrainConfig,
    validate,
)
from unmerge.data.source import ActivationSource
from unmerge.errors import ConfigError, UnmergeError
from unmerge.io import save_tensors_atomic
from unmerge.metrics import dictionary as scores
from unmerge.notebook.options import Section, section_data, sectioned
from unmerge.report.run import publish
from unmerge.sae.arch import build_dictionary
from unmerge.sae.dictionary import Dictionary as DictionaryModule
from unmerge.sae.method import TRAINING_BUFFERS, DictionaryMethod
from unmerge.sae.saelens import save_saelens
from unmerge.sae.storage import load_dictionary
from unmerge.targets.activations import target_activation_source
from unmerge.targets.own import Data, Forward, describe_data, describe_model, first_batch, keys_of, own_target, sampler

DEFAULT_TRAIN: dict[str, Any] = {"steps": 2000, "batch_size": 256}
WIDTH_PER_DIM = 4  # the default width: 4 latents per activation dimension
SOURCE = "unmerge.train_dictionary"
METHOD_FIELDS = sorted({name for config in ARCHITECTURE_CONFIGS.values() for name in config.model_fields})


def activation_rows(batch: Any) -> Tensor:
    """A tensor of activations `(..., d)` as float rows `(n, d)`; anything else is an error naming the fix."""
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not isinstance(batch, Tensor):
        raise UnmergeError(
            f"activations must be tensors of shape (rows, d) or (..., d), or an iterable (a list, a DataLoader) of "
            f"them, not a {type(batch).__name__}; to record them from a model pass it with hook=... and data=..."
        )
    if batch.dim() < 2:
        raise UnmergeError(
            f"activations must have shape (rows, d) or (..., d), not {tuple(batch.shape)}: the last axis is the "
            "activation dimension d (a single vector x: pass x[None])"
        )
    return batch.detach().reshape(-1, batch.shape[-1]).float()


def given_source(activations: Tensor | Iterable[Any], pool_rows: int, name: str) -> ActivationSource:
    """Activations given directly: a tensor's rows (drawn with the step's generator), or an iterable's batches
    read in order (`unmerge.targets.own.sampler`: evaluation draws from a pool of the first `pool_rows` rows)."""
    if isinstance(activations, Mapping):
        raise UnmergeError("activations must be a tensor or an iterable of tensors, not a dict")
    sample = sampler(activations, pool_rows, activation_rows)
    rows = sample.rows if isinstance(activations, Tensor) else sample.pool
    return ActivationSource(name=name, dim=rows.shape[1], sample=sample)


def _recorded_source(
    model: nn.Module, hook: str | None, data: Data | None, forward: Forward | None, transcoder: bool, pool_rows: int
) -> ActivationSource:
    if hook is None or data is None:
        names = [name for name, _ in model.named_modules() if name]
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise ConfigError(
            f"{SOURCE}: a model needs hook=... (the module whose output is recorded, one of: {shown}) and data=... "
            "(its inputs: a tensor, a dict of tensors or an iterable of batches)"
        )
    return target_activation_source(own_target(model, data, forward, None, pool_rows), hook, transcoder)


def _data_section(source: Any, hook: str | None, data: Data | None, transcoder: bool) -> dict[str, Any]:
    if not isinstance(source, nn.Module):
        return {"kind": "own_activations", "hook": hook, "data": describe_data(source, None)}
    described, weights = describe_model(source)
    section = {"kind": "own_activations", "hook": hook, "model": described, "weights": weights}
    section["data"] = describe_data(data, keys_of(first_batch(data)))
    section["transcoder"] = transcoder
    return section


def train_dictionary(
    source: nn.Module | Tensor | Iterable[Any],
    hook: str | None = None,
    data: Data | None = None,
    *,
    forward: Forward | None = None,
    transcoder: bool = False,
    run_dir: str | Path | None = None,
    method: Section = None,
    train: Section = None,
    name: str | None = None,
    **options: Any,
) -> Dictionary:
    """Train a sparse dictionary on a model's activations at one module, or on activations given directly;
    returns a `Dictionary` to encode, decode, score and save.

    Args:
        source: a trained `nn.Module` (then `hook` and `data` are needed; it is frozen: eval mode, no gradients),
            or activations: a tensor `(rows, d)` or `(..., d)` (flattened to rows), or a re-iterable (a list, a
            `DataLoader`) of such batches, read in order.
        hook: the module whose output is recorded, named as in `model.named_modules()` (`"layers.0"`,
            `"blocks.3.hook_resid_post"`); with activations given, an optional label of where they come from
            (SAELens's `hook_name`).
        data: the model's inputs, examples along the first axis: a tensor, a dict of tensors (passed as keywords)
            or an iterable of such batches (`unmerge.targets.own`). A sequence model gives one row per position.
        forward: how to run the model on a batch when `model(x)` / `model(**x)` is not it: `forward(model, batch)`.
        transcoder: record the hooked module's input and output: the dictionary encodes the one and decodes
            the other (only with a model).
        run_dir: None (default) trains in memory; a directory checkpoints there and resumes an interrupted run
            (the files `unmerge train-dictionary` writes); a finished one is loaded, not trained again.
        method, train: a dictionary config (`ReLUConfig`, `TopKConfig`, ...) / `TrainConfig`, or dicts, to start
            from.
        name: the run's name (default: the model's class name, or "dictionary").
        **options: any field of a dictionary config (`ARCHITECTURE_CONFIGS`: `width`, `activation`, `k`,
            `penalty={"coeff": 1e-3}`, `normalise_activations`, ...) or of `TrainConfig` (`steps`, `batch_size`
            in activation rows, `seed`, `optim={"lr": 1e-3}`, `device`, ...). Defaults here: width 4·d (d the
            activation dimension), steps 2000, batch_size 256; everything else as in the configs (a ReLU
            dictionary with an L1 penalty).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
        >>> sae = unmerge.train_dictionary(model, "1", torch.randn(4096, 8), activation="topk", k=8, steps=500)
        >>> sae.encode(torch.randn(5, 32)).shape
        torch.Size([5, 128])
        >>> sae = unmerge.train_dictionary(torch.randn(10_000, 16), width=64, steps=500)  # activations given
    """
    if isinstance(source, (DictionaryRunConfig, str, Path)):
        raise ConfigError(
            f"{SOURCE} takes a model (with hook= and data=) or activations; to run a preset or config file use "
            "unmerge.api.train_dictionary(unmerge.load_dictionary_config(...), run_dir), then "
            "unmerge.Dictionary.load(run_dir)"
        )
    given = not isinstance(source, nn.Module)
    if given and (transcoder or data is not None or forward is not None):
        used = "transcoder=True" if transcoder else "data=..." if data is not None else "forward=..."
        raise ConfigError(
            f"{SOURCE}: {used} needs a model: pass the model, hook=... and data=... to record its activations "
            "(activations given directly train an autoencoder on them as they are)"
        )
    placed = sectioned(options, {"method": METHOD_FIELDS, "train": TrainConfig.model_fields}, SOURCE)
    train_data = validate(TrainConfig, {**DEFAULT_TRAIN, **section_data(train), **placed["train"]}, SOURCE)
    name = name or ("dictionary" if given else type(source).__name__)
    pool_rows = train_data.eval_batch_size
    if given:
        activations = given_source(source, pool_rows, name + (f"/{hook}" if hook else ""))
    else:
        activations = _recorded_source(source, hook, data, forward, transcoder, pool_rows)
    method_data = {"width": WIDTH_PER_DIM * activations.dim, **section_data(method), **placed["method"]}
    run = {
        "name": name,
        "data": _data_section(source, hook, data, transcoder),
        "method": method_data,
        "train": train_data.model_dump(),
    }
    config = validate(DictionaryRunConfig, run, SOURCE)
    run_dir = None if run_dir is None else Path(run_dir)
    with contextlib.nullcontext() if run_dir is None else runs.opened(config, run_dir):
        if run_dir is not None and runs.is_finished(run_dir) and (run_dir / runs.DICTIONARY_FILE).is_file():
            return Dictionary.load(run_dir)
        trained, result = api.train_on_source(activations, config, run_dir)
    metrics = trained.evaluate() if result is None else result.metrics
    return Dictionary(_dictionary_module(trained), config, run_dir, metrics)


def _dictionary_module(method: DictionaryMethod) -> DictionaryModule:
    """The trained dictionary alone, as `Dictionary.load` builds it: without the training bookkeeping (firing
    counters, step, the decoder's gradient hook), in eval mode, where it was trained."""
    source = method.source
    module = build_dictionary(source.dim, method.config, torch.Generator(), source.output_dim)
    module.load_state_dict(method.dictionary_state())
    return module.to(method.device).eval()


class Dictionary:
    """A trained sparse dictionary: latents `f = encode(x)` of activations x, reconstructions `decode(f)`.
    Returned by `unmerge.train_dictionary`, or loaded from any finished dictionary run directory (CLI or
    notebook: `Dictionary.load`).

    Attributes:
        module: the `torch.nn.Module` itself (`unmerge.sae.dictionary.Dictionary`, of its architecture's class;
            `module(x)` gives (reconstruction, latents, pre-activations)), normalisation folded in, eval mode.
        config: the run's `DictionaryRunConfig`.
        run_dir: the run directory it was trained in or loaded from (None: trained in memory).
        final_metrics: the metrics at the end of training (`fvu`, `l0`, `dead_fraction`, ...; `metrics.json`).
        hook: the module whose activations it was trained on (None where unknown).

    Example:
        >>> sae = unmerge.train_dictionary(torch.randn(4096, 16), width=64, steps=200)
        >>> sae.metrics(torch.randn(512, 16))["fvu"]  # on other activations
        >>> path = sae.save("runs/my-sae")
        >>> unmerge.Dictionary.load(path).encode(torch.randn(2, 16)).shape
        torch.Size([2, 64])
    """

    def __init__(
        self,
        module: DictionaryModule,
        config: DictionaryRunConfig,
        run_dir: Path | None = None,
        final_metrics: dict[str, float] | None = None,
    ) -> None:
        self.module = module.eval()
        self.config = config
        self.run_dir = run_dir
        self.final_metrics = dict(final_metrics or {})

    @property
    def hook(self) -> str | None:
        """The module whose activations it was trained on (None where unknown)."""
        return getattr(self.config.data, "hook", None)

    @property
    def dim(self) -> int:
        """The input's dimension d."""
        return self.module.W_e.shape[0]

    @property
    def width(self) -> int:
        """The number of latents m."""
        return self.module.W_e.shape[1]

    @property
    def transcoder(self) -> bool:
        """Whether it decodes another space (a module's output) than it encodes (its input)."""
        return self.module.transcoder

    def __repr__(self) -> str:
        kind = "transcoder" if self.transcoder else "dictionary"
        where = f" at {self.hook}" if self.hook else ""
        return f"Dictionary({self.config.name}{where}: {self.module.activation} {kind}, d={self.dim}, m={self.width})"

    def _rows(self, x: Tensor, width: int, what: str) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != width:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise UnmergeError(f"{what} must be a tensor of shape (..., {width}), not {shape}")
        weight = self.module.W_e
        return x.detach().reshape(-1, width).to(weight.device, weight.dtype)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Latents `(..., m)` of activations `x` `(..., d)` (a transcoder's: of the module's inputs), exactly those
        the dictionary decodes (its forward's); returned on x's device.

        Example:
            >>> sae.encode(torch.randn(4, 10, sae.dim)).shape  # (4, 10, m)
        """
        f = self.module(self._rows(x, self.dim, "activations"))[1]
        return f.reshape(*x.shape[:-1], self.width).to(x.device)

    @torch.no_grad()
    def decode(self, f: Tensor, x: Tensor | None = None) -> Tensor:
        """Reconstructions `(..., d_out)` of latents `f` `(..., m)`: `f W_d + b_d`; a transcoder with a skip path
        adds `x W_skip` and needs the inputs `x`.

        Example:
            >>> sae.decode(sae.encode(x))  # == sae.reconstruct(x)
        """
        rows = self._rows(f, self.width, "latents")
        if self.module.config.skip and x is None:
            raise UnmergeError("this transcoder has a linear skip path from its inputs: pass them, decode(f, x)")
        inputs = None if x is None else self._rows(x, self.dim, "inputs")
        out = self.module.decode(rows, inputs)
        return out.reshape(*f.shape[:-1], out.shape[-1]).to(f.device)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """The dictionary's reconstruction of activations `x` `(..., d)` (a transcoder's prediction of the
        module's output), `module(x)[0]`.

        Example:
            >>> error = (sae.reconstruct(x) - x).square().mean()
        """
        out = self.module(self._rows(x, self.dim, "activations"))[0]
        return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.device)

    @torch.no_grad()
    def metrics(self, data: Tensor | Iterable[Tensor] | None = None) -> dict[str, float]:
        """Without `data`, the final metrics of training (`final_metrics`). With activations `(..., d)` (a tensor
        or a list of tensors; a transcoder's: a pair `(inputs, outputs)`), their reconstruction and sparsity:
        `fvu`, `reconstruction_cosine`, `norm_ratio`, `l0` (as in `metrics.json`).

        Example:
            >>> sae.metrics(held_out)["fvu"], sae.metrics(held_out)["l0"]
        """
        if data is None:
            return dict(self.final_metrics)
        if self.transcoder:
            if not (isinstance(data, (tuple, list)) and len(data) == 2):
                raise UnmergeError("a transcoder is scored on a pair (inputs, outputs): metrics((x, y))")
            x, target = self._rows(data[0], self.dim, "inputs"), data[1]
            target = self._rows(target, self.module.W_d.shape[1], "outputs")
        else:
            batches = [data] if isinstance(data, Tensor) else list(data)
            x = target = torch.cat([self._rows(batch, self.dim, "activations") for batch in batches])
        if len(x) != len(target):
            raise UnmergeError(f"{len(x)} input rows but {len(target)} output rows: give one output per input")
        reconstruction, f, _ = self.module(x)
        return {
            "fvu": scores.fvu(target, reconstruction),
            "reconstruction_cosine": scores.reconstruction_cosine(target, reconstruction),
            "norm_ratio": scores.norm_ratio(target, reconstruction),
            "l0": scores.l0(f),
        }

    def save(self, path: str | Path) -> Path:
        """Write the files of a finished `unmerge train-dictionary` run into `path` (`config.yaml`,
        `dictionary.safetensors`, `metrics.json`, `report.html`), which must be empty or hold this same run;
        returns `path`. A dictionary trained in `path` (`run_dir=path`) is there already.

        Example:
            >>> sae.save("runs/my-sae")  # then unmerge.Dictionary.load("runs/my-sae")
        """
        path = Path(path)
        if self.run_dir is not None and path.resolve() == self.run_dir.resolve():
            return path
        with runs.saving(self.config, path):
            state = {name: value for name, value in self.module.state_dict().items() if name not in TRAINING_BUFFERS}
            save_tensors_atomic(path / runs.DICTIONARY_FILE, state)
            truth = None if self.run_dir is None else self.run_dir / runs.GROUND_TRUTH_FILE
            if truth is not None and truth.is_file():
                shutil.copyfile(truth, path / runs.GROUND_TRUTH_FILE)
            publish(path, f"Dictionary: {self.config.name}", self.final_metrics, [])
        return path

    @classmethod
    def load(cls, path: str | Path) -> Dictionary:
        """Load the finished dictionary run directory `path`: from `unmerge train-dictionary`, `train_dictionary(...,
        run_dir=...)` or `save`. Needs no model or data (the dictionary is self-contained).

        Example:
            >>> sae = unmerge.Dictionary.load("runs/sparse-512-topk")
        """
        path = Path(path)
        config = runs.saved_config(path, DictionaryRunConfig)
        if isinstance(config.data, OwnActivationsConfig) and not (path / runs.DICTIONARY_FILE).is_file():
            raise ConfigError(
                f"{path} has not finished training; rerun the same unmerge.train_dictionary(..., run_dir="
                f"{str(path)!r}) call to resume and finish it"
            )
        config, module = load_dictionary(path)
        metrics = runs.read_metrics(path) if (path / runs.METRICS_FILE).is_file() else {}
        return cls(module, config, path, metrics)

    def to_saelens(self, path: str | Path) -> Path:
        """Write the dictionary in SAELens's format (`cfg.json`, `sae_weights.safetensors`; `hook_name` is the
        hook) into `path`; `sae_lens.SAE.load_from_disk(path)` reads it. Returns `path`.

        Example:
            >>> sae.to_saelens("exports/my-sae")
        """
        return save_saelens(self.module, Path(path), hook_name=self.hook, model_name=self.config.name)
