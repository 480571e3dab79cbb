"""The notebook-first Python API: decompose any model on any data, or train a dictionary on its activations, and
explore what comes back (`Decomposition`, `Dictionary`), with or without a run directory."""
