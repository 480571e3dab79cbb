"""Metrics: pure functions, one definition each, used by training, evaluation and reports.

Keys written to a run's `metrics.json` (flat; `/` separates a metric from its site or group):

* `mmcs`, `ml2r`, `matrix_cosine` — feature-direction recovery (see `recovery.feature_recovery`), mean over sites
  with known feature directions; per site as `mmcs/<site>` etc.
* `ci_l0/<site>/<threshold>` — mean subcomponents per input with CI above 0.01, 0.1, 0.5 (data distribution).
* `alive/<site>` — subcomponents with CI > 0.1 on some evaluation input.
* `ci_pattern_errors/<group>` — one-hot CI pattern errors (identity pattern for per-feature groups, dense
  pattern for dense groups); `ci_pattern_errors` — their sum.
* `faithfulness`, `stochastic_recon`, `layerwise_recon`, `ci_masked_recon`, `unmasked_recon` — SPD losses on an
  evaluation batch; `faithfulness_relative` = faithfulness ÷ the mean squared target weight; with the MSE
  output loss also `output_mean_square` (the MSE of predicting 0, for scale); on a
  whole language model `ce_original` and `ce_ci_masked` (next-token CE with masks = CI); with
  `method.adversarial_steps` > 0 also `adversarial_recon` (all sites at the worst masks in [g, 1] the ascent finds).

Dictionary runs (see `metrics.dictionary`): `recall_mmcs`, `precision_mmcs`, `mcc`, `matched/<cosine>`, `fvu`,
`reconstruction_cosine`, `norm_ratio`, `l0`, `dead_fraction`, `dead_latents`, `duplicate_latents`, `shrinkage`. On a
language model (see `metrics.language` and `unmerge.eval.language`), on held-out text: `heldout/fvu`, `heldout/l0`,
`heldout/tokens`, `ce_original`, `ce_spliced`, `ce_zero_ablation`, `ce_mean_ablation` (nats per counted prediction),
`kl_spliced`, `ce_recovered_zero`, `ce_recovered_mean`; on a sentence encoder instead of the CE and KL keys:
`cosine_distance_spliced`, `cosine_distance_zero_ablation`, `cosine_distance_mean_ablation` (mean 1 − cos of the
window's embedding to the original's), `embedding_recovered_zero`, `embedding_recovered_mean`.
"""

from unmerge.metrics.importance import (
    L0_THRESHOLDS,
    alive_count,
    ci_l0,
    dense_pattern_errors,
    identity_pattern_errors,
    identity_permutation,
)
from unmerge.metrics.recovery import Recovery, feature_recovery

__all__ = [
    "L0_THRESHOLDS",
    "Recovery",
    "alive_count",
    "ci_l0",
    "dense_pattern_errors",
    "feature_recovery",
    "identity_pattern_errors",
    "identity_permutation",
]
