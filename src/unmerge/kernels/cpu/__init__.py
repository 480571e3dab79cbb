"""Hand-written CPU kernels: C source shipped as package data (`*.c` here), compiled on first use and cached
(`build`); their Python bindings and torch reference paths (`ci`: SPD's causal importances)."""
