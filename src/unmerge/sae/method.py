"""A sparse dictionary as a method of the one training loop: loss of a batch, constraints after each step,
dead-latent bookkeeping, and evaluation against known features."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from unmerge.config import DictionaryConfig
from unmerge.data.source import ActivationSource, Reconstruct
from unmerge.errors import ConfigError, UnmergeError
from unmerge.metrics import dictionary as scores
from unmerge.sae.arch import build_dictionary
from unmerge.sae.dictionary import LossInputs, squared_error
from unmerge.sae.penalties import sparsity_penalty
from unmerge.train import distributed
from unmerge.train.loop import StepOutput
from unmerge.train.rng import step_generator

GEOMETRIC_MEDIAN_ITERATIONS = 100
INIT_SAMPLES = 8192
TRAINING_BUFFERS = ("samples_since_fired", "step")  # added to the module by DictionaryMethod; not the dictionary's


def geometric_median(points: Tensor, iterations: int = GEOMETRIC_MEDIAN_ITERATIONS) -> Tensor:
    """The point minimising the sum of Euclidean distances (Weiszfeld's iterations from the mean)."""
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1 / (points - median).norm(dim=1).clamp(min=1e-8)
        median = (weights[:, None] * points).sum(0) / weights.sum()
    return median


def normalising_scale(sample: Tensor) -> float:
    """The power of two closest (in log scale) to `√d / mean ‖x‖`, so that normalised activations have a mean
    norm near √d and folding the scale back is exact."""
    mean_norm = float(sample.norm(dim=1).mean())
    if mean_norm == 0:
        raise UnmergeError(
            "every activation in the initialisation sample is zero, so there is no scale to normalise "
            "by; check the source or set method.normalise_activations=false"
        )
    return 2.0 ** round(math.log2(math.sqrt(sample.shape[1]) / mean_norm))


def matryoshka_loss(target: Tensor, f: Tensor, W_d: Tensor, offset: Tensor, prefixes: list[int]) -> Tensor:
    """Matryoshka (Bussmann et al. 2025; Nabeshima 2024): the sum over nested prefixes m_1 < m_2 < … of the
    squared error of reconstructing from the first m_i latents only (the full width is the main reconstruction),
    so early latents must stand on their own as a smaller dictionary. Built up block by block from `offset`, the
    part of the reconstruction no latent makes."""
    partial = offset.expand_as(target)
    total = target.new_zeros(())
    for start, end in zip([0, *prefixes[:-1]], prefixes, strict=True):
        partial = partial + f[:, start:end] @ W_d[start:end]
        total = total + squared_error(target, partial)
    return total


def refit_magnitudes(x: Tensor, f: Tensor, W_d: Tensor, offset: Tensor, ridge: float = 1e-6) -> Tensor:
    """Latents with each input's support kept and its magnitudes refitted by least squares,
    `min_c ‖x − offset − Σ_{i∈S} c_i d_i‖²` (offset: b_d, or a transcoder's b_d + skip path), which removes the
    shrinkage an L1 penalty leaves (DESIGN.md §5). All inputs at once: supports are padded to the largest one,
    padding rows of the Gram matrix are the identity, and a tiny ridge keeps near-parallel atoms solvable.
    Refitted values may be negative."""
    size = int((f > 0).sum(1).max()) if f.numel() else 0
    if size == 0:
        return torch.zeros_like(f)
    on, indices = (f > 0).to(f.dtype).topk(size, dim=1)
    atoms = W_d[indices] * on[..., None]
    gram = atoms @ atoms.transpose(1, 2) + torch.diag_embed(1 - on + ridge)
    target = (atoms @ (x - offset)[..., None]).squeeze(-1)
    values = torch.linalg.solve(gram.double(), target.double()).to(f.dtype) * on
    return torch.zeros_like(f).scatter(1, indices, values)


def unexplained(target: Tensor, f: Tensor, W_d: Tensor, offset: Tensor, chunk: int = 4096) -> Tensor:
    """`target − offset − Σ c_i d_i` with each input's magnitudes refitted on its support (`refit_magnitudes`): the
    part of the target the current atoms cannot explain, without the shrinkage an L1 penalty leaves on every input.
    In chunks of rows, since the refit holds a (support × dim) block per input."""
    offset = offset.expand_as(target)
    parts = [
        t - o - refit_magnitudes(t, latents, W_d, o) @ W_d
        for t, latents, o in zip(target.split(chunk), f.split(chunk), offset.split(chunk), strict=True)
    ]
    return torch.cat(parts)


class DictionaryMethod:
    """Train a `Dictionary` on an activation source (DESIGN.md §5)."""

    def __init__(
        self,
        source: ActivationSource,
        config: DictionaryConfig,
        seed: int,
        total_steps: int,
        eval_batch_size: int = 4096,
        extra_evaluation: Callable[[Reconstruct], dict[str, float]] | None = None,
    ) -> None:
        """`extra_evaluation` adds metrics that need more than the source, such as a language model's spliced-in
        evaluation (`unmerge.eval.language.spliced_evaluator`): it gets the dictionary's `reconstruct`."""
        self.source = source
        self.extra_evaluation = extra_evaluation
        self.config = config
        self.seed = seed
        self.total_steps = total_steps
        self.eval_batch_size = eval_batch_size
        if config.init == "truth":
            check_truth_init(source, config.width)
        self.module = build_dictionary(source.dim, config, step_generator(seed, "init"), source.output_dim)
        self.module.register_buffer("samples_since_fired", torch.zeros(config.width, dtype=torch.int64))
        self.module.register_buffer("step", torch.zeros((), dtype=torch.int64))
        if config.unit_norm_decoder:
            self.module.W_d.register_hook(self._tangent_gradient)

    @property
    def device(self) -> torch.device:
        return self.module.W_d.device

    def to(self, device: torch.device) -> None:
        self.module.to(device)

    def _generator(self, stream: str, step: int = 0) -> torch.Generator:
        """A generator of this dictionary's seed on its device (the same on every rank)."""
        return step_generator(self.seed, stream, step, device=self.device)

    def _tangent_gradient(self, grad: Tensor) -> Tensor:
        """Drop the part of each decoder row's gradient along the row: with rows renormalised after every step,
        that part would only change a norm that is then undone (and would skew Adam's moments)."""
        rows = F.normalize(self.module.W_d.detach(), dim=1)
        return grad - (grad * rows).sum(1, keepdim=True) * rows

    def before_training(self) -> None:
        """Initialise the decoder bias (mean or geometric median of a sample of reconstruction targets) and,
        optionally, the atoms from data samples; the encoder starts as the decoder's transpose (a transcoder's
        as the same samples' normalised inputs)."""
        config, module = self.config, self.module
        sample = self.source.sample(INIT_SAMPLES, self._generator("dictionary-init"))
        check_activations(sample, self.source.row_width)
        x, target = self.source.split(sample)
        with torch.no_grad():
            if config.normalise_activations:
                module.input_scale.fill_(normalising_scale(x))
                module.target_scale().fill_(normalising_scale(target))
                x, target = module.normalise(x), module.normalise_target(target)
            if config.decoder_bias_init == "mean":
                module.b_d.copy_(target.mean(0))
            elif config.decoder_bias_init == "geometric_median":
                module.b_d.copy_(geometric_median(target))
            if config.init == "data":
                centred = target - module.b_d
                usable = (centred.norm(dim=1) > 1e-6 * float(centred.norm(dim=1).max())).nonzero().squeeze(1)
                if usable.numel() == 0:
                    raise UnmergeError(
                        "every initialisation sample equals the decoder bias, so no atom can be taken "
                        "from data; use method.init=random"
                    )
                generator = self._generator("atoms")
                order = torch.randperm(usable.numel(), generator=generator, device=generator.device)
                rows = usable[order[torch.arange(config.width, device=order.device) % usable.numel()]]
                module.W_d.copy_(F.normalize(centred[rows], dim=1) * config.init_decoder_norm)
                encoder = F.normalize(x[rows], dim=1) * config.init_decoder_norm if module.transcoder else module.W_d
                module.W_e.copy_(encoder.T)
            elif config.init == "truth":
                module.W_d.copy_(F.normalize(self.source.true_features.to(module.W_d), dim=1))
                module.W_e.copy_(module.W_d.T)
            if config.unit_norm_decoder:
                module.W_d.copy_(F.normalize(module.W_d, dim=1))

    def dictionary_state(self) -> dict[str, Tensor]:
        """The dictionary's own tensors, without the training bookkeeping (firing counters, step) that the
        checkpoints keep: what `dictionary.safetensors` holds and `Dictionary.load_state_dict` takes."""
        return {
            name: value.contiguous() for name, value in self.module.state_dict().items() if name not in TRAINING_BUFFERS
        }

    def progress(self) -> float:
        return float(self.module.step) / max(self.total_steps, 1)

    def training_loss(self, batch: Tensor, generator: torch.Generator) -> StepOutput:
        """Reconstruction (summed over Matryoshka prefixes if configured), sparsity penalty, and the
        architecture's own terms (`Dictionary.extra_losses`: JumpReLU's L0, AuxK, Gated's auxiliary
        reconstruction), all in normalised units."""
        check_activations(batch, self.source.row_width)
        module, config = self.module, self.config
        module.train()
        inputs, targets = self.source.split(batch)
        x, target = module.normalise(inputs), module.normalise_target(targets)
        reconstruction, f, z = module.forward_normalised(x)
        self._track_firing(f)
        terms = {"reconstruction": squared_error(target, reconstruction)}
        if config.matryoshka_prefixes:
            terms["reconstruction"] = terms["reconstruction"] + matryoshka_loss(
                target, f, module.W_d, module.offset(x), config.matryoshka_prefixes
            )
        coefficients = {"reconstruction": 1.0, "sparsity": config.penalty.coeff}
        if config.penalty.name != "none" and config.penalty.coeff:
            penalised = module.penalised(f, z)
            terms["sparsity"] = sparsity_penalty(penalised, config.penalty, module.decoder_norms(), self.progress())
        for name, (value, coefficient) in module.extra_losses(
            LossInputs(x, target, reconstruction, f, z, self.dead)
        ).items():
            terms[name], coefficients[name] = value, coefficient
        loss = sum(coefficients[name] * value for name, value in terms.items())
        return StepOutput(loss=loss, terms=terms)

    def dead(self) -> Tensor:
        """Latents that have not fired within the last `dead_window` training samples."""
        return self.module.samples_since_fired >= self.config.dead_window

    @torch.no_grad()
    def _track_firing(self, f: Tensor) -> None:
        """Count samples since each latent last fired, over the global batch (all ranks)."""
        fired = distributed.any_across_ranks(f.detach().amax(0) > 0)  # latents are never negative
        self.module.samples_since_fired.add_(f.shape[0] * distributed.world_size()).masked_fill_(fired, 0)

    def begin_step(self, step: int, total_steps: int) -> None:
        """Nothing to schedule here: the dictionary's own schedules count steps in its module (`step`)."""

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Unit-norm decoder rows (in place, so the optimiser keeps its state for the same tensor); the
        architecture's own constraints (`Dictionary.constrain`); dead latents resampled on the configured cadence."""
        self.module.step += 1
        if self.config.unit_norm_decoder:
            self.module.W_d.copy_(F.normalize(self.module.W_d, dim=1))
        self.module.constrain()
        step, every = int(self.module.step), self.config.resample_every
        if every and step % every == 0 and step <= self.config.resample_until * self.total_steps:
            self.resample_dead(optimizer)

    @torch.no_grad()
    def resample_dead(self, optimizer: torch.optim.Optimizer) -> int:
        """Point every dead latent at an input the dictionary reconstructs badly (Bricken et al. 2023): draw
        inputs with probability ∝ squared loss², set the atom to the normalised residual `x − x̂` (the part not yet
        explained), the encoder column to the atom at `resample_encoder_norm` × the mean live column norm, the
        encoder bias to 0 (and what the architecture resets, `Dictionary.reset_latents`: a JumpReLU threshold to its
        initial value), and zero those entries' Adam moments. With
        `resample_duplicates`, the later copy of each near-duplicate pair is freed the same way (it adds nothing a
        single atom does not); with `resample_misaligned`, so is a latent whose atom sits between features
        (`atom_alignment` below the threshold on the resampling inputs). With `resample_refit`, inputs are drawn and
        atoms set by the `unexplained` residual instead, so that a rare feature no atom makes stands out from the
        shrinkage every input carries. Returns the number resampled."""
        module, config = self.module, self.config
        dead = self.dead()
        if config.resample_duplicates:
            dead = dead | scores.later_duplicates(module.W_d)
        if not bool(dead.any()) and not config.resample_misaligned:
            return 0
        generator = self._generator("resample", int(module.step))
        inputs, targets = self.source.split(self.source.sample(config.resample_samples, generator))
        x = module.normalise(inputs)
        module.eval()
        reconstruction, f, _ = module.forward_normalised(x)
        module.train()
        residual = module.normalise_target(targets) - reconstruction
        if config.resample_misaligned:
            dead = dead | misaligned(scores.atom_alignment(residual, f, module.W_d), dead, config.resample_misaligned)
        rows = dead.nonzero().squeeze(1)
        if rows.numel() == 0:
            return 0
        if config.resample_refit:
            residual = unexplained(module.normalise_target(targets), f, module.W_d, module.offset(x))
        weights = residual.square().sum(1).square()
        if not bool(weights.sum() > 0):
            weights = torch.ones_like(weights)
        chosen = torch.multinomial(weights, rows.numel(), replacement=rows.numel() > x.shape[0], generator=generator)
        atoms = F.normalize(residual[chosen], dim=1)
        encoder = F.normalize(x[chosen], dim=1) if module.transcoder else atoms
        live_norm = module.W_e[:, ~dead].norm(dim=0).mean() if bool((~dead).any()) else module.W_e.new_tensor(1.0)
        module.W_d[rows] = atoms
        module.W_e[:, rows] = encoder.T * (config.resample_encoder_norm * live_norm)
        module.b_e[rows] = 0.0
        resampled = [(module.W_d, rows), (module.W_e, (slice(None), rows)), (module.b_e, rows)]
        resampled += module.reset_latents(rows)
        for parameter, index in resampled:
            for moment in ("exp_avg", "exp_avg_sq"):
                if moment in optimizer.state.get(parameter, {}):
                    optimizer.state[parameter][moment][index] = 0.0
        module.samples_since_fired[rows] = 0
        return rows.numel()

    @torch.no_grad()
    def latent_density(self) -> Tensor:
        """(width,): the fraction of the fixed evaluation batch on which each latent fires."""
        self.module.eval()
        x, _ = self.source.split(self.source.sample(self.eval_batch_size, self._generator("eval")))
        return (self.module(x)[1] > 0).float().mean(0)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Reconstruction, sparsity and (for sources with known features) recovery on a fixed evaluation batch."""
        self.module.eval()
        generator = self._generator("eval")
        if self.source.sample_with_coefficients is not None:
            batch, coefficients = self.source.sample_with_coefficients(self.eval_batch_size, generator)
        else:
            batch, coefficients = self.source.sample(self.eval_batch_size, generator), None
        x, target = self.source.split(batch)
        module, scale = self.module, self.module.target_scale()
        reconstruction, normalised_latents, _ = module(x)
        f = normalised_latents / scale
        dead = self.dead()
        results = {
            "fvu": scores.fvu(target, reconstruction),
            "reconstruction_cosine": scores.reconstruction_cosine(target, reconstruction),
            "norm_ratio": scores.norm_ratio(target, reconstruction),
            "l0": scores.l0(f),
            "dead_fraction": float(dead.double().mean()),
            "dead_latents": float(dead.sum()),
            "duplicate_latents": float(scores.duplicate_latents(module.W_d)),
        }
        if self.source.true_features is not None:
            cosines = scores.cosine_matrix(self.source.true_features.to(self.device), module.W_d)
            results |= {
                "recall_mmcs": scores.recall_mmcs(cosines),
                "precision_mmcs": scores.precision_mmcs(cosines),
                "mcc": scores.hungarian_mcc(cosines),
                **{f"matched/{t}": scores.matched_fraction(cosines, t) for t in scores.MATCH_THRESHOLDS},
            }
            if coefficients is not None:
                norms = module.decoder_norms()
                results["shrinkage"] = scores.shrinkage(coefficients, f, cosines, norms)
                if self.config.refit_magnitudes:
                    x_normalised = module.normalise(x)
                    refitted = refit_magnitudes(
                        module.normalise_target(target), normalised_latents, module.W_d, module.offset(x_normalised)
                    )
                    results["fvu_refit"] = scores.fvu(target, module.decode(refitted, x_normalised) / scale)
                    results["shrinkage_refit"] = scores.shrinkage(coefficients, refitted / scale, cosines, norms)
                if self.source.parents is not None:
                    parents = self.source.parents.to(self.device)
                    results["parent_recall"] = scores.parent_recall(coefficients, f, cosines, parents)
                    results["absorption"] = scores.absorption(coefficients, f, cosines, parents)
        if self.extra_evaluation is not None:
            results |= self.extra_evaluation(self.reconstruct)
        module.train()
        return results

    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(x̂, latents) in the source's own units and on x's device, for evaluations outside the training batch
        (a language model's spliced-in evaluation runs where the model is)."""
        reconstruction, normalised_latents, _ = self.module(x.to(self.device))
        latents = normalised_latents / self.module.target_scale()
        return reconstruction.to(x.device), latents.to(x.device)


def misaligned(alignment: Tensor, dead: Tensor, fraction: float) -> Tensor:
    """Latents whose atom alignment is below `fraction` of the median live latent's. Relative, because every
    latent's alignment falls with the noise in the residual (more superposition, a looser fit): an absolute bar
    that frees only mixtures at one shape frees well-placed latents at another, and they never settle."""
    live = alignment[~dead & (alignment > 0)]
    typical = live.median() if live.numel() else alignment.new_tensor(1.0)
    return alignment < fraction * typical


def check_truth_init(source: ActivationSource, width: int) -> None:
    """`init: truth` starts every atom (and its encoder column) on one true feature, which needs a source that has
    them, one latent per feature, and a dictionary that reconstructs its own input."""
    truth = source.true_features
    if truth is None or source.output_dim is not None:
        raise ConfigError(
            f"method.init=truth starts the atoms on the true features, which {source.name} does not have (or a "
            "transcoder, which reads another space); use method.init=random or data"
        )
    if truth.shape[0] != width:
        raise ConfigError(
            f"method.init=truth puts one latent on each of the {truth.shape[0]} true features, but method.width is "
            f"{width}; set method.width={truth.shape[0]}"
        )


def check_activations(x: Tensor, dim: int) -> None:
    """Activations must be finite and of the dictionary's dimension; say which and how to fix it."""
    if x.dim() != 2 or x.shape[1] != dim:
        raise UnmergeError(
            f"activations have shape {tuple(x.shape)}, but the dictionary expects (batch, {dim}); "
            "check the hook point or the dictionary's input dimension"
        )
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(1).sum())
        raise UnmergeError(
            f"{bad} of {x.shape[0]} activation vectors contain NaN or infinity; "
            "fix or filter the source before training a dictionary on it"
        )
