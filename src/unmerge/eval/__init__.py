"""Evaluation with something spliced in: a dictionary's reconstruction (or an ablation) replaces a module's output
in a language model, and what the model's outputs lose is measured; top-activating examples for reports."""
