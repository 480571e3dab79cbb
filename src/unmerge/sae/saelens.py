"""Dictionaries in SAELens's on-disk format (SAELens ≥ 6): a directory with `cfg.json` and `sae_weights.safetensors`
holding `W_enc` (d_in × d_sae), `b_enc`, `W_dec` (d_sae × d_in), `b_dec` and, by architecture, `threshold`
(jumprelu; a BatchTopK dictionary is written as jumprelu with its inference threshold, as SAELens itself saves
one), `b_gate`, `r_mag`, `b_mag` (gated, which has no `b_enc`) or `W_skip` (d_out × d_in, skip transcoders).

Written files load with `sae_lens.SAE.load_from_disk(path)` and give the same encodings and reconstructions; read
files become an unmerge `Dictionary`. Neither direction imports SAELens. Activation normalisation must be folded
into the weights first (`Dictionary.fold_input_scale`, as `unmerge train-dictionary` does before saving), since
SAELens keeps no scale beside the weights either.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from unmerge.config import dictionary_config as dictionary_config_of
from unmerge.errors import UnmergeError
from unmerge.io import save_tensors_atomic, write_json_atomic
from unmerge.sae.arch import ARCHITECTURES
from unmerge.sae.dictionary import Dictionary

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
FORMAT_VERSION = "6.0.0"  # written as metadata.sae_lens_version: the layout is SAELens 6's
IDENTITY_NORMALISATIONS = ("none", "expected_average_only_in", "covariance_whitening")  # no-ops once loaded


def save_saelens(
    module: Dictionary, directory: Path, hook_name: str | None = None, model_name: str | None = None
) -> Path:
    """Write `module` to `directory` in SAELens's format (atomically, file by file); returns the directory."""
    if float(module.input_scale) != 1.0 or float(module.target_scale()) != 1.0:
        raise UnmergeError(
            "the dictionary still has an activation normalisation scale; call fold_input_scale() "
            "first so that the weights alone give its reconstructions"
        )
    architecture = module.saelens_architecture()
    dim = module.W_e.shape[0]
    config: dict[str, Any] = {
        "architecture": architecture,
        "d_in": dim,
        "d_sae": module.config.width,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": not module.transcoder,
        "normalize_activations": "none",
        "metadata": {
            "sae_lens_version": FORMAT_VERSION,
            "exported_by": "unmerge",
            **({"hook_name": hook_name} if hook_name else {}),
            **({"model_name": model_name} if model_name else {}),
        },
    }
    config |= module.saelens_settings()
    if module.transcoder:
        config["d_out"] = module.W_d.shape[1]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: value.detach().float() for name, value in module.saelens_tensors().items()}
    save_tensors_atomic(directory / WEIGHTS_FILE, tensors)
    write_json_atomic(directory / CONFIG_FILE, config)
    return directory


def _read(directory: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise UnmergeError(f"{directory} is not a SAELens dictionary: {path.name} is missing")
    try:
        config = json.loads(config_path.read_text())
        tensors = load_file(str(weights_path))
    except (ValueError, OSError, SafetensorError) as error:
        raise UnmergeError(
            f"{directory} holds a SAELens dictionary that cannot be read ({error}); re-export it"
        ) from None
    missing = [key for key in ("d_in", "d_sae") if key not in config]
    if missing:
        raise UnmergeError(f"{config_path} lacks {', '.join(missing)}")
    normalisation = config.get("normalize_activations", "none")
    if normalisation not in IDENTITY_NORMALISATIONS:
        raise UnmergeError(
            f"{config_path}: normalize_activations={normalisation!r} rescales every input at run time, "
            "which an unmerge Dictionary does not do; only 'none' can be imported"
        )
    return config, {name: value.float() for name, value in tensors.items()}


def load_saelens(directory: Path) -> Dictionary:
    """A SAELens-format dictionary as an unmerge `Dictionary` with the same encodings and reconstructions (up to
    float rounding where the format needs converting: an autoencoder that does not subtract `b_dec` from its
    input gets `b_enc + b_dec W_enc` instead; TopK's decoder-norm rescaling is folded into the weights)."""
    directory = Path(directory)
    config, tensors = _read(directory)
    architecture = config.get("architecture", "standard")
    cls = ARCHITECTURES.for_saelens(architecture)
    transcoder = architecture in cls.saelens_transcoders.values()
    dictionary_config = dictionary_config_of(
        width=config["d_sae"],
        activation=cls.activation,
        skip=transcoder and architecture == cls.saelens_transcoders.get(True),
        penalty={"name": "none"},
        **cls.saelens_config_fields(config),
    )
    module = cls(
        config["d_in"], dictionary_config, torch.Generator().manual_seed(0), config.get("d_out") if transcoder else None
    )
    W_enc, W_dec, b_dec = tensors["W_enc"], tensors["W_dec"], tensors["b_dec"]
    b_enc = tensors[cls.saelens_encoder_bias]
    if not transcoder and not config.get("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ W_enc
    if config.get("rescale_acts_by_decoder_norm", False):
        norms = W_dec.norm(dim=1)
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    expected = (module.W_e.shape, module.W_d.shape)
    if (W_enc.shape, W_dec.shape) != expected:
        raise UnmergeError(
            f"{directory}: W_enc {tuple(W_enc.shape)} / W_dec {tuple(W_dec.shape)} do not match "
            f"d_in, d_sae{', d_out' if transcoder else ''} in {CONFIG_FILE} ({expected})"
        )
    with torch.no_grad():
        for parameter, value in ((module.W_e, W_enc), (module.b_e, b_enc), (module.W_d, W_dec), (module.b_d, b_dec)):
            parameter.copy_(value)
        module.load_saelens_extras(tensors)
        if dictionary_config.skip:
            module.W_skip.copy_(tensors["W_skip"].T)
    return module.eval()
