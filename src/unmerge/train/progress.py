"""Progress of long work: a live bar on a terminal or in a notebook; where stderr is a file (a run under nohup, a
batch job's log), one plain line a minute, so a run in the background shows how far it is and how long it has left
too."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import std
from tqdm.auto import tqdm

LOG_INTERVAL_S = 60.0  # seconds between two progress lines in a log file
LOG_LINE = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class _Lines:
    """tqdm's redraws (a carriage return, then the bar) written as one line each, for a file that cannot redraw."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.last_count = ""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        count = line.rpartition(" [")[0]  # description, percentage and count; then [times, rates, postfix]
        if line and count != self.last_count:  # closing redraws the last count once more
            self.stream.write(line + "\n")
            self.last_count = count

    def flush(self) -> None:
        self.stream.flush()


class _LogBar(std.tqdm):
    """tqdm without its monitor thread, whose forced redraw of a loop shows the count of the previous line (a
    tqdm over an iterable updates its count only when it prints itself)."""

    monitor_interval = 0


def _live() -> bool:
    """Whether progress can be redrawn: on a terminal, or in a Jupyter kernel (where tqdm.auto draws a widget)."""
    if sys.stderr.isatty():
        return True
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and "IPKernelApp" in shell.config


def progress_bar(iterable: Iterable | None = None, *, shown: bool = True, **options: Any) -> tqdm:
    """tqdm over `iterable` with `options` (desc, total, unit, …): live on a terminal or in a notebook, a line a
    minute on stderr elsewhere (a log file); nothing when not `shown` (ranks other than 0, a caller asked for
    quiet)."""
    if _live():
        return tqdm(iterable, disable=not shown, mininterval=0.5, dynamic_ncols=True, **options)
    return _LogBar(
        iterable,
        disable=not shown,
        file=_Lines(sys.stderr),
        mininterval=LOG_INTERVAL_S,
        miniters=1,  # look at the clock every iteration, so a loop that slows down still prints once a minute
        delay=LOG_INTERVAL_S,  # work that ends within a minute leaves no line
        bar_format=LOG_LINE,
        **options,
    )
