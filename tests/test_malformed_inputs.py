"""Malformed user inputs, tried as a new user would: configs, overrides, files, `--out` directories and damaged run
directories, run in-process through `unmerge.cli.main`. Every case must exit with a non-zero status and one message
that names the problem (no traceback), fail before any training starts, and leave existing run directories as they
were (issue 23: 8 of 100 such inputs gave tracebacks and 4 were silently accepted).

A tiny finished SPD run and dictionary run are built once for the module; cases that damage a run damage a copy.
Training is replaced by a sentinel (`_TrainingStarted`) for the cases, so an input that is silently accepted fails
at once instead of training."""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file

from tests.conftest import TINY_TMS
from unmerge import api, cli
from unmerge.io import sha256_file

OUT = "<new directory>"  # in the argv of a copy's command: a new directory
TINY_DICT = ["train.steps=20", "train.checkpoint_every=10", "train.eval_batch_size=512", "train.keep_checkpoints=1"]
# the shared SPD run keeps its newest checkpoint alone: damaging it leaves none to fall back on (a run with an older
# good checkpoint resumes from that one with a warning: tests/test_reliability.py)
SHARED_SPD = [*TINY_TMS, "train.keep_checkpoints=1"]
CHECKPOINT = "checkpoints/step-0000060"  # the SPD run's newest checkpoint (TINY_TMS: 60 steps)
DICT_CHECKPOINT = "checkpoints/step-0000020"
PNG_BYTES = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\xfd"
NOT_UTF8 = b"name: tms-5-2\n\xff\xfe\xfa\xc3\x28: 1\n"
HUGE = str(10**13)  # far beyond any memory: an allocation of this size fails at once rather than swapping


class _TrainingStarted(BaseException):
    """Raised in place of the first training step: the input was accepted. A BaseException, so that no handler of
    ordinary errors in the code under test can turn it into an error message."""


@dataclass
class Runs:
    spd: Path
    dictionary: Path


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    """One finished SPD run (TMS 5-2, 60 steps) and one finished dictionary run (hierarchy toy, 20 steps); their
    toy target is trained into the session's cache (the one `isolated_cache` points every test at)."""
    cache = tmp_path_factory.getbasetemp() / "unmerge-cache"
    root = tmp_path_factory.mktemp("shared")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNMERGE_CACHE_DIR", str(cache))
        api.decompose(api.load_run_config("tms-5-2", SHARED_SPD), root / "runone")
        api.train_dictionary(api.load_dictionary_config("hierarchy-relu-l1", TINY_DICT), root / "runtwo")
    yield Runs(root / "runone", root / "runtwo")


def _snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every path under `directory` (folders as None) with its bytes."""
    return {
        str(path.relative_to(directory)): path.read_bytes() if path.is_file() else None
        for path in sorted(directory.rglob("*"))
    }


@dataclass
class Case:
    """What a case's argv is built from: its own folder, the shared finished runs, and the run directories that
    must not change (the shared ones, and any copy or folder the case made)."""

    root: Path
    runs: Runs
    watched: list[Path] = field(default_factory=list)

    @property
    def spd(self) -> str:
        return str(self.runs.spd)

    @property
    def dictionary(self) -> str:
        return str(self.runs.dictionary)

    def out(self, name: str = "out") -> str:
        """A new (not yet existing) directory."""
        return str(self.root / name)

    def file(self, name: str, content: str | bytes) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return str(path)

    def folder(self, name: str) -> str:
        """An existing directory that is not a run directory (it holds someone's notes); watched."""
        path = self.root / name
        path.mkdir()
        (path / "notes.txt").write_text("my notes\n")
        self.watched.append(path)
        return str(path)

    def copy(self, run: Path, name: str = "run", edit: Callable[[Path], None] | None = None) -> str:
        """A copy of a finished run, damaged by `edit`; watched from then on."""
        path = self.root / name
        shutil.copytree(run, path)
        if edit is not None:
            edit(path)
        self.watched.append(path)
        return str(path)

    def spd_copy(self, edit: Callable[[Path], None] | None = None, name: str = "run") -> str:
        return self.copy(self.runs.spd, name, edit)

    def dictionary_copy(self, edit: Callable[[Path], None] | None = None, name: str = "run") -> str:
        return self.copy(self.runs.dictionary, name, edit)


Build = Callable[[Case], list[str]]


# ---- builders: the command lines of the table ------------------------------------------------------------------------


def spd(*extra: str) -> Build:
    """`decompose` of the shared run's config (its target is cached) into a new directory, plus `extra`."""
    return lambda c: ["decompose", "tms-5-2", "--out", c.out(), *TINY_TMS, *extra]


def dictionary(*extra: str) -> Build:
    return lambda c: ["train-dictionary", "hierarchy-relu-l1", "--out", c.out(), *TINY_DICT, *extra]


def spd_file(content: str | bytes, name: str = "bad.yaml") -> Build:
    return lambda c: ["decompose", c.file(name, content), "--out", c.out()]


def _saved_config(run: Path) -> dict[str, Any]:
    return yaml.safe_load((run / "config.yaml").read_text())


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(leaf)] = value
    else:
        node[leaf] = value


def spd_yaml(key: str, value: Any) -> Build:
    """`decompose` of a YAML file: the shared SPD run's config with `key` set to `value`."""

    def build(c: Case) -> list[str]:
        data = copy.deepcopy(_saved_config(c.runs.spd))
        _set(data, key, value)
        return ["decompose", c.file("my-config.yaml", yaml.safe_dump(data)), "--out", c.out()]

    return build


def dictionary_yaml(key: str, value: Any) -> Build:
    def build(c: Case) -> list[str]:
        data = copy.deepcopy(_saved_config(c.runs.dictionary))
        _set(data, key, value)
        return ["train-dictionary", c.file("my-config.yaml", yaml.safe_dump(data)), "--out", c.out()]

    return build


def spd_yaml_text(append: str) -> Build:
    """`decompose` of the shared SPD run's config.yaml with text appended (e.g. a key given twice)."""

    def build(c: Case) -> list[str]:
        text = (c.runs.spd / "config.yaml").read_text() + append
        return ["decompose", c.file("my-config.yaml", text), "--out", c.out()]

    return build


def on_spd_copy(command: str, edit: Callable[[Path], None] | None = None, *args: str) -> Build:
    """`command` on a (damaged) copy of the SPD run; `OUT` in `args` stands for a new directory."""
    return lambda c: [command, c.spd_copy(edit), *(c.out("edited") if arg == OUT else arg for arg in args)]


def on_dictionary_copy(command: str, edit: Callable[[Path], None] | None = None, *args: str) -> Build:
    return lambda c: [command, c.dictionary_copy(edit), *(c.out("edited") if arg == OUT else arg for arg in args)]


def resume(edit: Callable[[Path], None]) -> Build:
    """Rerun the shared run's own command on a damaged copy (which resumes it)."""
    return lambda c: ["decompose", "tms-5-2", "--out", c.spd_copy(edit), *SHARED_SPD]


# ---- damage done to copies -------------------------------------------------------------------------------------------


def write(relative: str, content: str | bytes) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        path = run / relative
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)

    return edit


def delete(relative: str) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        path = run / relative
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return edit


def truncate(relative: str, keep: int = 100) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        path = run / relative
        path.write_bytes(path.read_bytes()[:keep])

    return edit


def state(change: Callable[[dict[str, Any]], Any], rehash: bool = False) -> Callable[[Path], None]:
    """Rewrite the newest checkpoint's state.json as `change(state)` returns it (the state itself if it returns
    None); with `rehash`, its weights checksum is recomputed first (after the weights were replaced)."""

    def edit(run: Path) -> None:
        path = run / CHECKPOINT / "state.json"
        data = json.loads(path.read_text())
        if rehash:
            data["weights_sha256"] = sha256_file(run / CHECKPOINT / "weights.safetensors")
        changed = change(data)
        path.write_text(json.dumps(data if changed is None else changed))

    return edit


def then(*edits: Callable[[Path], None]) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        for each in edits:
            each(run)

    return edit


def foreign_weights(run: Path) -> None:
    """Replace the newest checkpoint's weights by a valid safetensors file of another model."""
    save_file({"other.weight": torch.zeros(3, 3)}, str(run / CHECKPOINT / "weights.safetensors"))


def config_key(key: str, value: Any) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        data = _saved_config(run)
        _set(data, key, value)
        (run / "config.yaml").write_text(yaml.safe_dump(data))

    return edit


def _sweep_spec(content: str | bytes) -> Build:
    return lambda c: ["sweep", c.file("my-sweep.yaml", content), "--out", c.out()]


def case(name: str, build: Build, expected: str, skip_as_root: bool = False) -> Any:  # a pytest ParameterSet
    marks: list[pytest.MarkDecorator] = []
    if skip_as_root:
        marks.append(
            pytest.mark.skipif(
                hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only directories"
            )
        )
    return pytest.param(build, expected, id=name, marks=marks)


def _read_only(c: Case) -> str:
    path = Path(c.out("locked"))
    path.mkdir()
    path.chmod(0o500)
    return str(path / "run")


CASES = [
    # ---- config files --------------------------------------------------------------------------------------------
    case("cfg-not-utf8", spd_file(NOT_UTF8), "bad.yaml"),
    case("cfg-png-image", spd_file(PNG_BYTES, "weights.png"), "weights.png"),
    case("cfg-not-yaml", spd_file("{{{"), "bad.yaml"),
    case("cfg-unclosed-list", spd_file("method:\n  sites: [linear1\n"), "bad.yaml"),
    case("cfg-tab-indent", spd_file("train:\n\tsteps: 5\n"), "bad.yaml"),
    case("cfg-python-tag", spd_file("name: !!python/object:os.system ls\n"), "bad.yaml"),
    case("cfg-yaml-list", spd_file("- name\n- target\n"), "mapping"),
    case("cfg-yaml-scalar", spd_file("42\n"), "mapping"),
    case("cfg-empty-file", spd_file(""), "bad.yaml"),
    case("cfg-comments-only", spd_file("# nothing here\n"), "bad.yaml"),
    case("cfg-missing-file", lambda c: ["decompose", c.out("nope.yaml"), "--out", c.out()], "nope.yaml"),
    case("cfg-is-a-directory", lambda c: ["decompose", c.folder("myconfig.yaml"), "--out", c.out()], "directory"),
    case("cfg-unknown-preset", lambda c: ["decompose", "tms-5-3", "--out", c.out()], "tms-5-3"),
    case("cfg-dictionary-preset-to-decompose", lambda c: ["decompose", "hierarchy-relu-l1"], "hierarchy-relu-l1"),
    case("cfg-spd-preset-to-train-dictionary", lambda c: ["train-dictionary", "tms-5-2"], "tms-5-2"),
    case(
        "cfg-dictionary-yaml-to-decompose",
        lambda c: ["decompose", str(c.runs.dictionary / "config.yaml"), "--out", c.out()],
        "train-dictionary",
    ),
    case("cfg-unknown-top-level-key", spd_yaml("colour", "red"), "colour"),
    case("cfg-unknown-target-key", spd_yaml("target.n_feature", 5), "target.n_feature"),
    case("cfg-unknown-target-optim-key", spd_yaml("target.train.optim.momentum", 0.9), "momentum"),
    case("cfg-unknown-method-key", spd_yaml("method.sitez", []), "method.sitez"),
    case("cfg-unknown-site-key", spd_yaml("method.sites.0.rank", 3), "rank"),
    case("cfg-unknown-train-key", spd_yaml("train.stepz", 3), "train.stepz"),
    case("cfg-unknown-train-optim-key", spd_yaml("train.optim.lrr", 0.1), "lrr"),
    case("cfg-string-for-int", spd_yaml("train.steps", "sixty"), "train.steps"),
    case("cfg-list-for-float", spd_yaml("train.optim.lr", [0.1]), "train.optim.lr"),
    case("cfg-dict-for-string", spd_yaml("name", {"a": 1}), "name"),
    case("cfg-int-for-list", spd_yaml("method.sites", 5), "method.sites"),
    case("cfg-scalar-for-section", spd_yaml("train", 5), "train"),
    case("cfg-null-method", spd_yaml("method", None), "method"),
    case("cfg-duplicate-key", spd_yaml_text("train:\n  steps: 70\n  batch_size: 256\n"), "'train'"),
    case("cfg-duplicate-site-pattern", spd_yaml("method.sites.1.pattern", "linear1"), "linear1"),
    case("cfg-unknown-target-kind", spd_yaml("target.kind", "mlp"), "target"),
    case("cfg-unknown-method-kind", spd_yaml("method.kind", "vpd"), "method.kind"),
    # ---- config values through overrides -------------------------------------------------------------------------
    case("val-bool-for-steps", spd("train.steps=true"), "train.steps"),
    case("val-bool-for-C", spd("method.sites.0.C=true"), "method.sites.0.C"),
    case("val-bool-for-log-every", spd("train.log_every=true"), "train.log_every"),
    case("val-false-for-batch-size", spd("train.batch_size=false"), "train.batch_size"),
    case("val-int-for-bool", spd("target.identity=2"), "target.identity"),
    case("val-word-for-bool", spd("target.identity=maybe"), "target.identity"),
    case("val-zero-steps", spd("train.steps=0"), "train.steps"),
    case("val-negative-steps", spd("train.steps=-5"), "train.steps"),
    case("val-zero-batch-size", spd("train.batch_size=0"), "train.batch_size"),
    case("val-zero-C", spd("method.sites.0.C=0"), "C"),
    case("val-zero-ci-hidden", spd("method.ci_hidden=0"), "method.ci_hidden"),
    case("val-zero-log-every", spd("train.log_every=0"), "train.log_every"),
    case("val-zero-keep-checkpoints", spd("train.keep_checkpoints=0"), "train.keep_checkpoints"),
    case("val-negative-checkpoint-every", spd("train.checkpoint_every=-1"), "train.checkpoint_every"),
    case("val-negative-warmup", spd("train.optim.warmup_steps=-1"), "train.optim.warmup_steps"),
    case("val-zero-n-features", spd("target.n_features=0"), "target.n_features"),
    case("val-zero-pnorm", spd("method.pnorm=0"), "method.pnorm"),
    case("val-leak-one", spd("method.leak=1"), "method.leak"),
    case("val-probability-zero", spd("target.feature_probability=0"), "target.feature_probability"),
    case(
        "val-probability-above-one",
        spd("target.feature_probability=1.5"),
        "target.feature_probability",
    ),
    case("val-float-steps", spd("train.steps=60.5"), "train.steps"),
    case("val-float-batch-size", spd("train.batch_size=2.5"), "train.batch_size"),
    case("val-float-C", spd("method.sites.0.C=2.5"), "method.sites.0.C"),
    case("val-float-seed", spd("train.seed=0.5"), "train.seed"),
    case("val-list-for-steps", spd("train.steps=[60]"), "train.steps"),
    case("val-dict-for-steps", spd("train.steps={a: 1}"), "train.steps"),
    case("val-null-name", spd("name="), "name"),
    case("val-nan-lr", spd("train.optim.lr=.nan"), "train.optim.lr"),
    case(
        "val-inf-lr",
        spd("train.optim.lr=.inf"),
        "train.optim.lr",
    ),
    case("val-negative-inf-lr", spd("train.optim.lr=-.inf"), "train.optim.lr"),
    case(
        "val-inf-weight-decay",
        spd("train.optim.weight_decay=.inf"),
        "train.optim.weight_decay",
    ),
    case("val-nan-weight-decay", spd("train.optim.weight_decay=.nan"), "train.optim.weight_decay"),
    case(
        "val-inf-minimality-coeff",
        spd("method.importance_minimality_coeff=.inf"),
        "method.importance_minimality_coeff",
    ),
    case("val-nan-faithfulness-coeff", spd("method.faithfulness_coeff=.nan"), "method.faithfulness_coeff"),
    case(
        "val-inf-recon-coeff",
        spd("method.stochastic_recon_coeff=.inf"),
        "method.stochastic_recon_coeff",
    ),
    case("val-nan-final-lr-fraction", spd("train.optim.final_lr_fraction=.nan"), "final_lr_fraction"),
    case(
        "val-lr-1e400",
        spd("train.optim.lr=1e400"),
        "train.optim.lr",
    ),
    case(
        "val-seed-2-pow-64",
        spd(f"train.seed={2**64}"),
        "train.seed",
    ),
    case("val-negative-seed-flag", lambda c: ["decompose", "tms-5-2", "--seed", "-1", "--dry-run"], "train.seed"),
    case(
        "val-huge-C",
        spd(f"method.sites=[{{pattern: linear1, C: {HUGE}}}, {{pattern: linear2, C: {HUGE}}}]"),
        "memory",
    ),
    case("val-huge-batch-size", spd(f"train.batch_size={HUGE}"), "memory"),
    case(
        "val-huge-eval-batch-size",
        spd(f"train.eval_batch_size={HUGE}"),
        "memory",
    ),
    case("val-site-matches-nothing", spd("method.sites=[{pattern: nope, C: 3}]"), "nope"),
    case("val-site-empty-pattern", spd("method.sites=[{pattern: '', C: 3}]"), "pattern"),
    case("val-no-sites", spd("method.sites=[]"), "method.sites"),
    case("val-site-matches-nothing-dry-run", spd("--dry-run", "method.sites.0.pattern=nope"), "nope"),
    case("val-unknown-device", spd("train.device=gpu"), "train.device"),
    case("val-absent-cuda-device", spd("train.device=cuda:99"), "CUDA device"),
    case("val-unknown-precision", spd("train.precision=fp16"), "train.precision"),
    case("val-unknown-schedule", spd("train.optim.schedule=exponential"), "train.optim.schedule"),
    case("val-unknown-logger", spd("train.loggers=[mlflow]"), "train.loggers"),
    case("val-unknown-ci-function", spd("method.ci_function=big"), "method.ci_function"),
    case("val-unknown-ci-kernel", spd("method.ci_kernel=gpu"), "method.ci_kernel"),
    case("val-kl-loss-on-tms", spd("method.output_loss=kl"), "output_loss"),
    case("val-adversarial-coeff-without-steps", spd("method.adversarial_recon_coeff=1"), "adversarial_steps"),
    case("val-zero-adversarial-step-size", spd("method.adversarial_step_size=0"), "adversarial_step_size"),
    # ---- overrides -----------------------------------------------------------------------------------------------
    case("ovr-missing-equals-after-options", spd("train.steps"), "train.steps"),
    case(
        "ovr-missing-equals-before-options",
        lambda c: ["decompose", "tms-5-2", "train.steps", "--dry-run"],
        "key.path=value",
    ),
    case("ovr-empty-key", spd("=5"), "key.path=value"),
    case("ovr-unknown-section", spd("nosuch.section.key=1"), "nosuch"),
    case("ovr-descend-into-value", spd("train.optim.lr.x=1"), "lr"),
    case("ovr-list-index-out-of-range", spd("method.sites.9.C=3"), "'9'"),
    case("ovr-negative-list-index", spd("method.sites.-1.C=3"), "'-1'"),
    case("ovr-steps-1e400", spd("train.steps=1e400"), "train.steps"),
    case("ovr-steps-word", spd("train.steps=ten"), "train.steps"),
    case("ovr-malformed-yaml-value", spd("method.sites=[{pattern: linear1, C: 3}"), "not valid YAML"),
    case("ovr-steps-flag-word", lambda c: ["decompose", "tms-5-2", "--steps", "ten"], "--steps"),
    case("ovr-steps-flag-zero", lambda c: ["decompose", "tms-5-2", "--steps", "0", "--dry-run"], "train.steps"),
    case("ovr-seed-flag-word", lambda c: ["decompose", "tms-5-2", "--seed", "abc"], "--seed"),
    case("ovr-unknown-flag", lambda c: ["decompose", "tms-5-2", "--outt", c.out()], "--outt"),
    case("ovr-no-out", lambda c: ["decompose", "tms-5-2", *TINY_TMS], "--out"),
    case("ovr-no-command", lambda c: [], "command"),
    case("ovr-unknown-command", lambda c: ["decompse", "tms-5-2"], "decompse"),
    # ---- dictionary configs --------------------------------------------------------------------------------------
    case("dict-unknown-activation", dictionary("method.activation=softmax"), "activation"),
    case("dict-topk-without-k", dictionary("method.activation=topk"), "k"),
    case("dict-k-above-width", dictionary("method.activation=topk", "method.k=100"), "width"),
    case("dict-k-on-relu", dictionary("method.k=4"), "method.k"),
    case("dict-prefixes-not-increasing", dictionary("method.matryoshka_prefixes=[10, 5]"), "matryoshka_prefixes"),
    case("dict-unknown-penalty", dictionary("method.penalty.name=l3"), "method.penalty.name"),
    case("dict-negative-penalty-coeff", dictionary("method.penalty.coeff=-1"), "method.penalty.coeff"),
    case(
        "dict-inf-penalty-coeff",
        dictionary("method.penalty.coeff=.inf"),
        "method.penalty.coeff",
    ),
    case("dict-unknown-penalty-key", dictionary_yaml("method.penalty.coef", 0.1), "coef"),
    case("dict-unknown-data-key", dictionary_yaml("data.n_parent", 3), "n_parent"),
    case("dict-unknown-data-kind", dictionary("data.kind=images"), "data"),
    case("dict-zero-width", dictionary("method.width=0"), "method.width"),
    case("dict-huge-width", dictionary(f"method.width={HUGE}"), "memory"),
    case("dict-probability-above-one", dictionary("data.parent_probability=2"), "parent_probability"),
    case("dict-skip-without-transcoder", dictionary("method.skip=true"), "method.skip"),
    case("dict-beta2-one", dictionary("train.optim.beta2=1"), "beta2"),
    case("dict-unknown-init", dictionary("method.init=zeros"), "method.init"),
    case("dict-zero-dead-window", dictionary("method.dead_window=0"), "dead_window"),
    # ---- --out -----------------------------------------------------------------------------------------------------
    case("out-is-a-file", lambda c: [*spd()(c)[:2], "--out", c.file("results.txt", "x"), *TINY_TMS], "results.txt"),
    case(
        "out-under-a-file",
        lambda c: [*spd()(c)[:2], "--out", c.file("results.txt", "x") + "/sub", *TINY_TMS],
        "results.txt",
    ),
    case(
        "out-read-only-directory",
        lambda c: ["decompose", "tms-5-2", "--out", _read_only(c), *TINY_TMS],
        "writable",
        skip_as_root=True,
    ),
    case("out-not-a-run-directory", lambda c: ["decompose", "tms-5-2", "--out", c.folder("notes"), *TINY_TMS], "notes"),
    case(
        "out-run-of-another-config",
        lambda c: ["decompose", "tms-5-2", "--out", c.spd, *SHARED_SPD, "train.steps=80"],
        "different config",
    ),
    case(
        "out-spd-run-for-dictionary",
        lambda c: ["train-dictionary", "hierarchy-relu-l1", "--out", c.spd, *TINY_DICT],
        "holds an SPD run",
    ),
    case(
        "out-dictionary-run-for-spd",
        lambda c: ["decompose", "tms-5-2", "--out", c.dictionary, *TINY_TMS],
        "holds a dictionary run",
    ),
    case(
        "out-dictionary-run-another-config",
        lambda c: ["train-dictionary", "hierarchy-relu-l1", "--out", c.dictionary, *TINY_DICT, "method.width=21"],
        "different config",
    ),
    case(
        "out-empty-path",
        lambda c: ["decompose", "tms-5-2", "--out", "", *TINY_TMS],
        "--out",
    ),
    case("out-demo-is-a-file", lambda c: ["demo", "--out", c.file("demo.txt", "x")], "demo.txt"),
    # ---- other commands --------------------------------------------------------------------------------------------
    case("evaluate-missing-dir", lambda c: ["evaluate", c.out("nowhere")], "nowhere"),
    case("evaluate-not-a-run", lambda c: ["evaluate", c.folder("notes")], "notes"),
    case("evaluate-a-file", lambda c: ["evaluate", c.file("results.txt", "x")], "results.txt"),
    case("evaluate-spd-no-checkpoints", on_spd_copy("evaluate", delete("checkpoints")), "checkpoint"),
    case("evaluate-dictionary-no-metrics", on_dictionary_copy("evaluate", delete("metrics.json")), "metrics.json"),
    case(
        "evaluate-dictionary-no-weights",
        on_dictionary_copy("evaluate", delete("dictionary.safetensors")),
        "has not finished",
    ),
    case("report-missing-dir", lambda c: ["report", c.out("nowhere"), "--out", c.out()], "nowhere"),
    case("report-not-a-run", lambda c: ["report", c.folder("notes"), "--out", c.out()], "notes"),
    case("report-no-runs", lambda c: ["report", "--out", c.out()], "RUN_DIR"),
    case(
        "report-metrics-not-json",
        lambda c: ["report", c.spd_copy(write("metrics.json", "{not json")), "--out", c.out()],
        "metrics.json",
    ),
    case(
        "report-metrics-a-list",
        lambda c: ["report", c.spd_copy(write("metrics.json", "[1, 2]")), "--out", c.out()],
        "metrics.json",
    ),
    case(
        "report-metrics-not-utf8",
        lambda c: ["report", c.spd_copy(write("metrics.json", NOT_UTF8)), "--out", c.out()],
        "metrics.json",
    ),
    case(
        "report-out-is-a-file",
        lambda c: ["report", c.spd, "--out", c.file("index.txt", "x")],
        "index.txt",
    ),
    case("group-missing-dir", lambda c: ["group", c.out("nowhere")], "nowhere"),
    case("group-dictionary-run", on_dictionary_copy("group"), "dictionary run"),
    case("group-negative-alpha", on_spd_copy("group", None, "--alpha", "-1"), "alpha"),
    case("group-nan-alpha", on_spd_copy("group", None, "--alpha", "nan"), "alpha"),
    case("group-zero-inputs", on_spd_copy("group", None, "--inputs", "0"), "inputs"),
    case("group-negative-min-active", on_spd_copy("group", None, "--min-active", "-5"), "min-active"),
    case("group-threshold-above-one", on_spd_copy("group", None, "--threshold", "2"), "threshold"),
    case("group-inputs-word", on_spd_copy("group", None, "--inputs", "many"), "--inputs"),
    case("unlearn-unknown-site", on_spd_copy("unlearn", None, "--units", "nope/3", "--out", OUT), "nope"),
    case(
        "unlearn-index-out-of-range",
        on_spd_copy("unlearn", None, "--units", "linear1/999", "--out", OUT),
        "999",
    ),
    case("unlearn-unit-without-index", on_spd_copy("unlearn", None, "--units", "linear1", "--out", OUT), "linear1"),
    case(
        "unlearn-component-without-grouping",
        on_spd_copy("unlearn", None, "--component", "0", "--out", OUT),
        "grouping.json",
    ),
    case(
        "unlearn-grouping-not-json",
        on_spd_copy("unlearn", write("grouping.json", "{oops"), "--component", "0", "--out", OUT),
        "grouping.json",
    ),
    case(
        "unlearn-component-out-of-range",
        on_spd_copy(
            "unlearn", write("grouping.json", '{"components": [["linear1/0"]]}'), "--component", "3", "--out", OUT
        ),
        "component 3",
    ),
    case("unlearn-nothing-named", on_spd_copy("unlearn", None, "--out", OUT), "--component"),
    case(
        "unlearn-dictionary-run",
        on_dictionary_copy("unlearn", None, "--units", "linear1/0", "--out", OUT),
        "dictionary run",
    ),
    case(
        "unlearn-out-is-a-file",
        lambda c: ["unlearn", c.spd_copy(), "--units", "linear1/0", "--out", c.file("edited.txt", "x")],
        "edited.txt",
    ),
    case(
        "export-saelens-spd-run",
        lambda c: ["export-saelens", c.spd, "--out", c.out()],
        "SPD run",
    ),
    case("export-saelens-missing-dir", lambda c: ["export-saelens", c.out("nowhere"), "--out", c.out()], "nowhere"),
    case(
        "export-saelens-out-is-a-file",
        lambda c: ["export-saelens", c.dictionary, "--out", c.file("sae.txt", "x")],
        "sae.txt",
    ),
    case(
        "export-saelens-truncated-dictionary",
        lambda c: ["export-saelens", c.dictionary_copy(truncate("dictionary.safetensors")), "--out", c.out()],
        "dictionary.safetensors",
    ),
    case(
        "export-saelens-config-width-changed",
        lambda c: ["export-saelens", c.dictionary_copy(config_key("method.width", 21)), "--out", c.out()],
        "dictionary.safetensors",
    ),
    case("train-target-unknown-preset", lambda c: ["train-target", "tms-9-9"], "tms-9-9"),
    case(
        "train-target-out-is-a-file",
        lambda c: ["train-target", "tms-5-2", "target.train.steps=300", "--out", c.file("target.txt", "x")],
        "target.txt",
    ),
    case(
        "train-target-zero-steps",
        lambda c: ["train-target", "tms-5-2", "target.train.steps=0"],
        "target.train.steps",
    ),
    case("train-target-pretrained-lm", lambda c: ["train-target", "smollm2-mlp"], "smollm2-mlp"),
    case("splits-one-run", lambda c: ["splits", c.dictionary, "--out", c.out()], "two"),
    case("splits-missing-dirs", lambda c: ["splits", c.out("nowhere"), c.dictionary, "--out", c.out()], "nowhere"),
    case(
        "splits-spd-runs",
        lambda c: ["splits", c.spd, c.spd_copy(), "--out", c.out()],
        "SPD run",
    ),
    case(
        "splits-same-width",
        lambda c: ["splits", c.dictionary, c.dictionary_copy(), "--out", c.out()],
        "width",
    ),
    case(
        "splits-zero-inputs",
        lambda c: ["splits", c.dictionary, c.dictionary_copy(), "--inputs", "0", "--out", c.out()],
        "inputs",
    ),
    case("cache-activations-toy-data", lambda c: ["cache-activations", "hierarchy-relu-l1"], "lm_activations"),
    case("cache-activations-unknown-preset", lambda c: ["cache-activations", "nope"], "nope"),
    case("sweep-no-grid", lambda c: ["sweep", "hierarchy-relu-l1", "--out", c.out()], "grid"),
    case(
        "sweep-grid-without-equals",
        lambda c: ["sweep", "hierarchy-relu-l1", "--grid", "method.width", "--out", c.out()],
        "method.width",
    ),
    case(
        "sweep-grid-without-values",
        lambda c: ["sweep", "hierarchy-relu-l1", "--grid", "method.width=", "--out", c.out()],
        "--grid",
    ),
    case(
        "sweep-grid-unknown-key",
        lambda c: ["sweep", "hierarchy-relu-l1", "--grid", "method.widht=8,16", "--out", c.out()],
        "widht",
    ),
    case(
        "sweep-grid-invalid-value",
        lambda c: ["sweep", "hierarchy-relu-l1", "--grid", "method.width=0,8", "--out", c.out()],
        "method.width",
    ),
    case(
        "sweep-grid-repeated-value",
        lambda c: ["sweep", "hierarchy-relu-l1", "--grid", "method.width=8,8", "--out", c.out()],
        "more than once",
    ),
    case(
        "sweep-grid-and-override-same-key",
        lambda c: ["sweep", "hierarchy-relu-l1", "--grid", "method.width=8,16", "--out", c.out(), "method.width=4"],
        "method.width",
    ),
    case(
        "sweep-out-is-a-file",
        lambda c: ["sweep", "hierarchy-relu-l1", "--grid", "method.width=8,16", "--out", c.file("sweep.txt", "x")],
        "sweep.txt",
    ),
    case("sweep-spec-grid-a-list", _sweep_spec("base: hierarchy-relu-l1\ngrid: [1, 2]\n"), "grid"),
    case("sweep-spec-no-base", _sweep_spec("grid: {method.width: [8, 16]}\n"), "base"),
    case("sweep-spec-not-utf8", _sweep_spec(NOT_UTF8 + b"grid: {method.width: [8, 16]}\n"), "my-sweep.yaml"),
    # ---- damaged run directories (copies) ------------------------------------------------------------------------
    case(
        "run-state-not-utf8",
        on_spd_copy("evaluate", write(f"{CHECKPOINT}/state.json", NOT_UTF8)),
        "state.json",
    ),
    case(
        "run-state-not-json",
        on_spd_copy("evaluate", write(f"{CHECKPOINT}/state.json", "{step: 60")),
        "state.json",
    ),
    case(
        "run-state-a-list",
        on_spd_copy("evaluate", write(f"{CHECKPOINT}/state.json", "[60]")),
        "state.json",
    ),
    case(
        "run-state-empty-object",
        on_spd_copy("evaluate", write(f"{CHECKPOINT}/state.json", "{}")),
        "step-0000060",
    ),
    case(
        "run-state-without-step",
        on_spd_copy("evaluate", state(lambda s: {k: v for k, v in s.items() if k != "step"})),
        "step-0000060",
    ),
    case(
        "run-state-step-disagrees-with-folder",
        on_spd_copy("evaluate", state(lambda s: s.update(step=37))),
        "37",
    ),
    case(
        "run-weights-truncated",
        on_spd_copy("evaluate", truncate(f"{CHECKPOINT}/weights.safetensors")),
        "step-0000060",
    ),
    case(
        "run-weights-truncated-rehashed",
        on_spd_copy("evaluate", then(truncate(f"{CHECKPOINT}/weights.safetensors"), state(lambda s: None, True))),
        "step-0000060",
    ),
    case(
        "run-weights-of-another-model",
        on_spd_copy("evaluate", then(foreign_weights, state(lambda s: None, True))),
        "step-0000060",
    ),
    case("run-config-not-yaml", on_spd_copy("evaluate", write("config.yaml", "{{{")), "config.yaml"),
    case("run-config-not-utf8", on_spd_copy("evaluate", write("config.yaml", NOT_UTF8)), "config.yaml"),
    case("run-config-a-list", on_spd_copy("evaluate", write("config.yaml", "- a\n")), "config.yaml"),
    case("run-config-empty", on_spd_copy("evaluate", write("config.yaml", "")), "config.yaml"),
    case("run-config-unknown-key", on_spd_copy("evaluate", config_key("train.stepz", 3)), "train.stepz"),
    case("run-config-missing", on_spd_copy("evaluate", delete("config.yaml")), "config.yaml"),
    case(
        "run-target-weights-truncated",
        on_spd_copy("evaluate", truncate("target/model.safetensors")),
        "model.safetensors",
    ),
    case("run-target-config-not-yaml", on_spd_copy("evaluate", write("target/target.yaml", "{{{")), "target.yaml"),
    case("resume-state-a-list", resume(write(f"{CHECKPOINT}/state.json", "[60]")), "state.json"),
    case(
        "resume-weights-truncated",
        resume(truncate(f"{CHECKPOINT}/weights.safetensors")),
        "step-0000060",
    ),
    case("resume-state-step-disagrees", resume(state(lambda s: s.update(step=37))), "37"),
    case(
        "dictionary-config-not-utf8",
        lambda c: ["export-saelens", c.dictionary_copy(write("config.yaml", NOT_UTF8)), "--out", c.out()],
        "config.yaml",
    ),
    case(
        "dictionary-config-topk-without-k",
        lambda c: ["export-saelens", c.dictionary_copy(config_key("method.activation", "topk")), "--out", c.out()],
        "k",
    ),
    case(
        "dictionary-resume-state-not-json",
        lambda c: [
            "train-dictionary",
            "hierarchy-relu-l1",
            "--out",
            c.dictionary_copy(write(f"{DICT_CHECKPOINT}/state.json", "nope")),
            *TINY_DICT,
        ],
        "state.json",
    ),
]


def _stop_training(*args: object, **kwargs: object) -> None:
    raise _TrainingStarted("the input was accepted: training started")


@pytest.mark.parametrize(("build", "expected"), CASES)
def test_malformed_input_is_one_clear_error(
    build: Build,
    expected: str,
    finished_runs: Runs,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = tmp_path_factory.mktemp("case")
    monkeypatch.chdir(root)
    monkeypatch.setattr("unmerge.train.loop.step_loss", _stop_training)
    c = Case(root, finished_runs)
    argv = build(c)
    watched = [finished_runs.spd, finished_runs.dictionary, *c.watched]
    before = {path: _snapshot(path) for path in watched}
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    except _TrainingStarted:
        pytest.fail(f"accepted: training started for {argv}")
    except Exception as error:  # a traceback for the user
        pytest.fail(f"uncaught {type(error).__name__}: {error}")
    captured = capsys.readouterr()
    assert code not in (0, None), f"exit status {code!r}: accepted\n{captured.err[-2000:]}"
    assert "Traceback" not in captured.err + captured.out
    shown = captured.err
    for echoed in sorted((arg for arg in argv if "=" in arg), key=len, reverse=True):
        shown = shown.replace(echoed, "<argument>")  # echoing `key=value` back does not name the problem
    shown = shown.replace(str(root), "<case>").replace(str(tmp_path_factory.getbasetemp()), "<tmp>")
    assert expected.lower() in shown.lower(), f"the message does not name {expected!r}:\n{shown[-2000:]}"
    for path in watched:
        assert _snapshot(path) == before[path], f"{path} changed"
