"""What a dictionary trains on: synthetic activations with known features (sparse features, the absorption
hierarchy), the activations of a toy target at one module, or a language model's at one hook point."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from unmerge.config.base import Seed, StrictModel
from unmerge.config.targets import LanguageModelConfig, TargetConfig, TextConfig


class SparseFeaturesConfig(StrictModel):
    """Synthetic activations: sparse non-negative combinations of known unit-norm directions (DESIGN.md §6)."""

    kind: Literal["sparse_features"] = "sparse_features"
    n_features: PositiveInt = Field(512, description="true features")
    dim: PositiveInt = Field(256, description="activation dimension d")
    mean_active: PositiveFloat = Field(5.0, description="expected number of firing features per sample")
    decay: Annotated[float, Field(gt=0.0, le=1.0)] = Field(0.99, description="p_i ∝ decay^i")
    correlated: bool = Field(False, description="correlate firing through a Gaussian copula")
    correlation_rank: PositiveInt = Field(16, description="rank of the copula's random correlation factor")
    seed: Seed = Field(0, description="fixes the directions and correlations")

    @model_validator(mode="after")
    def _expected_count_fits(self) -> SparseFeaturesConfig:
        if self.mean_active > self.n_features:
            raise ValueError(f"mean_active {self.mean_active} exceeds n_features {self.n_features}")
        return self


class HierarchyConfig(StrictModel):
    """The absorption toy: orthogonal features where each child fires only together with its parent
    (DESIGN.md §6, issue #3). With the defaults: 3 parents × 3 children + 8 independent = 20 features in R^20."""

    kind: Literal["hierarchy"] = "hierarchy"
    n_parents: PositiveInt = Field(3, description="parent features")
    children_per_parent: PositiveInt = Field(3, description="children of each parent (at most one fires at a time)")
    n_independent: NonNegativeInt = Field(8, description="features without parent or children")
    parent_probability: Annotated[float, Field(gt=0.0, le=1.0)] = Field(0.15, description="P(a parent fires)")
    child_probability: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        0.6, description="P(one of its children fires | the parent fires); the child is chosen uniformly"
    )
    independent_probability: Annotated[float, Field(gt=0.0, le=1.0)] = Field(0.1, description="P(fires)")
    magnitude_spread: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        0.0, description="a firing feature's coefficient is U[1 − spread, 1 + spread] (0: always 1)"
    )
    seed: Seed = Field(0, description="fixes the random orthonormal directions")

    @property
    def n_features(self) -> int:
        return self.n_parents * (1 + self.children_per_parent) + self.n_independent


class TargetActivationsConfig(StrictModel):
    """Activations of a toy target at one module's output (e.g. TMS's hidden layer `linear1`), for a dictionary
    scored against the same ground truth as SPD on that target's weights."""

    kind: Literal["target_activations"] = "target_activations"
    target: TargetConfig
    hook: str = Field(description="name of the module whose output is recorded (as in model.named_modules())")
    transcoder: bool = Field(
        False, description="record the module's input and output: a transcoder encodes the one, decodes the other"
    )


class LanguageActivationsConfig(StrictModel):
    """Activations of a language model at one hook point (a module's output, e.g. `model.layers.15`: the residual
    stream after block 15) on text windows, BOS and other special tokens excluded by id. With `cache_tokens` they
    are cached on disk once (resumable, integrity-checked) and dictionaries sample from the cache; without,
    they are recorded straight from the model for every batch. Evaluation splices the dictionary in on held-out
    windows (FVU, L0, CE, KL, CE recovered against zero and mean ablation)."""

    kind: Literal["lm_activations"] = "lm_activations"
    model: LanguageModelConfig = LanguageModelConfig()
    text: TextConfig = TextConfig()
    hook: str = Field(min_length=1, description="module whose output is recorded (as in model.named_modules())")
    cache_tokens: PositiveInt | None = Field(
        1_048_576, description="tokens to cache from the training windows (None: record from the model every batch)"
    )
    cache_dtype: Literal["float32", "float16"] = Field("float32", description="how cached activations are stored")
    cache_dir: str | None = Field(
        None, description="where the cache lives (default: keyed by these settings under UNMERGE_CACHE_DIR/activations)"
    )
    shard_tokens: PositiveInt = Field(65_536, description="rows per cache shard")
    stream_shards: PositiveInt | None = Field(
        None,
        description="train from the cache streamed from disk, this many shards shuffled in memory at a time "
        "(each row once per epoch; for caches larger than memory); unset: read the whole cache into memory",
    )
    record_batch: PositiveInt = Field(32, description="windows per forward pass while recording")
    eval_tokens: PositiveInt = Field(8_192, description="held-out tokens for the spliced-in evaluation")


class OwnActivationsConfig(StrictModel):
    """Activations passed from Python (`unmerge.train_dictionary`): recorded at `hook` of a model passed with its
    data, or given directly. Like an own model's SPD run, the run is reloaded in Python, not by the command line."""

    kind: Literal["own_activations"] = "own_activations"
    hook: str | None = Field(None, description="the module whose output was recorded (None: activations given)")
    model: str | None = Field(None, description="the model's class and parameter count (None: activations given)")
    weights: str | None = Field(None, description="sha256 of the model's parameters and buffers, by name")
    data: str = Field(description="what was recorded or given: a tensor's shape, dtype and sha256, or an iterable")
    transcoder: bool = Field(False, description="the hooked module's input and output were recorded (a transcoder)")


DictionaryDataConfig = (
    SparseFeaturesConfig | HierarchyConfig | TargetActivationsConfig | LanguageActivationsConfig | OwnActivationsConfig
)
