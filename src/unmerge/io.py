"""Files, one definition each: atomic writes (a reader sees the old file or the new one, never half), checksums,
the cache root every cached artefact lives under (trained targets, models, corpora, activations, kernels), and the
lock under which one process builds a cache entry while others that need it wait."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from safetensors.torch import save_file
from torch import Tensor

from unmerge.errors import warn

CACHE_ENV = "UNMERGE_CACHE_DIR"
PARTIAL_MARK = ".partial-"  # in the name of a file being written atomically (left behind only by a killed process)


def cache_root() -> Path:
    """`$UNMERGE_CACHE_DIR`, else `~/.cache/unmerge`."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "unmerge"))


@contextmanager
def cache_lock(entry: Path) -> Iterator[None]:
    """Held while a process checks for the cache entry `entry` and builds it if absent: a second process that needs
    the same entry waits (saying so), then finds it built, instead of building it alongside and colliding. The lock
    is the file `<entry>.lock` beside it; the operating system releases it if its holder dies."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(entry.with_name(f"{entry.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        warn(f"another process is building {entry}; waiting for it to finish")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def sha256_file(path: Path) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _process_umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Call `write(tmp_path)`, fsync, and rename onto `path`; readers see the old or the new file, never half.
    The file gets the permissions an ordinary new file would (the umask applied), not mkstemp's private 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{PARTIAL_MARK}")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_process_umask())
        write(Path(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: Path, data: Any, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent))


def save_tensors_atomic(path: Path, tensors: dict[str, Tensor]) -> None:
    """A safetensors file of contiguous CPU copies-or-views of `tensors`, written atomically."""
    contiguous = {name: value.detach().cpu().contiguous() for name, value in tensors.items()}
    write_atomic(path, lambda tmp: save_file(contiguous, str(tmp)))
