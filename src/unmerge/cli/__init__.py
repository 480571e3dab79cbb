"""`unmerge` command line: a thin shell over `unmerge.api` (handlers in `commands`, arguments in `parser`). User
errors print one message, no traceback."""

from __future__ import annotations

import sys

from unmerge.cli.parser import build_parser
from unmerge.errors import UnmergeError
from unmerge.train import distributed

__all__ = ["build_parser", "main"]


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
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the newest checkpoint", file=sys.stderr)
        return 130
    return 0
