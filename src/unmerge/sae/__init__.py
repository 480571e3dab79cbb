"""Sparse dictionaries (SAEs) on activations: activation functions, penalties, the dictionary and its method."""
