"""Any model and data a user holds in Python, as a target: `own_target(model, data)` wraps an `nn.Module` and a
tensor, a mapping of tensors, or an iterable (a list, a `DataLoader`) of batches, so SPD and dictionaries run on
them as on every configured target.

Inputs are rows: the first axis of a tensor, of each tensor of a mapping (a Hugging Face batch: `input_ids`,
`attention_mask`), or of each batch an iterable yields (a tuple or list item gives its first element, as a
`DataLoader` over `(inputs, labels)` pairs yields; labels are not needed). A mapping's tensors must share one shape
and dtype: they travel through the training loop stacked along a new last axis (`pack`) and are passed to the
model as keyword arguments again.

A tensor or mapping is sampled by rows with the step's generator, so a resumed run draws the same batches. An
iterable is read in order, re-cut to the loop's batch size and restarted at its end (a new epoch); a resumed run
restarts it and skips the rows already used, which gives the same batches when it yields the same rows each time
(a list, a `DataLoader` with a seeded sampler). Evaluation, grouping and ablations draw rows from a pool of the
first rows it yields. A one-shot iterator is refused: every run reads its data more than once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from unmerge.errors import UnmergeError
from unmerge.targets.base import Divergence, Target
from unmerge.train.devices import device_of

Batch = Tensor | Mapping[str, Tensor]
Forward = Callable[[nn.Module, Batch], Any]  # how to run the model on one batch; returns what the model returns
Data = Tensor | Mapping[str, Tensor] | Iterable[Any]


def batch_of(item: Any) -> Batch:
    """The inputs in one item of the data: a tensor, a mapping of tensors, or a tuple/list's first element."""
    if isinstance(item, (tuple, list)) and item:
        item = item[0]
    if isinstance(item, Tensor):
        return item
    if isinstance(item, Mapping) and item and all(isinstance(value, Tensor) for value in item.values()):
        return dict(item)
    raise UnmergeError(
        f"the data holds a {type(item).__name__}, not model inputs: give a tensor, a dict of tensors (e.g. "
        "input_ids, attention_mask) or an iterable (a list, a DataLoader) of them, batches along the first axis"
    )


def keys_of(batch: Batch) -> tuple[str, ...] | None:
    """A mapping's keys, in order (None for a tensor)."""
    return tuple(batch) if isinstance(batch, Mapping) else None


def pack(batch: Batch) -> Tensor:
    """One tensor for a batch: a tensor as it is, a mapping's tensors stacked along a new last axis."""
    if isinstance(batch, Tensor):
        return batch
    shapes = {(tuple(value.shape), value.dtype) for value in batch.values()}
    if len(shapes) > 1:
        found = ", ".join(f"{key}: {tuple(value.shape)} {value.dtype}" for key, value in batch.items())
        raise UnmergeError(
            f"the inputs' tensors differ in shape or dtype ({found}); unmerge takes dict inputs whose tensors share "
            "one shape and dtype (input_ids, attention_mask, ...): pass forward=... to build the rest from them"
        )
    return torch.stack(list(batch.values()), dim=-1)


def unpack(x: Tensor, keys: tuple[str, ...] | None) -> Batch:
    """`pack` undone: the mapping of `keys` (a tensor as it is when there are none)."""
    return x if keys is None else {key: x[..., i] for i, key in enumerate(keys)}


def output_tensor(output: Any) -> Tensor:
    """The tensor a model's output stands for: itself, a Hugging Face output's `logits`, or a tuple's first."""
    if isinstance(output, Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise UnmergeError(
        f"the model returned a {type(output).__name__}, not a tensor, logits or a tuple starting with a tensor; "
        "pass forward=lambda model, x: ... returning the output to compare"
    )


class OwnModel(nn.Module):
    """A user's model behind one interface: `forward(x)` unpacks a packed batch, runs the model (or the given
    `forward`) and returns its output tensor; `named_modules` are the model's own, unprefixed, so site patterns
    and hooks are written as the model names them."""

    def __init__(self, model: nn.Module, keys: tuple[str, ...] | None, forward: Forward | None = None) -> None:
        super().__init__()
        self.wrapped = model
        self.keys = keys
        self._forward = forward

    def forward(self, x: Tensor) -> Tensor:
        batch = unpack(x, self.keys)
        if self._forward is not None:
            return output_tensor(self._forward(self.wrapped, batch))
        return output_tensor(self.wrapped(**batch) if isinstance(batch, dict) else self.wrapped(batch))

    def named_modules(
        self, memo: set[nn.Module] | None = None, prefix: str = "", remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Module]]:
        return self.wrapped.named_modules(memo, prefix, remove_duplicate)


def _sample_rows(rows: Tensor, size: int, generator: torch.Generator) -> Tensor:
    index = torch.randint(len(rows), (size,), generator=generator, device=generator.device)
    return rows[index.to(rows.device)].to(generator.device)


class RowSampler:
    """Rows of a packed tensor, drawn uniformly with the step's generator."""

    def __init__(self, rows: Tensor) -> None:
        self.rows = rows

    def __call__(self, size: int, generator: torch.Generator) -> Tensor:
        return _sample_rows(self.rows, size, generator)


class StreamSampler:
    """Rows of an iterable of batches, read in order (module docstring). The training loop reads step `s`'s batch
    with `part` (rows `s · size` on, counted across epochs); a plain call draws rows from the pool of the first
    `pool_rows` rows, for evaluation and analysis."""

    def __init__(self, data: Iterable[Any], pool_rows: int, convert: Callable[[Any], Tensor]) -> None:
        self.data = data
        self.convert = convert
        self._iterator: Iterator[Any] | None = None
        self._position = 0  # rows read since the first epoch's start
        self._pending: Tensor | None = None  # the current batch's rows not read yet
        self.pool = torch.cat(self._read(0, pool_rows))

    def _restart(self) -> None:
        self._iterator, self._position, self._pending = iter(self.data), 0, None

    def _next_batch(self) -> Tensor:
        assert self._iterator is not None
        for _ in range(2):  # the iterable's end starts a new epoch
            try:
                return self.convert(next(self._iterator))
            except StopIteration:
                self._iterator = iter(self.data)
        raise UnmergeError("the data yields no batches; give at least one batch of inputs")

    def _read(self, start: int, count: int) -> list[Tensor]:
        """Rows `start` … `start + count` of the stream, restarting it when they lie behind what was read."""
        if self._iterator is None or start < self._position:
            self._restart()
        chunks: list[Tensor] = []
        while count:
            if self._pending is None or not len(self._pending):
                self._pending = self._next_batch()
            skip = min(start - self._position, len(self._pending))
            taken = self._pending[skip : skip + count]
            if len(taken):
                chunks.append(taken)
            used = skip + len(taken)
            self._pending, self._position = self._pending[used:], self._position + used
            start, count = start + len(taken), count - len(taken)
        return chunks

    def part(self, step: int, global_size: int, rank: int, world: int) -> Tensor:
        size = global_size // world
        return torch.cat(self._read(step * global_size + rank * size, size))

    def __call__(self, size: int, generator: torch.Generator) -> Tensor:
        return _sample_rows(self.pool, size, generator)


def _reiterable(data: Any) -> Iterable[Any]:
    """`data` if it can be read more than once; an error naming the fix otherwise."""
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes)):
        raise UnmergeError(
            f"data must be a tensor, a dict of tensors or an iterable (a list, a DataLoader) of batches, "
            f"not a {type(data).__name__}"
        )
    if iter(data) is data:
        raise UnmergeError(
            "the data is an iterator, which can be read only once; a run reads its data again (evaluation, a "
            "new epoch, a resumed run): pass a list, a DataLoader or a tensor instead (e.g. list(iterator))"
        )
    return data


def sampler(data: Data, pool_rows: int, convert: Callable[[Any], Tensor] | None = None) -> RowSampler | StreamSampler:
    """The sampler for `data` (module docstring): rows of a tensor or mapping, or an iterable's batches in order,
    each made one packed tensor by `convert` (default: `pack(batch_of(item))`)."""
    convert = convert or (lambda item: pack(batch_of(item)))
    if isinstance(data, (Tensor, Mapping)):
        rows = convert(data)
        if not len(rows):
            raise UnmergeError("the data has no rows; give at least one input")
        return RowSampler(rows)
    return StreamSampler(_reiterable(data), pool_rows, convert)


def digest(tensors: Iterable[tuple[str, Tensor]]) -> str:
    """sha256 over named tensors' names, shapes, dtypes and bytes: what identifies a model's weights or data."""
    hasher = hashlib.sha256()
    for name, tensor in tensors:
        flat = tensor.detach().cpu().contiguous()
        hasher.update(f"{name}:{tuple(flat.shape)}:{flat.dtype};".encode())
        hasher.update(flat.reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def describe_model(model: nn.Module) -> tuple[str, str]:
    """(class and parameter count, sha256 of the state dict) of a model."""
    count = sum(parameter.numel() for parameter in model.parameters())
    return f"{type(model).__name__} ({count:,} parameters)", digest(model.state_dict().items())


def describe_data(data: Data, keys: tuple[str, ...] | None) -> str:
    """A tensor's or mapping's shape, dtype and sha256; an iterable's type (its contents are not hashed)."""
    if isinstance(data, (Tensor, Mapping)):
        rows = pack(batch_of(data))
        names = f" (keys {', '.join(keys)})" if keys else ""
        return f"tensor {tuple(rows.shape)} {rows.dtype}{names}, sha256 {digest([('data', rows)])}"
    return f"an iterable of batches ({type(data).__name__})"


def first_batch(data: Data) -> Batch:
    """The first batch of `data`, unpacked (a tensor's or mapping's rows are one batch)."""
    if isinstance(data, (Tensor, Mapping)):
        return batch_of(data)
    for item in _reiterable(data):
        return batch_of(item)
    raise UnmergeError("the data yields no batches; give at least one batch of inputs")


def own_target(
    model: nn.Module,
    data: Data,
    forward: Forward | None = None,
    divergence: Divergence | None = None,
    pool_rows: int = 4096,
) -> Target:
    """`model` and `data` as a target (module docstring), after running the model once on two rows of the data
    so a mismatch is named before anything trains. The model is frozen (eval mode, no gradients)."""
    if not isinstance(model, nn.Module):
        raise UnmergeError(f"model must be a torch.nn.Module, not a {type(model).__name__}")
    keys = keys_of(first_batch(data))
    wrapped = OwnModel(model, keys, forward)
    target = Target(type(model).__name__, wrapped, sampler(data, pool_rows), divergence=divergence)
    check_runs(wrapped, target.sample_inputs(2, torch.Generator().manual_seed(0)), keys)
    return target


def check_runs(model: OwnModel, x: Tensor, keys: tuple[str, ...] | None) -> None:
    """Run the model on a packed batch once; a failure is an error naming the rows' shape and the fix."""
    try:
        with torch.no_grad():
            model(x.to(device_of(model)))
    except (RuntimeError, TypeError, ValueError, IndexError) as error:
        shape = ", ".join(f"{key} {tuple(value.shape)}" for key, value in unpack(x, keys).items()) if keys else ""
        rows = shape or f"{tuple(x.shape)} {x.dtype}"
        reason = " ".join(str(error).split())
        raise UnmergeError(
            f"running the model on two rows of the data ({rows}) failed: {reason}. The data must hold the "
            "model's inputs with examples along the first axis (pass forward=... if the model is called "
            "differently)"
        ) from None
