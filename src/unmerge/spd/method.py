"""SPD as a method of the one training loop: the loss of a batch, and evaluation against the target."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor, nn

from unmerge import metrics
from unmerge.config import SPDConfig
from unmerge.metrics import language
from unmerge.spd import losses
from unmerge.spd.components import leaky_hard_sigmoids, uses_c_kernel
from unmerge.spd.model import CleanPass, ComponentModel
from unmerge.targets.base import Target
from unmerge.targets.language import CausalLM
from unmerge.train import distributed
from unmerge.train.devices import device_of
from unmerge.train.loop import StepOutput
from unmerge.train.rng import step_generator

Routes = dict[str, Tensor] | None  # per site, where (bool per input position) the stochastic pass masks it


@dataclass
class Importances:
    """Causal importances of one batch, all sites concatenated along the last axis (elementwise work is done
    once for all sites): `lower_all` feeds masks (per-site views in `lower`), `upper_all` the penalty."""

    inner: dict[str, Tensor]
    lower_all: Tensor
    upper_all: Tensor
    lower: dict[str, Tensor]

    def clipped(self) -> dict[str, Tensor]:
        """CI in [0, 1] per site, for metrics: the sigmoids' leaks exist for gradients, not for reading."""
        return {name: g.clamp(0.0, 1.0) for name, g in self.lower.items()}


class SPD:
    """Stochastic Parameter Decomposition of a target's sites (DESIGN.md §4): `model` is the decomposed model
    (target and decomposition, `ComponentModel`), `module` the decomposition alone (what training learns)."""

    def __init__(self, target: Target, config: SPDConfig, seed: int, eval_batch_size: int = 4096) -> None:
        self.target = target
        self.config = config
        self.seed = seed
        self.eval_batch_size = eval_batch_size
        self.pnorm = config.pnorm  # this step's p (`begin_step`); the configured start until training moves it
        self.counting = config.importance_count_start == 0.0  # whether the importance-count term weighs in now
        self.model = ComponentModel(
            target.model,
            config.sites,
            config.ci_hidden,
            step_generator(seed, "init"),
            c_kernel=uses_c_kernel(config.ci_kernel, device_of(target.model)),
            global_ci_hidden=config.global_ci_hidden if config.ci_function == "global_mlp" else None,
        )
        if config.adversarial_persistent:  # the worst-case r, a checkpointed buffer of each site
            draws = step_generator(seed, "adversarial-init")
            for record in self.model.sites.values():
                record.register_buffer("worst_r", torch.rand(record.C, generator=draws).to(self.device))
        # what training learns and checkpoints: the decomposition (and a global CI function), not the target
        self.module: nn.Module = (
            self.model.sites
            if self.model.global_ci is None
            else nn.ModuleDict({"sites": self.model.sites, "global_ci": self.model.global_ci})
        )

    def before_training(self) -> None:
        """Faithfulness warm-up: fit U V to W alone for a few data-free steps, so training starts near W = U V.
        The loop calls this only on a fresh start; a resumed or evaluated run loads its weights instead."""
        if not self.config.faithfulness_warmup_steps:
            return
        optimizer = torch.optim.Adam(self.model.component_parameters(), lr=self.config.faithfulness_warmup_lr)
        for _ in range(self.config.faithfulness_warmup_steps):
            optimizer.zero_grad(set_to_none=True)
            with self.model.attached():
                self.faithfulness().backward()
            optimizer.step()

    def begin_step(self, step: int, total_steps: int) -> None:
        """Set p of the importance penalty for this step (`losses.annealed_pnorm`), and whether the importance-count
        term weighs in (from `importance_count_start`)."""
        c = self.config
        progress = step / max(total_steps, 1)
        self.pnorm = losses.annealed_pnorm(c.pnorm, c.pnorm_final, c.pnorm_anneal_start, c.pnorm_anneal_end, progress)
        self.counting = progress >= c.importance_count_start

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """SPD's parameters are unconstrained."""

    @property
    def device(self) -> torch.device:
        return device_of(self.model)

    def to(self, device: torch.device) -> None:
        """Move the target and the decomposition; the C kernel serves CPU runs only."""
        self.model.to(device)
        self.model.c_kernel = uses_c_kernel(self.config.ci_kernel, device)

    def importances(self, clean: CleanPass) -> Importances:
        inner = self.model.inner_acts(clean)
        gamma = self.model.causal_importance(inner)
        lower_all, upper_all = leaky_hard_sigmoids(gamma, self.config.leak, self.model.c_kernel)
        return Importances(inner, lower_all, upper_all, self.model.split_sites(lower_all))

    def faithfulness(self) -> Tensor:
        """`‖W − UV‖²` (`ComponentModel.faithfulness`)."""
        return self.model.faithfulness()

    def _divergence(
        self, x: Tensor, masks: dict[str, Tensor], clean: CleanPass, ci: Importances, routes: Routes = None
    ) -> Tensor:
        return self.output_divergence(self.model.masked_pass(x, masks, clean, ci.inner, routes), clean.output)

    def output_divergence(self, output: Tensor, original: Tensor) -> Tensor:
        """D(original ‖ output): the target's own divergence if it has one, else the config's."""
        if self.target.divergence is not None:
            return self.target.divergence(output, original)
        return losses.output_divergence(output, original, self.config.output_loss)

    def covered_powers(self, powers: Tensor, term: Literal["importance_frequency", "importance_count"]) -> list[Tensor]:
        """The `g⁺^p` (all sites concatenated) of the sites a per-site term covers (`SiteConfig.importance_frequency`
        or `.importance_count`): the whole tensor when it covers every site, else one view per site."""
        covered = {site.pattern for site in self.config.sites if getattr(site, term)}
        if len(covered) == len(self.config.sites):
            return [powers]
        per_site = self.model.split_sites(powers)
        return [per_site[record.name] for record in self.model.sites.values() if record.pattern in covered]

    def stochastic_masks(self, ci: Importances, generator: torch.Generator) -> dict[str, Tensor]:
        """One mask sample for every site (S = 1), shared by the all-sites and the layerwise passes; with
        `delta_component`, each site's mask has one more column, its delta component's, drawn from U[0, 1)."""
        masks = self.model.split_sites(losses.stochastic_masks(ci.lower_all, generator, self.model.c_kernel))
        if not self.config.delta_component:
            return masks
        g = ci.lower_all
        delta = torch.rand((*g.shape[:-1], len(masks)), generator=generator, device=g.device, dtype=g.dtype)
        return {name: torch.cat([mask, delta[..., i : i + 1]], -1) for i, (name, mask) in enumerate(masks.items())}

    def adversarial_masks(
        self, x: Tensor, clean: CleanPass, ci: Importances, generator: torch.Generator, keep: bool = False
    ) -> dict[str, Tensor]:
        """Masks `g + (1 − g) r` for every site, with r moved from a uniform draw by `adversarial_steps` projected
        sign-gradient ascent steps on the all-sites divergence (g and the weights held fixed during the search):
        close to the worst partial ablation the CI permits. Gradients flow through g as for stochastic masks.
        With `adversarial_persistent`, r is one value per subcomponent (its gradient pooled over the batch and
        averaged over ranks), starting from the one kept in the sites (`worst_r`), where `keep` stores it back."""
        g = ci.lower_all.detach()
        fixed = replace(ci, inner={name: h.detach() for name, h in ci.inner.items()})
        persistent = self.config.adversarial_persistent
        if persistent:
            r = torch.cat([record.worst_r for record in self.model.sites.values()]).to(g.dtype)
        else:
            r = torch.rand(g.shape, generator=generator, dtype=g.dtype, device=g.device)
        for _ in range(self.config.adversarial_steps):
            r.requires_grad_(True)
            with torch.enable_grad():
                divergence = self._divergence(x, self.model.split_sites(g + (1 - g) * r), clean, fixed)
                (gradient,) = torch.autograd.grad(divergence, r)
            gradient = distributed.mean_tensor(gradient) if persistent else gradient
            r = (r.detach() + self.config.adversarial_step_size * gradient.sign()).clamp(0.0, 1.0)
        if persistent and keep:
            for record, kept in zip(self.model.sites.values(), self.model.split_sites(r).values(), strict=True):
                record.worst_r.copy_(kept)
        return self.model.split_sites(ci.lower_all + (1 - ci.lower_all) * r)

    def stochastic_recon(
        self, x: Tensor, clean: CleanPass, ci: Importances, masks: dict[str, Tensor], routes: Routes = None
    ) -> Tensor:
        """All sites masked (or, per input, those `routes` choose)."""
        return self._divergence(x, masks, clean, ci, routes)

    def subset_routes(self, ci: Importances, generator: torch.Generator) -> dict[str, Tensor]:
        """Per input position, a uniformly random non-empty subset of the sites (`routing: subset`): a size k
        uniform in 1 … n, then the k sites whose uniform scores rank lowest; (…,) bool per site."""
        lead, n = ci.lower_all.shape[:-1], len(self.model.site_names)
        device = ci.lower_all.device
        k = torch.randint(1, n + 1, lead, generator=generator, device=device)
        ranks = torch.rand((*lead, n), generator=generator, device=device).argsort(-1).argsort(-1)
        chosen = ranks < k.unsqueeze(-1)
        return {name: chosen[..., i] for i, name in enumerate(self.model.site_names)}

    def layerwise_recon(self, x: Tensor, clean: CleanPass, ci: Importances, masks: dict[str, Tensor]) -> Tensor:
        """Mean over sites of the divergence with only that site masked."""
        terms = [self._divergence(x, {name: mask}, clean, ci) for name, mask in masks.items()]
        return torch.stack(terms).mean()

    def training_loss(self, batch: Tensor, generator: torch.Generator) -> StepOutput:
        with self.model.attached():
            return self._training_loss(batch, generator)

    def _training_loss(self, batch: Tensor, generator: torch.Generator) -> StepOutput:
        config = self.config
        clean = self.model.clean_pass(batch, outputs=bool(config.layerwise_recon_coeff))
        ci = self.importances(clean)
        powers = [losses.importance_powers(ci.upper_all, self.pnorm)]
        terms = {
            "faithfulness": self.faithfulness(),
            "importance_minimality": losses.importance_minimality_loss(powers),
        }
        if config.importance_frequency_coeff:
            covered = self.covered_powers(powers[0], "importance_frequency")
            terms["importance_frequency"] = losses.importance_frequency_loss(covered)
        if config.importance_count_coeff:
            terms["importance_count"] = losses.importance_count_loss(self.covered_powers(powers[0], "importance_count"))
        masks = self.stochastic_masks(ci, generator)
        if config.stochastic_recon_coeff:
            routes = self.subset_routes(ci, generator) if config.routing == "subset" else None
            terms["stochastic_recon"] = self.stochastic_recon(batch, clean, ci, masks, routes)
        if config.layerwise_recon_coeff:
            terms["layerwise_recon"] = self.layerwise_recon(batch, clean, ci, masks)
        if config.adversarial_recon_coeff:
            adversarial = self.adversarial_masks(batch, clean, ci, generator, keep=True)
            terms["adversarial_recon"] = self._divergence(batch, adversarial, clean, ci)
        coefficients = {
            "faithfulness": config.faithfulness_coeff,
            "importance_minimality": config.importance_minimality_coeff,
            "importance_frequency": config.importance_frequency_coeff,
            "importance_count": config.importance_count_coeff if self.counting else 0.0,
            "stochastic_recon": config.stochastic_recon_coeff,
            "layerwise_recon": config.layerwise_recon_coeff,
            "adversarial_recon": config.adversarial_recon_coeff,
        }
        return StepOutput.weighted(terms, coefficients)

    def one_hot_importance(self) -> dict[str, Tensor]:
        """CI in [0, 1] per site on one input per feature."""
        with torch.no_grad():
            return self.importances(self.model.clean_pass(self.target.one_hot_inputs(self.device))).clipped()

    def evaluation_batch(self) -> Tensor:
        return self.target.sample_inputs(self.eval_batch_size, step_generator(self.seed, "eval", device=self.device))

    def evaluation_importance(self) -> dict[str, Tensor]:
        """CI in [0, 1] per site on the fixed evaluation batch."""
        with torch.no_grad():
            return self.importances(self.model.clean_pass(self.evaluation_batch())).clipped()

    def fsdp_units(self) -> list[nn.Module]:
        """What FSDP2 shards (`train.fsdp`): each site, so a step gathers one site's subcomponents at a time, and
        the global CI function."""
        return list(self.model.sites.values()) + ([self.model.global_ci] if self.model.global_ci is not None else [])

    @torch.no_grad()
    def evaluate(self, x: Tensor | None = None) -> dict[str, float]:
        """Metrics on `x` (default: the fixed evaluation batch), plus ground-truth scores when the target has them."""
        with self.model.attached():
            return self._evaluate(self.evaluation_batch() if x is None else x.to(self.device))

    def _evaluate(self, x: Tensor) -> dict[str, float]:
        clean = self.model.clean_pass(x, outputs=bool(self.config.layerwise_recon_coeff))
        ci = self.importances(clean)
        masks = self.stochastic_masks(ci, step_generator(self.seed, "eval-masks", device=self.device))
        ones = {name: torch.ones_like(g) for name, g in ci.lower.items()}
        results: dict[str, float] = {
            "faithfulness": float(self.faithfulness()),
            "faithfulness_relative": float(self.faithfulness()) / self.model.weight_mean_square(),
            "stochastic_recon": float(self.stochastic_recon(x, clean, ci, masks)),
            "unmasked_recon": float(self._divergence(x, ones, clean, ci)),
        }
        if self.config.layerwise_recon_coeff:  # one pass per site: on a whole model, only when it is trained on
            results["layerwise_recon"] = float(self.layerwise_recon(x, clean, ci, masks))
        ci_masked = self.model.masked_pass(x, ci.lower, clean, ci.inner)
        results["ci_masked_recon"] = float(self.output_divergence(ci_masked, clean.output))
        if self.config.adversarial_steps:
            generator = step_generator(self.seed, "eval-adversarial", device=self.device)
            adversarial = self.adversarial_masks(x, clean, ci, generator)
            results["adversarial_recon"] = float(self._divergence(x, adversarial, clean, ci))
        if isinstance(self.target.model, CausalLM):
            results |= self.next_token_losses(x, clean.output, ci_masked)
        elif self.config.output_loss == "mse":
            results["output_mean_square"] = float(clean.output.square().mean())  # the MSE of predicting 0
        for name, g in ci.clipped().items():
            results[f"alive/{name}"] = metrics.alive_count(g)
            for threshold in metrics.L0_THRESHOLDS:
                results[f"ci_l0/{name}/{threshold}"] = metrics.ci_l0(g, threshold)
        all_sites = ci.lower_all.clamp(0.0, 1.0)  # totals over every site: subcomponents alive, and active per input
        results["alive"] = metrics.alive_count(all_sites)
        for threshold in metrics.L0_THRESHOLDS:
            results[f"ci_l0/{threshold}"] = metrics.ci_l0(all_sites, threshold)
        if self.target.ground_truth is not None:
            results.update(self.ground_truth_metrics())
        return results

    def next_token_losses(self, ids: Tensor, original: Tensor, ci_masked: Tensor) -> dict[str, float]:
        """CE (nats per prediction, special tokens excluded by id) of the language model and of the model whose
        sites keep only their causally important subcomponents (masks = CI)."""
        counted = language.counted_predictions(self.target.model.ordinary_positions(ids))
        count = float(counted.sum().clamp(min=1))
        return {
            "ce_original": float(language.next_token_nll(original, ids, counted)[0]) / count,
            "ce_ci_masked": float(language.next_token_nll(ci_masked, ids, counted)[0]) / count,
        }

    def ground_truth_metrics(self) -> dict[str, float]:
        """MMCS/ML2R on sites with known feature directions; CI pattern errors on one-hot inputs."""
        truth = self.target.ground_truth
        assert truth is not None
        results: dict[str, float] = {}
        recoveries = []
        for name, axis in truth.feature_directions.items():
            if name not in self.model.site_C:
                continue
            components = self.model.site_components(name)
            W, U, V = (t.detach().cpu() for t in (self.model.target_weight(name), components.U, components.V))
            recovery = metrics.feature_recovery(W, U, V, axis)
            recoveries.append(recovery)
            results |= {
                f"mmcs/{name}": recovery.mmcs,
                f"ml2r/{name}": recovery.ml2r,
                f"matrix_cosine/{name}": recovery.matrix_cosine,
            }
        if recoveries:
            results["mmcs"] = sum(r.mmcs for r in recoveries) / len(recoveries)
            results["ml2r"] = sum(r.ml2r for r in recoveries) / len(recoveries)
            results["matrix_cosine"] = sum(r.matrix_cosine for r in recoveries) / len(recoveries)
        one_hot = self.one_hot_importance()
        errors = 0
        for group, sites in truth.feature_sites.items():
            if all(site in one_hot for site in sites):
                count = metrics.identity_pattern_errors(torch.cat([one_hot[s] for s in sites], dim=-1).cpu())
                results[f"ci_pattern_errors/{group}"] = count
                errors += count
        for group, (sites, rank) in truth.dense_sites.items():
            if all(site in one_hot for site in sites):
                count = metrics.dense_pattern_errors(torch.cat([one_hot[s] for s in sites], dim=-1).cpu(), rank)
                results[f"ci_pattern_errors/{group}"] = count
                errors += count
        results["ci_pattern_errors"] = errors
        return results
