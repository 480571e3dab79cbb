"""Stochastic Parameter Decomposition: which weights to decompose, the loss terms and their coefficients, and an
SPD run (target + method + training)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, NonNegativeInt, PositiveFloat, PositiveInt, Tag, model_validator

from unmerge.config.apd import APDConfig
from unmerge.config.base import FieldValueError, NonNegativeFloat, StrictModel, other_commands_config
from unmerge.config.targets import (
    InductionConfig,
    LanguageTargetConfig,
    MaxOfKConfig,
    ModularAdditionConfig,
    OwnModelConfig,
    ResidMLPConfig,
    TMSConfig,
)
from unmerge.config.training import TrainConfig


class SiteConfig(StrictModel):
    """Weight matrices to decompose: every module whose name matches `pattern` (fnmatch) gets C subcomponents."""

    pattern: str = Field(min_length=1, description="fnmatch pattern over module names, e.g. 'layers.*.mlp_in'")
    C: PositiveInt = Field(description="rank-1 subcomponents per matched site")
    importance_frequency: bool = Field(
        True,
        description="whether the importance-frequency term (method.importance_frequency_coeff) covers these "
        "subcomponents; false for a site whose mechanism is dense, such as a residual MLP's W_out, which the term "
        "would split into more subcomponents than it has neurons",
    )
    importance_count: bool = Field(
        True,
        description="whether the importance-count term (method.importance_count_coeff) covers these subcomponents; "
        "false for a site whose mechanisms are rare and many, such as a residual MLP's W_in (one per feature)",
    )


class SPDConfig(StrictModel):
    """Stochastic Parameter Decomposition (DESIGN.md §4): the `method` section of an SPD run. Each field is also a
    keyword option of `unmerge.decompose`.

    Example:
        >>> SPDConfig(sites=[SiteConfig(pattern="layers.*.mlp_in", C=100)], importance_minimality_coeff=1e-5, pnorm=2)
    """

    kind: Literal["spd"] = "spd"
    sites: list[SiteConfig] = Field(min_length=1, description="which weights to decompose")
    ci_function: Literal["scalar_mlp", "global_mlp"] = Field(
        "scalar_mlp",
        description="causal-importance function: one tiny MLP per subcomponent on its own inner activation (the "
        "paper's), or one global MLP reading every site's inner activations (later work's)",
    )
    ci_hidden: PositiveInt = Field(16, description="hidden width d_gate of each subcomponent's CI MLP")
    global_ci_hidden: list[PositiveInt] = Field(
        default_factory=lambda: [512], min_length=1, description="hidden widths of the global CI MLP (global_mlp)"
    )
    faithfulness_coeff: NonNegativeFloat = Field(1.0, description="weight of ‖W − UV‖²")
    stochastic_recon_coeff: NonNegativeFloat = Field(1.0, description="β1: all sites masked")
    layerwise_recon_coeff: NonNegativeFloat = Field(1.0, description="β2: one site masked at a time")
    importance_minimality_coeff: NonNegativeFloat = Field(description="β3: penalty on Σ|g⁺|^p")
    pnorm: PositiveFloat = Field(1.0, description="p of the importance-minimality penalty (its start if annealed)")
    delta_component: bool = Field(
        False,
        description="the residual W − UV as one more component of every site, masked by its own U[0, 1) draw in "
        "the stochastic passes (later SPD work): all masks 1 then give the target exactly, whatever UV",
    )
    routing: Literal["all", "subset"] = Field(
        "all",
        description="which sites the all-sites stochastic pass masks, per input: all, or a uniformly random "
        "non-empty subset (later SPD work), the others running the target's own weights",
    )
    pnorm_final: PositiveFloat | None = Field(
        None, description="anneal p linearly from pnorm to this (later SPD work: 2 → 0.4); None keeps p fixed"
    )
    pnorm_anneal_start: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        0.0, description="fraction of training at which p starts to move towards pnorm_final"
    )
    pnorm_anneal_end: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        1.0, description="fraction of training by which p reaches pnorm_final (and stays)"
    )
    importance_frequency_coeff: NonNegativeFloat = Field(
        0.0, description="weight of Σ_c m_c log2(1 + S_c), m_c and S_c the batch mean and sum of g⁺_c^p (VPD)"
    )
    importance_count_coeff: NonNegativeFloat = Field(
        0.0,
        description="weight of Σ_c log2(1 + S_c), S_c the batch sum of g⁺_c^p: a smooth count of the subcomponents in "
        "use, which charges a rarely used subcomponent most per unit of importance",
    )
    importance_count_start: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        0.0,
        description="fraction of training from which the importance-count term weighs in (before it, its weight is "
        "0): a late clean-up of rarely used remnants once the decomposition has formed",
    )
    leak: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(0.01, description="slope of the hard sigmoids' leaks")
    output_loss: Literal["mse", "kl", "function"] = Field(
        "mse",
        description="divergence D between masked and target outputs: MSE, KL of logits, or (for a model passed "
        "from Python) the function given with it (`unmerge.decompose(..., output_loss=fn)`)",
    )
    faithfulness_warmup_steps: NonNegativeInt = Field(
        0, description="Adam steps on ‖W − UV‖² alone before training (removes the init's overshoot)"
    )
    faithfulness_warmup_lr: PositiveFloat = Field(1e-2, description="learning rate of the faithfulness warm-up")
    adversarial_steps: NonNegativeInt = Field(
        0,
        description="projected sign-gradient ascent steps on r that search for the worst masks in [g, 1], for "
        "the adversarial loss and the `adversarial_recon` metric (0: neither)",
    )
    adversarial_step_size: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        0.25, description="how far one ascent step moves each r"
    )
    adversarial_persistent: bool = Field(
        False,
        description="keep the worst-case r, one per subcomponent pooled over the batch, from step to step and "
        "refine it by adversarial_steps ascent steps each step, instead of a fresh uniform draw per position",
    )
    adversarial_recon_coeff: NonNegativeFloat = Field(
        0.0, description="weight of D with all sites at the worst masks found (VPD's adversarial reconstruction)"
    )
    ci_kernel: Literal["auto", "torch", "c"] = Field(
        "auto",
        description="how causal importances, hard sigmoids and masks are computed: the hand-written C kernel "
        "(CPU, float32), plain torch (anywhere), or auto (the C kernel on the CPU where a C compiler builds it, "
        "torch otherwise)",
    )

    @model_validator(mode="after")
    def _each_pattern_once(self) -> SPDConfig:
        patterns = [site.pattern for site in self.sites]
        repeated = sorted({pattern for pattern in patterns if patterns.count(pattern) > 1})
        if repeated:
            raise ValueError(
                f"the site pattern(s) {', '.join(map(repr, repeated))} are listed more than once; list each once"
            )
        return self

    @model_validator(mode="after")
    def _anneal_forwards(self) -> SPDConfig:
        if self.pnorm_anneal_start >= self.pnorm_anneal_end:
            raise FieldValueError("pnorm_anneal_start", "must be below pnorm_anneal_end (fractions of training)")
        return self

    @model_validator(mode="after")
    def _per_site_terms_cover_a_site(self) -> SPDConfig:
        for term in ("importance_frequency", "importance_count"):
            if getattr(self, f"{term}_coeff") and not any(getattr(site, term) for site in self.sites):
                raise FieldValueError(
                    f"{term}_coeff",
                    f"is above 0 but every site sets {term}: false; let a site in or set the coefficient to 0",
                )
        return self

    @model_validator(mode="after")
    def _adversarial_loss_has_steps(self) -> SPDConfig:
        if self.adversarial_recon_coeff and not self.adversarial_steps:
            raise ValueError(
                "adversarial_recon_coeff > 0 needs adversarial_steps ≥ 1 (the ascent that finds the worst masks)"
            )
        return self


def _method_tag(data: Any) -> str:
    """The method union's discriminator, `kind=spd` when a method names no kind (configs before APD)."""
    kind = data.get("kind", "spd") if isinstance(data, dict) else getattr(data, "kind", "spd")
    return f"kind={kind}"


ParameterMethodConfig = Annotated[
    Union[Annotated[SPDConfig, Tag("kind=spd")], Annotated[APDConfig, Tag("kind=apd")]],  # noqa: UP007
    Discriminator(
        _method_tag, custom_error_type="unknown_method", custom_error_message="method.kind must be spd or apd"
    ),
]
"""A parameter decomposition's `method` section: SPD (`kind: spd`, the default) or APD (`kind: apd`)."""


class RunConfig(StrictModel):
    """One decomposition run: which target, which method, how to train (what a preset or YAML file holds).

    Example:
        >>> config = unmerge.load_run_config("tms-5-2", ["train.steps=3000"])
        >>> unmerge.api.decompose(config, "runs/tms52")
    """

    name: str = Field("run", description="human-readable name (the preset's name)")
    target: (
        TMSConfig
        | ResidMLPConfig
        | MaxOfKConfig
        | ModularAdditionConfig
        | InductionConfig
        | LanguageTargetConfig
        | OwnModelConfig
    ) = Field(discriminator="kind")
    method: ParameterMethodConfig
    train: TrainConfig

    @model_validator(mode="before")
    @classmethod
    def _not_a_dictionary_config(cls, data: Any) -> Any:
        message = "a dictionary config (it has a data section): train it with `unmerge train-dictionary`"
        return other_commands_config(data, "data", "target", message)

    @model_validator(mode="after")
    def _bf16_weights_run_in_bf16(self) -> RunConfig:
        bf16_weights = isinstance(self.target, LanguageTargetConfig) and self.target.dtype == "bf16"
        if bf16_weights and self.train.precision != "bf16":
            raise ValueError("target.dtype=bf16 needs train.precision=bf16 (autocast), or set target.dtype=fp32")
        return self

    @model_validator(mode="after")
    def _output_loss_fits_the_target(self) -> RunConfig:
        if isinstance(self.target, OwnModelConfig):  # the caller chose it for their model
            return self
        whole_language_model = (
            isinstance(self.target, LanguageTargetConfig)
            and self.target.module is None
            and self.target.model.kind != "minilm"
        )
        classifier = isinstance(self.target, (MaxOfKConfig, ModularAdditionConfig, InductionConfig))
        wanted = "kl" if whole_language_model or classifier else "mse"
        if self.method.output_loss != wanted:
            kind = (
                "a whole causal language model"
                if whole_language_model
                else "an algorithmic toy (its output is logits)"
                if classifier
                else "a toy target, a single module or a sentence encoder's embedding"
            )
            raise ValueError(f"method.output_loss must be {wanted!r} for {kind}, not {self.method.output_loss!r}")
        return self
