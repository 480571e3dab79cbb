"""A sparse dictionary (a TopK SAE) on a model's residual stream: record the activations at a hook point of a
TransformerLens model on your token batches, train, then encode, score and export for SAELens.

    .venv/bin/python examples/dictionary_resid.py            # a tiny random 2-layer HookedTransformer
    .venv/bin/python examples/dictionary_resid.py --steps 20 # seconds

Any module name works as the hook (`model.named_modules()`): `blocks.1.hook_resid_post` here, `model.layers.3`
on a Hugging Face model. Each token position gives one activation row; batch_size counts rows.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings

import torch
import transformer_lens

import unmerge


def tiny_hooked_transformer() -> transformer_lens.HookedTransformer:
    """A random 2-layer HookedTransformer (d_model 32, vocabulary 100)."""
    config = transformer_lens.HookedTransformerConfig(
        n_layers=2, d_model=32, n_ctx=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=100, act_fn="gelu",
        normalization_type="LN", seed=0,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TransformerLens 3 announces TransformerBridge
        return transformer_lens.HookedTransformer(config).eval()


def main(argv: list[str] | None = None) -> unmerge.Dictionary:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args(argv)
    model = tiny_hooked_transformer()
    tokens = torch.randint(model.cfg.d_vocab, (2048, 24), generator=torch.Generator().manual_seed(0))
    batches = list(tokens.split(64))  # your DataLoader of token batches works the same

    sae = unmerge.train_dictionary(
        model,
        hook="blocks.1.hook_resid_post",
        data=batches,
        activation="topk",
        k=8,
        width=256,
        steps=args.steps,
        batch_size=1024,
        eval_batch_size=64,  # inputs recorded for the evaluation pool (each gives 24 rows)
        optim={"lr": 1e-3},
    )
    print(sae)
    print({name: round(value, 4) for name, value in sae.final_metrics.items() if "/" not in name})
    _, cache = model.run_with_cache(tokens[:4])
    activations = cache["blocks.1.hook_resid_post"]
    latents = sae.encode(activations)
    print("latents", tuple(latents.shape), "active per position", float((latents != 0).sum(-1).float().mean()))
    print("on other tokens:", sae.metrics(activations))
    with tempfile.TemporaryDirectory() as directory:
        print("SAELens files:", sorted(path.name for path in sae.to_saelens(directory).iterdir()))
    return sae


if __name__ == "__main__":
    main()
