"""`unmerge` command line: a thin shell over `unmerge.api` (handlers in `commands`, arguments in `parser`). User
errors print one message, no traceback."""

from __future__ import annotations

import errno
import sys

from unmerge.cli.parser import build_parser
from unmerge.errors import UnmergeError
from unmerge.train import distributed

__all__ = ["build_parser", "main"]

OUT_OF_MEMORY = ("can't allocate memory", "out of memory", "Tried to allocate")  # torch's allocators
MEMORY_ADVICE = (
    "lower train.batch_size, train.eval_batch_size or the sites' C (`--dry-run` itemises the memory a step "
    "needs), then rerun the same command to resume"
)


def file_system_problem(error: OSError) -> str:
    """What an OSError means for the user, and what to do."""
    where = error.filename or "a file"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"no space left for {where}: free some space or choose another --out, then rerun the same command "
            "(the run resumes from its last complete checkpoint)"
        )
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {where} ({error.strerror}); choose a path you can write to"
    if error.errno in (errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
        return f"{where}: {error.strerror}; --out must be a directory path (not a file, nor under one)"
    return f"{where}: {error.strerror or error}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides may follow options (`--out DIR key=value`), which argparse leaves over
        if not hasattr(args, "overrides") or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        args.handler(args)
        distributed.stop()
    except UnmergeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the file system said no: a full disk, a permission, a file where a folder goes
        print(f"error: {file_system_problem(error)}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        if not any(sign in str(error) for sign in OUT_OF_MEMORY):
            raise
        print(f"error: out of memory ({str(error).splitlines()[0][:200]}); {MEMORY_ADVICE}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the newest checkpoint", file=sys.stderr)
        return 130
    return 0
