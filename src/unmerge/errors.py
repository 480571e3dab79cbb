"""Errors a user can act on. The CLI prints their message (no traceback) and exits with status 2. Warnings: a
line on stderr, for what a run did on the user's behalf (took over a stale lock, skipped a corrupt checkpoint)."""

import sys


def warn(message: str) -> None:
    """Tell the user, on stderr, something done on their behalf that they should know about."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


class UnmergeError(Exception):
    """A problem with the user's input or files, with a message that says what is wrong and how to fix it. Every
    error unmerge raises on purpose is one (configs, sites, data, checkpoints, run directories).

    Example:
        >>> try:
        ...     unmerge.decompose(model, data, sites={"nope.*": 10})
        ... except unmerge.UnmergeError as error:
        ...     print(error)   # site pattern 'nope.*' matches no module of the target; decomposable modules are: ...
    """


class ConfigError(UnmergeError):
    """A config is malformed, has unknown keys, or values out of range."""


class SiteError(UnmergeError):
    """A site pattern matched no module, or matched a module that cannot be decomposed."""


class CheckpointError(UnmergeError):
    """A checkpoint or run directory is missing, corrupt, or belongs to a different config."""


class NonFiniteLossError(UnmergeError):
    """Training produced NaN or infinity; the last good checkpoint is left untouched."""
