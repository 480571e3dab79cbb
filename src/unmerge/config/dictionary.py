"""Sparse dictionaries: the activations they train on (synthetic, a toy target's, a language model's), the
sparsity penalty, the dictionary itself, and a dictionary run (data + method + training)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from unmerge.config.base import NonNegativeFloat, StrictModel
from unmerge.config.targets import LanguageModelConfig, TargetConfig, TextConfig
from unmerge.config.training import TrainConfig


class SparseFeaturesConfig(StrictModel):
    """Synthetic activations: sparse non-negative combinations of known unit-norm directions (DESIGN.md §6)."""

    kind: Literal["sparse_features"] = "sparse_features"
    n_features: PositiveInt = Field(512, description="true features")
    dim: PositiveInt = Field(256, description="activation dimension d")
    mean_active: PositiveFloat = Field(5.0, description="expected number of firing features per sample")
    decay: Annotated[float, Field(gt=0.0, le=1.0)] = Field(0.99, description="p_i ∝ decay^i")
    correlated: bool = Field(False, description="correlate firing through a Gaussian copula")
    correlation_rank: PositiveInt = Field(16, description="rank of the copula's random correlation factor")
    seed: NonNegativeInt = Field(0, description="fixes the directions and correlations")

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
    seed: NonNegativeInt = Field(0, description="fixes the random orthonormal directions")

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
    record_batch: PositiveInt = Field(32, description="windows per forward pass while recording")
    eval_tokens: PositiveInt = Field(8_192, description="held-out tokens for the spliced-in evaluation")


DictionaryDataConfig = SparseFeaturesConfig | HierarchyConfig | TargetActivationsConfig | LanguageActivationsConfig

Activation = Literal["relu", "topk", "batchtopk", "jumprelu", "gated"]
PenaltyName = Literal["none", "l1", "lp", "cauchy", "log1p", "tanh"]


class PenaltyConfig(StrictModel):
    """Sparsity penalty on the latents, summed over latents, averaged over the batch (never ÷ width)."""

    name: PenaltyName = Field("l1", description="l1 | lp | cauchy | log1p | tanh | none")
    coeff: NonNegativeFloat = Field(1e-3, description="λ")
    p: Annotated[float, Field(gt=0.0, le=1.0)] = Field(0.5, description="exponent of lp")
    p_final: Annotated[float, Field(gt=0.0, le=1.0)] | None = Field(None, description="anneal p linearly to this")
    epsilon: PositiveFloat = Field(1e-3, description="lp smoothing: (f + ε)^p − ε^p keeps the gradient finite")
    sigma: PositiveFloat = Field(0.1, description="scale of cauchy: log(1 + f²/σ²)")
    scale: PositiveFloat = Field(4.0, description="c of tanh(c·f)")
    decoder_norm_weighted: bool = Field(False, description="multiply each latent by its decoder row norm ‖d_i‖")


class DictionaryConfig(StrictModel):
    """A sparse dictionary (SAE) on activations (DESIGN.md §5)."""

    kind: Literal["dictionary"] = "dictionary"
    width: PositiveInt = Field(description="latents m")
    activation: Activation = Field("relu", description="relu | topk | batchtopk | jumprelu | gated")
    k: PositiveInt | None = Field(None, description="active latents per example for topk / batchtopk")
    penalty: PenaltyConfig = PenaltyConfig()
    aux_k: PositiveInt | None = Field(None, description="AuxK: dead latents used to model the residual (topk)")
    aux_k_coeff: NonNegativeFloat = Field(1 / 32, description="weight of the AuxK loss")
    jumprelu_bandwidth: PositiveFloat = Field(1e-3, description="ε of the rectangle kernel in θ's gradient")
    jumprelu_init_threshold: PositiveFloat = Field(1e-3, description="initial θ")
    l0_coeff: NonNegativeFloat = Field(0.0, description="λ of JumpReLU's L0 penalty Σ H(z − θ)")
    init: Literal["random", "data"] = Field("random", description="decoder atoms random or from data samples")
    init_decoder_norm: PositiveFloat = Field(0.1, description="row norm of a random decoder (encoder = its transpose)")
    decoder_bias_init: Literal["zero", "mean", "geometric_median"] = Field("geometric_median")
    unit_norm_decoder: bool = Field(True, description="renormalise decoder rows to 1 after every step")
    dead_window: PositiveInt = Field(100_000, description="a latent is dead if it has not fired in this many samples")
    matryoshka_prefixes: list[PositiveInt] | None = Field(
        None, description="Matryoshka: also reconstruct from the first m_i latents for each of these widths"
    )
    normalise_activations: bool = Field(
        False, description="train on s·x with s ≈ √d / E‖x‖ (a power of two), folded into the weights at the end"
    )
    refit_magnitudes: bool = Field(
        False, description="also evaluate with magnitudes refitted by least squares on each input's support"
    )
    resample_every: NonNegativeInt = Field(0, description="every N steps, re-initialise dead latents (0: never)")
    resample_until: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        0.5, description="resample only within this fraction of training, so the last part can settle"
    )
    resample_duplicates: bool = Field(
        False, description="also resample a latent whose atom nearly copies an earlier one's (cosine > 0.95)"
    )
    resample_misaligned: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        0.0, description="also resample a latent whose atom_alignment on the resampling inputs is below this (0: off)"
    )
    resample_samples: PositiveInt = Field(8192, description="inputs scored to choose the resampled directions")
    resample_encoder_norm: PositiveFloat = Field(
        0.2, description="a resampled encoder column's norm, as a fraction of the mean live column's norm"
    )
    skip: bool = Field(False, description="transcoders: add a linear skip path x W_skip (zero at the start)")

    @model_validator(mode="after")
    def _consistent(self) -> DictionaryConfig:
        if self.activation in ("topk", "batchtopk"):
            if self.k is None:
                raise ValueError(f"activation {self.activation!r} needs k (active latents per example)")
            if self.k > self.width:
                raise ValueError(f"k = {self.k} is larger than the width {self.width}; choose k ≤ width")
        elif self.k is not None:
            raise ValueError(f"k is only used by topk / batchtopk, not {self.activation!r}; remove it")
        if self.aux_k is not None and self.aux_k > self.width:
            raise ValueError(f"aux_k = {self.aux_k} is larger than the width {self.width}")
        prefixes = self.matryoshka_prefixes
        if prefixes is not None and (sorted(set(prefixes)) != prefixes or prefixes[-1] >= self.width):
            raise ValueError(
                f"matryoshka_prefixes {prefixes} must increase strictly and stay below the width "
                f"{self.width} (the full width is always one of the nested dictionaries)"
            )
        return self


class DictionaryRunConfig(StrictModel):
    """One dictionary run: which activations, which dictionary, how to train."""

    name: str = Field("dictionary", description="human-readable name (the preset's name)")
    data: DictionaryDataConfig = Field(discriminator="kind")
    method: DictionaryConfig
    train: TrainConfig

    @model_validator(mode="after")
    def _skip_needs_a_transcoder(self) -> DictionaryRunConfig:
        if self.method.skip and not getattr(self.data, "transcoder", False):
            raise ValueError(
                "method.skip adds a linear path from a block's input to its output, so it needs "
                "transcoder data (data.kind: target_activations with data.transcoder: true)"
            )
        return self
