"""SPD's `--dry-run`: its sites, subcomponents and parameters, and the activations a step keeps, from the target's
shapes alone (nothing is decomposed or trained)."""

from __future__ import annotations

import torch

from unmerge.config import SPDConfig
from unmerge.spd.components import CI_BLOCK_ELEMENTS
from unmerge.spd.sites import find_sites
from unmerge.targets.base import Target
from unmerge.train.plan import StepPlan
from unmerge.train.rng import step_generator

MASK_VALUES = 8  # per subcomponent and row: inner activation, γ, lower/upper sigmoids, noise, mask, their grads
CI_BLOCK_COPIES = 3  # torch's per-subcomponent CI holds its pre-activation, GELU and product of one block at once


def gradient_passes(config: SPDConfig, n_sites: int) -> int:
    """Forward passes through the target whose activations a step keeps for backward."""
    passes = int(bool(config.stochastic_recon_coeff)) + int(bool(config.adversarial_recon_coeff))
    return passes + (n_sites if config.layerwise_recon_coeff else 0)


def spd_plan(target: Target, config: SPDConfig) -> StepPlan:
    """Sites (C, weight shape, parameters: U, V and the CI MLPs) and per-row activation counts."""
    with torch.no_grad():
        output = target.model(target.sample_inputs(1, step_generator(0, "plan")))
    output_width = output.shape[-1]
    found = find_sites(target.model, config.sites)
    plan = StepPlan(
        title=f"SPD of {target.name}: {len(found)} sites, {sum(s.C for s in found):,} subcomponents",
        rows_per_example=output.numel() // output_width,
        frozen_parameters=sum(p.numel() for p in target.model.parameters()),
        frozen_bytes_each=next(target.model.parameters()).element_size(),
    )
    passes = gradient_passes(config, len(found))
    total_C = sum(site.C for site in found)
    for site in found:
        d_out, d_in = site.site.weight.shape
        ci_mlp = 0 if config.ci_function == "global_mlp" else site.C * (3 * config.ci_hidden + 1)
        plan.parts.append((site.name, site.C * (d_in + d_out) + ci_mlp, f"C={site.C}, W {d_out}×{d_in}"))
        clean = d_in + (d_out if config.layerwise_recon_coeff else 0)  # outputs are kept for layerwise passes only
        plan.activations_per_row += site.C * MASK_VALUES + clean + (d_in + d_out + site.C) * passes
    if config.ci_function == "global_mlp":
        widths = [total_C, *config.global_ci_hidden, total_C]
        weights = sum(into * out + out for into, out in zip(widths, widths[1:], strict=False))
        plan.parts.append(("global CI function", weights, f"MLP {' → '.join(map(str, widths))}"))
        plan.activations_per_row += 2 * sum(config.global_ci_hidden)
    else:  # the hidden layer is recomputed in backward, never kept: a block of rows at a time
        plan.working_name = "CI blocks (transient)"
        plan.working_per_row = CI_BLOCK_COPIES * total_C * config.ci_hidden
        plan.working_cap = CI_BLOCK_COPIES * CI_BLOCK_ELEMENTS
    plan.activations_per_row += output_width * 3 * (passes + 1)  # outputs and the divergence's softmaxes
    return plan
