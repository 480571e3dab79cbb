"""A TransformerLens model: decompose its attention matrices per head-stacked matrix (W_Q, W_K, W_V, W_O of every
block; TransformerLens stores them with heads as a tensor dimension and uses them through einsum) and its MLP
weights, with the KL of its logits.

    .venv/bin/python examples/transformer_lens_model.py            # a tiny random 2-layer HookedTransformer
    .venv/bin/python examples/transformer_lens_model.py --steps 20 # seconds

With a pretrained model loaded your own way (HookedTransformer.from_pretrained needs the hub), pass it instead of
`tiny_hooked_transformer()`; site names are the parameters' (`blocks.0.attn.W_Q`, per head `blocks.0.attn.W_Q.3`).
"""

from __future__ import annotations

import argparse
import warnings

import torch
import transformer_lens

import unmerge


def tiny_hooked_transformer() -> transformer_lens.HookedTransformer:
    """A random 2-layer HookedTransformer (d_model 32, 4 heads, vocabulary 100)."""
    config = transformer_lens.HookedTransformerConfig(
        n_layers=2, d_model=32, n_ctx=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=100, act_fn="gelu",
        normalization_type="LN", seed=0,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TransformerLens 3 announces TransformerBridge
        return transformer_lens.HookedTransformer(config).eval()


def main(argv: list[str] | None = None) -> unmerge.Decomposition:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args(argv)
    model = tiny_hooked_transformer()
    tokens = torch.randint(model.cfg.d_vocab, (1024, 24), generator=torch.Generator().manual_seed(0))

    found = unmerge.decompose(
        model,
        tokens,  # token ids (sequences, positions); model(tokens) returns logits
        sites={"blocks.*.attn.W_[QKVO]": 32, "blocks.*.mlp.W_in": 32, "blocks.*.mlp.W_out": 32},
        output_loss="kl",
        steps=args.steps,
        batch_size=32,
        eval_batch_size=128,
        importance_minimality_coeff=1e-4,
        pnorm=2.0,
    )
    print(found)
    print({name: round(value, 4) for name, value in found.final_metrics.items() if "/" not in name})
    print("sites:", found.sites)
    return found


if __name__ == "__main__":
    main()
