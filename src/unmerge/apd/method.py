"""APD as a method of the one training loop (DESIGN.md §4 "APD"): Attribution-based Parameter Decomposition, the
baseline SPD replaced.

C parameter components each hold a matrix `P^l_c` of rank m at every site l; the target weight is approximated by
`Σ_c P^l_c`. A component at a site is m rank-1 pieces `U[:, c·m + r] V[c·m + r]` of the decomposed model SPD uses
(`ComponentModel`, without causal-importance functions), so masking a component masks its m pieces together and
every pass (masked, ablated) is SPD's.

Per input, a component's attribution is `A_c(x) = (1/O) Σ_o (Σ_l Σ_ij ∂f_o/∂W^l_ij P^l_c,ij)²` over the O outputs,
computed through the sites' outputs y: `Σ_ij ∂f_o/∂W_ij P_c,ij = ∂f_o/∂y · P_c a`, so batched backward passes of
the target over the O output directions give `∂f_o/∂y` at every site, each contracted with every component's
contribution `P_c a` to it (never a weight-shaped gradient, never a pass per component). Batch top-k keeps the
`topk`·B largest attributions of the batch (the global batch under torchrun); the kept components of an input are
its active ones.

Losses: faithfulness (SPD's), minimality (the output divergence with only the active components), optionally each
site's output reconstructed in that pass, and simplicity, the Schatten-p proxy
`(1/(B N)) Σ_b Σ_{c active} Σ_l Σ_r (‖U_{c,r}‖² ‖V_{c,r}‖²)^{p/2}` with N the decomposed weights' entries (the APD
paper's normalisation; the power is taken per piece, so p < 1 favours fewer pieces, as a Schatten norm does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from unmerge import metrics
from unmerge.config import APDConfig, SiteConfig
from unmerge.errors import ConfigError
from unmerge.spd.losses import output_divergence
from unmerge.spd.model import CleanPass, ComponentModel, DecomposedSite
from unmerge.spd.sites import find_sites
from unmerge.targets.base import Target
from unmerge.train import distributed
from unmerge.train.devices import device_of
from unmerge.train.loop import StepOutput
from unmerge.train.rng import step_generator

SCHATTEN_EPSILON = 1e-16  # keeps the gradient of x^(p/2) finite at 0 for p < 2
OUTPUT_CHUNK = 64  # output directions per batched backward pass (bounds the memory of the Jacobian)


def batch_top_k(attributions: Tensor, k: float, across_ranks: bool = False) -> Tensor:
    """(B, C) → bool (B, C): the `round(k·B)` largest attributions over the whole batch (at least one). With
    `across_ranks`, the batch is the global one under torchrun (each rank holding its part), as on one process."""
    _, chosen, _ = distributed.top_of_batch(attributions, k, across_ranks)
    active = torch.zeros(attributions.numel(), dtype=torch.bool, device=attributions.device)
    active[chosen] = True
    return active.view_as(attributions)


def schatten_proxy(U: Tensor, V: Tensor, rank: int, pnorm: float) -> Tensor:
    """Per component at one site, `Σ_r (‖U_{c,r}‖² ‖V_{c,r}‖²)^{p/2}` over its `rank` pieces, the proxy of its
    Schatten-p norm `Σ_r σ_r^p` (each piece's norm standing for a singular value): (C,)."""
    pieces = U.square().sum(0) * V.square().sum(1)
    return (pieces + SCHATTEN_EPSILON).pow(pnorm / 2).view(-1, rank).sum(1)


class APD:
    """APD of a target's sites (module docstring): `model` is the decomposed model, `module` what training learns
    and checkpoints (every site's U and V)."""

    def __init__(self, target: Target, config: APDConfig, seed: int, eval_batch_size: int = 4096) -> None:
        self.target = target
        self.config = config
        self.seed = seed
        self.eval_batch_size = eval_batch_size
        found = find_sites(target.model, [SiteConfig(pattern=pattern, C=1) for pattern in config.sites])
        self.ranks = {site.name: config.rank or min(site.site.weight.shape) for site in found}
        sites = [SiteConfig(pattern=name, C=config.C * rank) for name, rank in self.ranks.items()]
        self.model = ComponentModel(target.model, sites, None, step_generator(seed, "init"))
        self.module = self.model.sites

    @property
    def device(self) -> torch.device:
        return device_of(self.model)

    def to(self, device: torch.device) -> None:
        self.model.to(device)

    @torch.no_grad()
    def before_training(self) -> None:
        """Start from SPD's initialisation (every piece pointing along the target weight), or with `init_std` from
        small random factors: then no component starts as large as a feature, so components that top-k never keeps
        cannot hold features unseen (they cost neither minimality nor simplicity)."""
        if self.config.init_std is None:
            return
        generator = step_generator(self.seed, "apd-init")
        for factor in self.model.component_parameters():
            drawn = torch.randn(factor.shape, generator=generator) * self.config.init_std
            factor.copy_(drawn.to(factor.device, factor.dtype))

    def begin_step(self, step: int, total_steps: int) -> None:
        """Nothing changes with the step."""

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """With `unit_norm_inputs`, renormalise every piece's input direction (a row of V, a column of A)."""
        if self.config.unit_norm_inputs:
            for record in self.model.sites.values():
                if record.components is not None:
                    V = record.components.V
                    V.div_(V.norm(dim=1, keepdim=True).clamp(min=1e-12))

    def _expanded(self, component_masks: Tensor) -> dict[str, Tensor]:
        """Component masks (…, C) as every site's piece masks (…, C·m)."""
        return {name: component_masks.repeat_interleave(rank, dim=-1) for name, rank in self.ranks.items()}

    @torch.no_grad()
    def attributions(self, x: Tensor, clean: CleanPass, inner: dict[str, Tensor]) -> Tensor:
        """`A_c(x)` of every component on every input (module docstring), from the clean pass and its inner
        activations `inner` (`ComponentModel.inner_acts`): (B, C), no gradient."""
        contributions = {name: self._contributions(name, h) for name, h in inner.items()}
        offsets = {name: torch.zeros_like(clean.site_outputs[name], requires_grad=True) for name in self.ranks}
        with torch.enable_grad(), self.model.edited_weights({}, offsets):
            output = self.model.target(x)
        if output.dim() != 2:
            raise ConfigError(
                f"APD attributes a (batch, outputs) output; {self.target.name}'s is {tuple(output.shape)}: "
                "decompose it with SPD (method.kind: spd)"
            )
        total = output.new_zeros(output.shape[0], self.config.C)
        eye = torch.eye(output.shape[-1], device=output.device)
        for rows in eye.split(OUTPUT_CHUNK):  # one batched backward pass per chunk of output directions
            directions = rows[:, None, :].expand(-1, *output.shape)
            gradients = torch.autograd.grad(
                output, list(offsets.values()), directions, is_grads_batched=True, retain_graph=True
            )
            along = sum(
                torch.einsum("obd,bcd->obc", gradient, contributions[name])
                for name, gradient in zip(offsets, gradients, strict=True)
            )
            total = total + along.square().sum(0)
        return total / output.shape[-1]

    def _contributions(self, site: str, h: Tensor) -> Tensor:
        """What each component adds to the site's output, `P_c a = Σ_r U_{c,r} h_{c,r}`: (B, C, d_out)."""
        rank, U = self.ranks[site], self.model.site_components(site).U
        return torch.einsum("bcr,dcr->bcd", h.view(len(h), -1, rank), U.view(U.shape[0], -1, rank))

    def active(self, x: Tensor, clean: CleanPass, inner: dict[str, Tensor], across_ranks: bool = False) -> Tensor:
        """Bool (B, C): each input's components kept by batch top-k on the attributions (over the global batch
        with `across_ranks`: training under torchrun)."""
        return batch_top_k(self.attributions(x, clean, inner), self.config.topk, across_ranks)

    def simplicity(self, active: Tensor) -> Tensor:
        """`(1/(B N)) Σ_b Σ_{c active} Σ_l` Schatten proxy of component c at site l, N the number of decomposed
        weight entries (as faithfulness is a mean over them)."""
        per_component = sum(
            schatten_proxy(
                self.model.site_components(name).U, self.model.site_components(name).V, rank, self.config.pnorm
            )
            for name, rank in self.ranks.items()
        )
        entries = sum(self.model.target_weight(name).numel() for name in self.ranks)
        return (active.float().mean(0) * per_component).sum() / entries

    def reconstructions(
        self, x: Tensor, clean: CleanPass, inner: dict[str, Tensor], active: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """(the output divergence with only the active components, the mean over sites of each site's output
        error in that pass, or None unless `activation_recon_coeff` asks for it)."""
        outputs: dict[str, Tensor] = {}

        def observe(record: DecomposedSite, output: Tensor) -> None:
            outputs[record.name] = output

        track = bool(self.config.activation_recon_coeff)
        masks = self._expanded(active.to(clean.output.dtype))
        output = self.model.masked_pass(x, masks, clean, inner, observer=observe if track else None)
        divergence = output_divergence(output, clean.output, self.config.output_loss)
        if not track:
            return divergence, None
        errors = [F.mse_loss(outputs[name], clean.site_outputs[name]) for name in self.ranks]
        return divergence, torch.stack(errors).mean()

    def training_loss(self, batch: Tensor, generator: torch.Generator) -> StepOutput:
        config = self.config
        with self.model.attached():
            clean = self.model.clean_pass(batch)
            inner = self.model.inner_acts(clean)
            active = self.active(batch, clean, inner, across_ranks=True)
            minimality, activations = self.reconstructions(batch, clean, inner, active)
            terms = {"faithfulness": self.model.faithfulness(), "minimality": minimality}
            if activations is not None:
                terms["activation_recon"] = activations
            terms["simplicity"] = self.simplicity(active)
        coefficients = {
            "faithfulness": config.faithfulness_coeff,
            "minimality": config.minimality_coeff,
            "activation_recon": config.activation_recon_coeff,
            "simplicity": config.simplicity_coeff,
        }
        return StepOutput.weighted(terms, coefficients)

    @torch.no_grad()
    def one_hot_attributions(self) -> Tensor:
        """Attributions on one input per feature, each row over its largest: (features, C) in [0, 1]."""
        x = self.target.one_hot_inputs(self.device)
        with self.model.attached():
            clean = self.model.clean_pass(x)
            attributions = self.attributions(x, clean, self.model.inner_acts(clean))
        return attributions / attributions.amax(-1, keepdim=True).clamp(min=torch.finfo(attributions.dtype).tiny)

    def evaluation_batch(self) -> Tensor:
        return self.target.sample_inputs(self.eval_batch_size, step_generator(self.seed, "eval", device=self.device))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Faithfulness, the top-k reconstruction, attribution L0 and alive components on a fixed evaluation batch,
        plus ground-truth scores when the target has them."""
        x = self.evaluation_batch()
        with self.model.attached():
            clean = self.model.clean_pass(x)
            inner = self.model.inner_acts(clean)
            active = self.active(x, clean, inner)
            minimality, activations = self.reconstructions(x, clean, inner, active)
            everything = self.model.masked_pass(
                x, self._expanded(torch.ones_like(active, dtype=clean.output.dtype)), clean, inner
            )
            faithfulness = float(self.model.faithfulness())
        results = {
            "faithfulness": faithfulness,
            "faithfulness_relative": faithfulness / self.model.weight_mean_square(),
            "topk_recon": float(minimality),
            "unmasked_recon": float(output_divergence(everything, clean.output, self.config.output_loss)),
            "simplicity": float(self.simplicity(active)),
            "attribution_l0": float(active.float().sum(-1).mean()),
            "alive": float(active.any(0).sum()),
        }
        if activations is not None:
            results["activation_recon"] = float(activations)
        if self.target.ground_truth is not None:
            results |= self.ground_truth_metrics()
        return results

    def ground_truth_metrics(self) -> dict[str, float]:
        """MMCS/ML2R of the components on sites with known feature directions, and for each known dense mechanism
        (TMS+ID's identity) how much of its weight the one component holding most of it holds, and how many
        components hold more than a tenth of it."""
        truth = self.target.ground_truth
        assert truth is not None
        results: dict[str, float] = {}
        recoveries = []
        for name, axis in truth.feature_directions.items():
            if name not in self.ranks:
                continue
            components = self.model.site_components(name)
            W, U, V = (t.detach().cpu() for t in (self.model.target_weight(name), components.U, components.V))
            recovery = metrics.feature_recovery(W, U, V, axis, rank=self.ranks[name])
            recoveries.append(recovery)
            results |= {f"mmcs/{name}": recovery.mmcs, f"ml2r/{name}": recovery.ml2r}
        if recoveries:
            results["mmcs"] = sum(r.mmcs for r in recoveries) / len(recoveries)
            results["ml2r"] = sum(r.ml2r for r in recoveries) / len(recoveries)
            results["matrix_cosine"] = sum(r.matrix_cosine for r in recoveries) / len(recoveries)
        for group, (sites, _) in truth.dense_sites.items():
            shares = [self.component_shares(site) for site in sites if site in self.ranks]
            if shares:
                share = torch.stack(shares).mean(0)
                results[f"dense_largest_share/{group}"] = float(share.max())
                results[f"dense_components/{group}"] = float((share > 0.1).sum())
        return results

    def component_shares(self, site: str) -> Tensor:
        """Per component, the Frobenius norm of its matrix at `site` over the target weight's: (C,)."""
        components, rank = self.model.site_components(site), self.ranks[site]
        U, V = components.U.detach().cpu(), components.V.detach().cpu()
        d_out, d_in = U.shape[0], V.shape[1]
        matrices = torch.einsum("ocr,crn->con", U.view(d_out, -1, rank), V.view(-1, rank, d_in))
        return matrices.norm(dim=(1, 2)) / self.model.target_weight(site).detach().cpu().float().norm()
