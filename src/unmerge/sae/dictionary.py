"""The dictionary: `z = (x − b_d) W_e + b_e`, `f = act(z)`, `x̂ = f W_d + b_d` (DESIGN.md §5). This base class holds
what every architecture shares; each architecture (`unmerge.sae.arch`) is a small subclass that owns its
activation, its extra parameters, its own loss terms and constraints, and its SAELens form.

A transcoder is the same module with an output space of its own: it encodes a block's input x and decodes the
block's output y, `z = x W_e + b_e`, `ŷ = f W_d + b_d (+ x W_skip)`; the encoder is not centred by b_d, which lives
in the output space, and the optional linear skip path (zero at the start) carries what is linear in x."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unmerge.config import DictionaryConfig
from unmerge.errors import UnmergeError


def squared_error(x: Tensor, reconstruction: Tensor) -> Tensor:
    """Mean over examples of ‖x − x̂‖² (summed over dimensions): the reconstruction loss."""
    return (x - reconstruction).square().sum(-1).mean()


@dataclass(frozen=True)
class LossInputs:
    """What a training step gives an architecture for its own loss terms: the inputs and targets in working units,
    the reconstruction, latents and pre-activations, and the latents that are dead (computed when asked)."""

    x: Tensor
    target: Tensor
    reconstruction: Tensor
    f: Tensor
    z: Tensor
    dead: Callable[[], Tensor]


class Dictionary(nn.Module):
    """Encoder `W_e` (d × m), `b_e`; decoder `W_d` (m × d_out, rows are atoms), `b_d`; a transcoder's skip path
    `W_skip` (d × d_out). `output_dim` None: an autoencoder (d_out = d). Subclasses add what their activation needs.

    With activation normalisation the dictionary works on `s·x` (and a transcoder's targets on `s_out·y`) for
    fixed scales (`input_scale`, `output_scale`, powers of two); `forward` takes and returns raw activations, and
    `fold_input_scale` moves the scales into the weights, biases and thresholds so that the same reconstructions
    come out with both scales 1 (bit for bit: scaling by a power of two is exact in floating point) and the latents
    are in raw units."""

    activation: ClassVar[str]  # the name the config's `activation` gives the architecture
    saelens_name: ClassVar[str | None] = None  # SAELens's `architecture` for it as an autoencoder (None: none)
    saelens_transcoders: ClassVar[dict[bool, str]] = {}  # skip path or not → SAELens's transcoder architecture
    saelens_encoder_bias: ClassVar[str] = "b_enc"  # the name SAELens gives `b_e`
    saelens_imported: ClassVar[bool] = True  # SAELens files of this architecture are read as this class

    def __init__(
        self, dim: int, config: DictionaryConfig, generator: torch.Generator, output_dim: int | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.transcoder = output_dim is not None
        out = dim if output_dim is None else output_dim
        decoder = F.normalize(torch.randn(config.width, out, generator=generator), dim=1) * config.init_decoder_norm
        encoder = (
            decoder.T.clone()
            if out == dim
            else (F.normalize(torch.randn(dim, config.width, generator=generator), dim=0) * config.init_decoder_norm)
        )
        self.W_d = nn.Parameter(decoder)
        self.W_e = nn.Parameter(encoder)
        self.b_e = nn.Parameter(torch.zeros(config.width))
        self.b_d = nn.Parameter(torch.zeros(out))
        if config.skip:
            self.W_skip = nn.Parameter(torch.zeros(dim, out))
        self.register_buffer("input_scale", torch.ones(()))
        if self.transcoder:
            self.register_buffer("output_scale", torch.ones(()))
            self.register_buffer("encoder_centre", torch.zeros(dim))

    def centre(self) -> Tensor:
        """What the encoder subtracts from its input: the decoder bias for an autoencoder, zero for a transcoder."""
        return self.encoder_centre if self.transcoder else self.b_d

    def pre_activations(self, x: Tensor) -> Tensor:
        return (x - self.centre()) @ self.W_e + self.b_e

    def activate(self, z: Tensor) -> Tensor:
        """Latents from pre-activations (the architecture's activation)."""
        raise NotImplementedError

    def add_skip(self, reconstruction: Tensor, x: Tensor) -> Tensor:
        """`reconstruction + x W_skip` with a skip path, else `reconstruction` itself."""
        return reconstruction + x @ self.W_skip if self.config.skip else reconstruction

    def offset(self, x: Tensor) -> Tensor:
        """The part of the reconstruction no latent makes: `b_d` (+ `x W_skip`)."""
        return self.add_skip(self.b_d, x)

    def decode(self, f: Tensor, x: Tensor | None = None) -> Tensor:
        """`f W_d + b_d` (+ `x W_skip` with a skip path, which needs the input x)."""
        decoded = f @ self.W_d + self.b_d
        return decoded if x is None else self.add_skip(decoded, x)

    def target_scale(self) -> Tensor:
        """The scale of what the decoder reconstructs: the input's for an autoencoder, the output's for a
        transcoder."""
        return self.output_scale if self.transcoder else self.input_scale

    def normalise(self, x: Tensor) -> Tensor:
        """Raw inputs in the units the dictionary works in, `s·x` (no copy when `s = 1`)."""
        scale = float(self.input_scale)
        return x if scale == 1.0 else x * scale

    def normalise_target(self, y: Tensor) -> Tensor:
        """Raw reconstruction targets (a transcoder's outputs; an autoencoder's inputs) in working units."""
        scale = float(self.target_scale())
        return y if scale == 1.0 else y * scale

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(reconstruction x̂ or ŷ, latents f, pre-activations z) of raw inputs x, reconstruction in raw units; f
        and z are in the normalised units until the scales are folded."""
        reconstruction, f, z = self.forward_normalised(self.normalise(x))
        scale = float(self.target_scale())
        return (reconstruction if scale == 1.0 else reconstruction / scale), f, z

    def forward_normalised(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x̂, f, z) of activations already multiplied by the input scale."""
        z = self.pre_activations(x)
        f = self.activate(z)
        return self.decode(f, x), f, z

    def decoder_norms(self) -> Tensor:
        return self.W_d.norm(dim=1)

    def penalised(self, f: Tensor, z: Tensor) -> Tensor:
        """What the sparsity penalty is applied to: the latents."""
        return f

    def extra_losses(self, inputs: LossInputs) -> dict[str, tuple[Tensor, float]]:
        """The architecture's own loss terms, by name, each with its coefficient (none here)."""
        return {}

    def constrain(self) -> None:
        """Constraints on the architecture's own parameters after each optimiser step (none here)."""

    def reset_latents(self, rows: Tensor) -> list[tuple[nn.Parameter, Any]]:
        """Reset the architecture's own parameters of resampled latents `rows`; returns (parameter, index) pairs
        whose Adam moments must be zeroed too (none here: the method resets the encoder and decoder)."""
        return []

    def target_unit_tensors(self) -> list[Tensor]:
        """Every tensor measured in the units of what the decoder reconstructs (biases, thresholds): folding the
        normalisation divides them by the target scale."""
        return [self.b_e, self.b_d]

    @torch.no_grad()
    def fold_input_scale(self) -> None:
        """Fold the activation normalisation into the weights: divide every additive term and threshold by the
        target scale `s_out` (an autoencoder's is its input scale `s`), multiply the linear maps of the input
        (`W_e`, `W_skip`) by `s / s_out` (1 for an autoencoder), and set both scales to 1. Reconstructions of raw
        activations are unchanged (exactly, as the scales are powers of two) and latents become raw-unit
        `f / s_out`."""
        scale, target_scale = float(self.input_scale), float(self.target_scale())
        for tensor in self.target_unit_tensors():
            tensor.div_(target_scale)
        if scale != target_scale:
            for weight in (self.W_e, getattr(self, "W_skip", None)):
                if weight is not None:
                    weight.mul_(scale / target_scale)
        self.input_scale.fill_(1.0)
        self.target_scale().fill_(1.0)

    def saelens_architecture(self) -> str:
        """SAELens's `architecture` for this dictionary; an error where SAELens has no such dictionary."""
        if not self.transcoder and self.saelens_name is None:
            raise UnmergeError(f"SAELens has no {self.activation} dictionary")
        if not self.transcoder:
            return self.saelens_name
        if self.config.skip not in self.saelens_transcoders:
            kind = f"{self.activation} transcoder" + (" with a skip path" if self.config.skip else "")
            raise UnmergeError(
                f"SAELens has no {kind}; export a ReLU transcoder (with or without skip) or a JumpReLU one without skip"
            )
        return self.saelens_transcoders[self.config.skip]

    def saelens_tensors(self) -> dict[str, Tensor]:
        """The weights under SAELens's names (W_skip as d_out × d_in)."""
        tensors = {"W_enc": self.W_e, self.saelens_encoder_bias: self.b_e, "W_dec": self.W_d, "b_dec": self.b_d}
        if self.transcoder and self.config.skip:
            tensors["W_skip"] = self.W_skip.T
        return tensors

    def saelens_settings(self) -> dict[str, Any]:
        """What SAELens's `cfg.json` says of this dictionary beyond its architecture and sizes (nothing here)."""
        return {}

    @classmethod
    def saelens_config_fields(cls, saelens_config: dict[str, Any]) -> dict[str, Any]:
        """Config fields this architecture reads from a SAELens `cfg.json` (none here)."""
        return {}

    @torch.no_grad()
    def load_saelens_extras(self, tensors: dict[str, Tensor]) -> None:
        """Copy the architecture's own tensors from a SAELens file (none here)."""
