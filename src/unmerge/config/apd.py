"""Attribution-based Parameter Decomposition (APD, DESIGN.md §4 "APD"): the baseline SPD replaced, configured as
the `method` section of a run (`kind: apd`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt

from unmerge.config.base import NonNegativeFloat, StrictModel


class APDConfig(StrictModel):
    """APD: C parameter components, each a matrix of rank ≤ `rank` at every site; per input, gradient
    attributions rank them and batch top-k keeps the `topk`·B largest over the batch.

    Example:
        >>> APDConfig(sites=["linear1", "linear2"], C=20, topk=0.211, simplicity_coeff=0.7)
    """

    kind: Literal["apd"] = "apd"
    sites: list[str] = Field(min_length=1, description="fnmatch patterns of the weights every component spans")
    C: PositiveInt = Field(description="parameter components (each has a matrix at every site)")
    rank: PositiveInt | None = Field(
        None, description="rank m of a component's matrix at a site (None: the site's full rank, min(d_in, d_out))"
    )
    topk: PositiveFloat = Field(description="k: batch top-k keeps the k·B largest attributions over the batch")
    faithfulness_coeff: NonNegativeFloat = Field(1.0, description="weight of ‖W − Σ_c P_c‖² (mean over entries)")
    minimality_coeff: NonNegativeFloat = Field(1.0, description="weight of D(f(x | active components), f(x))")
    activation_recon_coeff: NonNegativeFloat = Field(
        0.0, description="weight of each site's output reconstructed by the active components (mean over sites)"
    )
    simplicity_coeff: NonNegativeFloat = Field(1.0, description="weight of the Schatten-p proxy of active components")
    pnorm: PositiveFloat = Field(1.0, description="p of the Schatten-p simplicity proxy")
    unit_norm_inputs: bool = Field(
        False, description="renormalise each component's input directions (the columns of A) to 1 after every step"
    )
    output_loss: Literal["mse", "kl"] = Field("mse", description="divergence D between the output and the target's")
    init_std: PositiveFloat | None = Field(
        None,
        description="draw every entry of the components' factors from N(0, init_std²), so they start near zero as in "
        "the APD reference (≈ 0.01); None: SPD's start, each piece a unit direction scaled by its overlap with W",
    )
