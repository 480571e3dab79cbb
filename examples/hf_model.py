"""A Hugging Face causal LM by path: decompose the MLP weights of its first layers with the KL of its logits, on
batches from your own DataLoader of token ids.

    .venv/bin/python examples/hf_model.py --model path/to/model   # a directory from save_pretrained
    .venv/bin/python examples/hf_model.py --steps 20             # no path: a tiny random Llama written to a
                                                                 # temporary directory first (offline)

Nothing is downloaded: the model loads from the directory (HF_HUB_OFFLINE=1 is fine). Batches are dicts of
`input_ids` and `attention_mask`, passed to the model as keyword arguments.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import transformers
from torch.utils.data import DataLoader

import unmerge


def tiny_llama(directory: str) -> str:
    """Write a small random Llama (2 layers, width 32) to `directory`, as save_pretrained does."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def token_batches(vocab_size: int, sequences: int, length: int, batch_size: int) -> DataLoader:
    """Your data: here random token ids; any DataLoader of dicts of model inputs works the same."""
    ids = torch.randint(vocab_size, (sequences, length), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]
    return DataLoader(rows, batch_size=batch_size, shuffle=False)


def main(argv: list[str] | None = None) -> unmerge.Decomposition:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a directory written by save_pretrained (default: a tiny random Llama)")
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        path = args.model or tiny_llama(scratch)
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
    data = token_batches(model.config.vocab_size, sequences=512, length=32, batch_size=16)

    found = unmerge.decompose(
        model,
        data,
        sites={"model.layers.*.mlp.*_proj": 64},  # gate, up and down projections of every layer
        output_loss="kl",
        steps=args.steps,
        batch_size=16,
        eval_batch_size=64,
        importance_minimality_coeff=1e-4,
        pnorm=2.0,
    )
    print(found)
    print({name: round(value, 4) for name, value in found.final_metrics.items() if "/" not in name})
    importance = found.causal_importance(next(iter(data)))
    print({site: round(float((g > 0.1).float().sum(-1).mean()), 1) for site, g in importance.items()})
    return found


if __name__ == "__main__":
    main()
