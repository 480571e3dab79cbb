"""Sparse dictionaries: the sparsity penalty, one config per architecture (a discriminated union on `activation`,
`relu` when absent), and a dictionary run (data + method + training)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, NonNegativeInt, PositiveFloat, PositiveInt, Tag, TypeAdapter, model_validator

from unmerge.config.base import NonNegativeFloat, StrictModel, other_commands_config
from unmerge.config.data import DictionaryDataConfig
from unmerge.config.training import TrainConfig

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


class DictionaryBaseConfig(StrictModel):
    """What every dictionary architecture shares (DESIGN.md §5); Matryoshka is its nested-prefix option."""

    kind: Literal["dictionary"] = "dictionary"
    width: PositiveInt = Field(description="latents m")
    penalty: PenaltyConfig = PenaltyConfig()
    init: Literal["random", "data", "truth"] = Field(
        "random",
        description="decoder atoms random, from data samples, or (toys with known features, a diagnostic: does the "
        "objective keep them?) on the true features",
    )
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
        0.0,
        description="also resample a latent whose atom_alignment on the resampling inputs is below this fraction of "
        "the median live latent's (0: off)",
    )
    resample_refit: bool = Field(
        False,
        description="choose and place resampled atoms by the residual left after refitting each input's magnitudes "
        "on its support (what the atoms cannot explain), not the plain residual (which holds every latent's shrinkage)",
    )
    resample_samples: PositiveInt = Field(8192, description="inputs scored to choose the resampled directions")
    resample_encoder_norm: PositiveFloat = Field(
        0.2, description="a resampled encoder column's norm, as a fraction of the mean live column's norm"
    )
    skip: bool = Field(False, description="transcoders: add a linear skip path x W_skip (zero at the start)")

    @model_validator(mode="after")
    def _prefixes_nest(self) -> DictionaryBaseConfig:
        prefixes = self.matryoshka_prefixes
        if prefixes is not None and (sorted(set(prefixes)) != prefixes or prefixes[-1] >= self.width):
            raise ValueError(
                f"matryoshka_prefixes {prefixes} must increase strictly and stay below the width "
                f"{self.width} (the full width is always one of the nested dictionaries)"
            )
        return self


class ReLUConfig(DictionaryBaseConfig):
    """`f = ReLU(z)`, made sparse by the penalty."""

    activation: Literal["relu"] = "relu"


class TopKConfig(DictionaryBaseConfig):
    """Each example keeps its k largest pre-activations; AuxK trains dead latents on the residual."""

    activation: Literal["topk"] = "topk"
    k: PositiveInt | None = Field(None, description="active latents per example")
    aux_k: PositiveInt | None = Field(None, description="AuxK: dead latents used to model the residual")
    aux_k_coeff: NonNegativeFloat = Field(1 / 32, description="weight of the AuxK loss")

    @model_validator(mode="after")
    def _k_fits(self) -> TopKConfig:
        if self.k is None:
            raise ValueError(f"activation {self.activation!r} needs k (active latents per example)")
        if self.k > self.width:
            raise ValueError(f"k = {self.k} is larger than the width {self.width}; choose k ≤ width")
        if self.aux_k is not None and self.aux_k > self.width:
            raise ValueError(f"aux_k = {self.aux_k} is larger than the width {self.width}")
        return self


class BatchTopKConfig(TopKConfig):
    """The batch keeps its k·B largest pre-activations; a running threshold replaces the rule in evaluation."""

    activation: Literal["batchtopk"] = "batchtopk"


class JumpReLUConfig(DictionaryBaseConfig):
    """`f = z·H(z − θ)` with a learned threshold per latent, made sparse by an L0 penalty (or the penalty)."""

    activation: Literal["jumprelu"] = "jumprelu"
    jumprelu_bandwidth: PositiveFloat = Field(1e-3, description="ε of the rectangle kernel in θ's gradient")
    jumprelu_init_threshold: PositiveFloat = Field(1e-3, description="initial θ")
    l0_coeff: NonNegativeFloat = Field(0.0, description="λ of JumpReLU's L0 penalty Σ H(z − θ)")


class GatedConfig(DictionaryBaseConfig):
    """Separate gate and magnitude paths sharing directions; the gate also reconstructs through a frozen decoder."""

    activation: Literal["gated"] = "gated"


ARCHITECTURE_CONFIGS: dict[str, type[DictionaryBaseConfig]] = {
    "relu": ReLUConfig,
    "topk": TopKConfig,
    "batchtopk": BatchTopKConfig,
    "jumprelu": JumpReLUConfig,
    "gated": GatedConfig,
}
# The architecture fields of the one flat dictionary config that runs saved before this layout hold. They did
# nothing on another architecture, except AuxK, which the flat config ran on any architecture with `aux_k` set.
_FLAT_FIELDS = ("k", "aux_k", "aux_k_coeff", "jumprelu_bandwidth", "jumprelu_init_threshold", "l0_coeff")
_AUX_K_FIELDS = ("aux_k", "aux_k_coeff")


def _activation(data: Any) -> str:
    """The architecture a config names (`relu` when it names none)."""
    return data.get("activation", "relu") if isinstance(data, dict) else getattr(data, "activation", "relu")


def _tag(data: Any) -> str:
    """The union's discriminator: `activation=<name>` (it shows in the path of a validation error)."""
    return f"activation={_activation(data)}"


DictionaryConfig = Annotated[
    Union[tuple(Annotated[config, Tag(f"activation={name}")] for name, config in ARCHITECTURE_CONFIGS.items())],  # noqa: UP007
    Discriminator(
        _tag,
        custom_error_type="unknown_activation",
        custom_error_message=f"activation must be one of {', '.join(ARCHITECTURE_CONFIGS)}",
    ),
]
"""A dictionary's config: the member of `ARCHITECTURE_CONFIGS` its `activation` names (`relu` when absent)."""
_DICTIONARY_CONFIG = TypeAdapter(DictionaryConfig)


def dictionary_config(**fields: Any) -> DictionaryConfig:
    """The config of the architecture `activation` names (`relu` by default) from its fields, validated."""
    return _DICTIONARY_CONFIG.validate_python(fields)


class DictionaryRunConfig(StrictModel):
    """One dictionary run: which activations, which dictionary, how to train."""

    name: str = Field("dictionary", description="human-readable name (the preset's name)")
    data: DictionaryDataConfig = Field(discriminator="kind")
    method: DictionaryConfig
    train: TrainConfig

    @model_validator(mode="before")
    @classmethod
    def _not_an_spd_config(cls, data: Any) -> Any:
        message = "an SPD config (it has a target section): decompose it with `unmerge decompose`"
        return other_commands_config(data, "target", "data", message)

    @model_validator(mode="after")
    def _skip_needs_a_transcoder(self) -> DictionaryRunConfig:
        if self.method.skip and not getattr(self.data, "transcoder", False):
            raise ValueError(
                "method.skip adds a linear path from a block's input to its output, so it needs "
                "transcoder data (data.kind: target_activations with data.transcoder: true; in Python, "
                "unmerge.train_dictionary(model, hook=..., data=..., transcoder=True))"
            )
        return self

    @classmethod
    def upgrade_saved(cls, data: dict[str, Any]) -> dict[str, Any]:
        """A run saved before each architecture had its own config held every architecture's fields (`k: null`
        on a ReLU dictionary): drop those its architecture lacks, as they did nothing there. AuxK on an
        architecture that now has none ran, so a set `aux_k` stays and validation names it."""
        method = data.get("method")
        if not isinstance(method, dict):
            return data
        fields = ARCHITECTURE_CONFIGS.get(_activation(method), ReLUConfig).model_fields
        ran_aux_k = method.get("aux_k") is not None
        kept = {
            key: value
            for key, value in method.items()
            if key in fields or key not in _FLAT_FIELDS or (ran_aux_k and key in _AUX_K_FIELDS)
        }
        return {**data, "method": kept}
