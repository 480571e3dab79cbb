"""The dictionary: `z = (x − b_d) W_e + b_e`, `f = act(z)`, `x̂ = f W_d + b_d` (DESIGN.md §5).

A transcoder is the same module with an output space of its own: it encodes a block's input x and decodes the
block's output y, `z = x W_e + b_e`, `ŷ = f W_d + b_d (+ x W_skip)`; the encoder is not centred by b_d, which lives
in the output space, and the optional linear skip path (zero at the start) carries what is linear in x."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from unmerge.config import DictionaryConfig
from unmerge.sae import activations
from unmerge.sae.sparse_decode import dense_latents, sparse_decode, topk_encode

BATCHTOPK_THRESHOLD_MOMENTUM = 0.99


class _ReLUDictionary(torch.autograd.Function):
    """The whole ReLU dictionary, `z = (x − b_d) W_e + b_e`, `f = relu(z)`, `x̂ = f W_d + b_d`, as one function so
    that its backward does the five products a dense step needs and no more: autograd would also form the B × d
    gradient of `x − b_d` (a sixth product of the same size) because b_d needs a gradient, whereas its share
    through the encoder is the vector `−W_e Σ_b ∂L/∂z[b]`. The latents' gradient from the decoder is accumulated
    into the one from the caller's use of f (a penalty) inside the product, the ReLU mask is applied in place, and
    `∂L/∂W_d` is formed as `(∂L/∂x̂ᵀ f)ᵀ`, which runs faster here than `fᵀ ∂L/∂x̂` (a transposed left operand)."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        W_e: Tensor,
        b_e: Tensor,
        W_d: Tensor,  # type: ignore[override]
        b_d: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        centred = x - b_d
        z = torch.addmm(b_e, centred, W_e)
        f = F.relu(z)
        ctx.save_for_backward(centred, W_e, W_d, f)
        ctx.set_materialize_grads(False)
        return torch.addmm(b_d, f, W_d), f, z

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx,
        grad_out: Tensor | None,
        grad_f: Tensor | None,  # type: ignore[override]
        grad_z: Tensor | None,
    ) -> tuple[Tensor | None, ...]:
        centred, W_e, W_d, f = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_W_d = grad_b_d = None
        if grad_out is not None:
            grad_W_d = (grad_out.T @ f).T if needs[3] else None
            grad_b_d = grad_out.sum(0)
            grad = grad_out @ W_d.T if grad_f is None else torch.addmm(grad_f, grad_out, W_d.T)
            torch.ops.aten.threshold_backward.grad_input(grad, f, 0, grad_input=grad)  # ours: mask in place
        elif grad_f is not None:
            grad = torch.ops.aten.threshold_backward(grad_f, f, 0)
        else:
            grad = None
        if grad_z is not None:
            grad = grad_z if grad is None else grad.add_(grad_z)
        grad_x = grad_W_e = grad_b_e = None
        if grad is not None:
            grad_x = grad @ W_e.T if needs[0] else None
            grad_W_e = centred.T @ grad if needs[1] else None
            grad_b_e = grad.sum(0)
            encoder_b_d = -(W_e @ grad_b_e)
            grad_b_d = encoder_b_d if grad_b_d is None else grad_b_d + encoder_b_d
        return (grad_x, grad_W_e, grad_b_e if needs[2] else None, grad_W_d, grad_b_d if needs[4] else None)


class Dictionary(nn.Module):
    """Encoder `W_e` (d × m), `b_e`; decoder `W_d` (m × d_out, rows are atoms), `b_d`; JumpReLU's threshold θ,
    BatchTopK's running inference threshold, or the Gated magnitude path (`r_mag`, `b_mag`) where the activation
    needs them; a transcoder's skip path `W_skip` (d × d_out). `output_dim` None: an autoencoder (d_out = d).

    With activation normalisation the dictionary works on `s·x` (and a transcoder's targets on `s_out·y`) for
    fixed scales (`input_scale`, `output_scale`, powers of two); `forward` takes and returns raw activations, and
    `fold_input_scale` moves the scales into the weights, biases and thresholds so that the same reconstructions
    come out with both scales 1 (bit for bit: scaling by a power of two is exact in floating point) and the latents
    are in raw units."""

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
        if config.activation == "jumprelu":
            self.threshold = nn.Parameter(torch.full((config.width,), config.jumprelu_init_threshold))
        if config.activation == "batchtopk":
            self.register_buffer("inference_threshold", torch.zeros(()))
            self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64))
        if config.activation == "gated":
            self.r_mag = nn.Parameter(torch.zeros(config.width))
            self.b_mag = nn.Parameter(torch.zeros(config.width))
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
        """Latents from pre-activations; BatchTopK uses its batch rule in training mode, its threshold in eval."""
        config = self.config
        if config.activation == "relu":
            return F.relu(z)
        if config.activation == "topk":
            return activations.topk(z, config.k)
        if config.activation == "jumprelu":
            return activations.jumprelu(z, self.threshold, config.jumprelu_bandwidth)
        if not self.training:
            return activations.threshold_activation(z, self.inference_threshold)
        f, smallest = activations.batch_topk(z, config.k)
        self._update_threshold(smallest)
        return f

    @torch.no_grad()
    def _update_threshold(self, smallest_kept: Tensor) -> None:
        """Running mean of the smallest kept activation: exponential with a bias correction, so early batches
        count fully and the result does not depend on the starting value."""
        self.threshold_updates += 1
        weight = (1 - BATCHTOPK_THRESHOLD_MOMENTUM) / (1 - BATCHTOPK_THRESHOLD_MOMENTUM ** int(self.threshold_updates))
        self.inference_threshold.lerp_(smallest_kept, weight)

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
        """(x̂, f, z) of activations already multiplied by the input scale. ReLU runs as one fused function; TopK
        encodes and decodes through its k active latents per example (`sparse_decode`), and its dense f, formed
        for the caller (firing counts, penalties), is not on the decoder's gradient path. Both form the input's
        B × d gradient only when the input needs one. For Gated, z is the gate's pre-activation."""
        config = self.config
        if config.activation == "gated":
            projection = (x - self.centre()) @ self.W_e
            z = projection + self.b_e
            magnitude = projection * self.r_mag.exp() + self.b_mag
            f = F.relu(magnitude) * (z > 0)
            return self.decode(f, x), f, z
        if config.activation == "topk":
            assert config.k is not None
            values, indices, z = topk_encode(x, self.W_e, self.b_e, self.centre(), config.k)
            reconstruction = self.add_skip(sparse_decode(values, indices, self.W_d, self.b_d), x)
            return reconstruction, dense_latents(values, indices, config.width), z
        if config.activation == "relu" and not self.transcoder:
            return _ReLUDictionary.apply(x, self.W_e, self.b_e, self.W_d, self.b_d)
        z = self.pre_activations(x)
        f = self.activate(z)
        return self.decode(f, x), f, z

    def decoder_norms(self) -> Tensor:
        return self.W_d.norm(dim=1)

    @torch.no_grad()
    def fold_input_scale(self) -> None:
        """Fold the activation normalisation into the weights: divide every additive term and threshold by the
        target scale `s_out` (an autoencoder's is its input scale `s`), multiply the linear maps of the input
        (`W_e`, `W_skip`) by `s / s_out` (1 for an autoencoder), and set both scales to 1. Reconstructions of raw
        activations are unchanged (exactly, as the scales are powers of two) and latents become raw-unit `f / s_out`."""
        scale, target_scale = float(self.input_scale), float(self.target_scale())
        for bias in (
            self.b_e,
            self.b_d,
            getattr(self, "b_mag", None),
            getattr(self, "threshold", None),
            getattr(self, "inference_threshold", None),
        ):
            if bias is not None:
                bias.div_(target_scale)
        if scale != target_scale:
            for weight in (self.W_e, getattr(self, "W_skip", None)):
                if weight is not None:
                    weight.mul_(scale / target_scale)
        self.input_scale.fill_(1.0)
        self.target_scale().fill_(1.0)
