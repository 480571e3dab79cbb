"""Where a run executes: the device named by `train.device` and the precision its matmuls run at.

`auto` picks CUDA when a card is visible, else the CPU; under torchrun each process takes the card of its local
rank (`LOCAL_RANK`), so `--nproc-per-node N` on an N-GPU machine uses every card once.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager

import torch
from torch import nn

from unmerge.errors import ConfigError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def local_rank() -> int:
    """This process's rank on its machine (torchrun's LOCAL_RANK; 0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(name: str) -> torch.device:
    """The torch device for a `train.device` setting, checked to exist here."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"train.device={name}, but torch sees no CUDA device here (torch {torch.__version__}, built for "
                f"CUDA {torch.version.cuda}); use train.device=cpu, or auto to take a GPU only where there is one"
            )
        index = int(name.partition(":")[2] or local_rank())
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"train.device={name} asks for CUDA device {index}, but there are {torch.cuda.device_count()}; "
                "use a lower index, or train.device=cuda to take the local rank's card"
            )
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device=mps, but the MPS backend is not available here; use train.device=cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast on `device` for `precision: bf16` (matmuls in bf16, reductions and weights in fp32); a no-op
    for fp32."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def device_of(model: nn.Module) -> torch.device:
    """Where a model's weights live (the CPU for a model without any)."""
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")
