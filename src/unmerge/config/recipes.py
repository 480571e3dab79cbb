"""Presets computed from a shape instead of written out: `tms` decomposes a toy model of superposition of any shape
(`unmerge decompose tms --n-features F --n-hidden H`), its C and coefficients set from the shape by
`tms_recipe`'s rule."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from unmerge.config.base import Override
from unmerge.errors import ConfigError

SUBCOMPONENTS_PER_FEATURE = 5
MIN_SUBCOMPONENTS = 40
IMPORTANCE_PER_WEIGHT_ENTRY = 0.015
FREQUENCY_SHARE = 10


def tms_recipe(preset: dict[str, Any], n_features: int, n_hidden: int, identity: bool = False) -> dict[str, Any]:
    """SPD on TMS `n_features`-`n_hidden` (+ID): the TMS preset `preset` (the 5-2 preset's data: p = 1, CI MLPs of
    width 16, 5,000 steps of batch 4,096 at lr 1e-2 after a 200-step faithfulness warm-up, cosine down to a floor
    of a tenth of it) with the shape, the sites, C and the importance coefficients set from the shape.

    * C = max(5 · n_features, 40) at every site: room for one subcomponent per feature and spares to split off.
      A small model has few spares at 5 per feature, and a feature that finds none of its own early is built from
      its neighbours' (TMS 5-2 at C = 25: 48 of 50 seeds pass; at 40: all 50).
    * importance_minimality_coeff = 0.015 / (n_features · n_hidden). Measured (BENCHMARKS.md "TMS of any shape"):
      where it is too high, subcomponents of neighbouring features merge (TMS 40-10 at 3.75e-4: 28–34 live for 40
      features), and live subcomponents hold more than their feature, by a margin that grows with the
      coefficient, while their causal importance stays below 1 (TMS 10-5 at 1.5e-3: 1.09 × each feature, CI 0.91
      on its one-hot input; at 3e-4: ML2R 1.001–1.003, and 1.017–1.032 with the frequency term below);
      the 5-2 preset is this rule at its shape, and 40-10's hand-tuned 1e-4 lies within a factor 3 of it.
    * importance_frequency_coeff = importance_minimality_coeff / 10: subcomponents that each serve several
      features (a cluster of features sharing a basis of a few subcomponents, the failure left at the coefficient
      above: TMS 24-6 seed 2, 6 features on 4 subcomponents) cost more than one per feature, so they split (the
      frequency term at 1/3 of it kills subcomponents that features still need).
    * The learning rate ends at a tenth of its peak, not at 0 (`train.optim.final_lr_fraction`, from the preset): a
      spare whose output factor has died can keep an input factor that reads a few features, and its causal
      importance then fires on the rare input where they are all active; the importance penalty meets that input
      once in thousands of steps, and under a schedule decaying to 0 its late meetings move nothing, so the spare
      stays counted as live (TMS 40-10+ID seed 3: 9 / 10 seeds without the floor, 10 / 10 with it)."""
    sites = ["linear1", "hidden", "linear2"] if identity else ["linear1", "linear2"]
    importance = IMPORTANCE_PER_WEIGHT_ENTRY / (n_features * n_hidden)
    shape = {"n_features": n_features, "n_hidden": n_hidden, "identity": identity}
    method = {
        "sites": [
            {"pattern": site, "C": max(SUBCOMPONENTS_PER_FEATURE * n_features, MIN_SUBCOMPONENTS)} for site in sites
        ],
        "importance_minimality_coeff": importance,
        "importance_frequency_coeff": importance / FREQUENCY_SHARE,
    }
    return {
        **preset,
        "name": f"tms-{n_features}-{n_hidden}" + ("-id" if identity else ""),
        "target": {**preset["target"], **shape},
        "method": {**preset["method"], **method},
    }


TMS_PRESET = "tms-5-2"


def _tms_from_overrides(preset: dict[str, Any], overrides: list[Override]) -> dict[str, Any]:
    shape = {item.key: item.value for item in overrides if item.key.startswith("target.")}
    if "target.n_features" not in shape or "target.n_hidden" not in shape:
        raise ConfigError(
            "the tms recipe needs the model's shape: --n-features F --n-hidden H on the command line "
            "(or the overrides target.n_features=F target.n_hidden=H)"
        )
    n_features, n_hidden = shape["target.n_features"], shape["target.n_hidden"]
    for key, value in (("n_features", n_features), ("n_hidden", n_hidden)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"target.{key} must be a positive whole number for the tms recipe, not {value!r}")
    identity = shape.get("target.identity", False)
    if not isinstance(identity, bool):
        raise ConfigError(f"target.identity must be true or false, not {identity!r}")
    return tms_recipe(preset, n_features, n_hidden, identity)


RECIPES: dict[str, tuple[str, Callable[[dict[str, Any], list[Override]], dict[str, Any]]]] = {
    "tms": (TMS_PRESET, _tms_from_overrides)
}
"""Recipe name → (the preset it starts from, the function that sets it from the overrides)."""
