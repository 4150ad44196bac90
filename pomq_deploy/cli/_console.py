"""Terminal output shared by the subcommands: results on stdout, progress and logs on stderr."""

import json
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")

stdout = Console(highlight=False, soft_wrap=True)  # results: one line each, never wrapped
if not stdout.is_terminal:
    stdout.width = max(stdout.width, 160)  # tables piped to a file or a log keep node names on one line
stderr = Console(stderr=True, highlight=False)


def progress_iter(items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
    """Yield ``items`` while drawing a progress bar on stderr (only when stderr is a terminal)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=stderr, transient=True, disable=not stderr.is_terminal) as progress:
        yield from progress.track(items, total=total, description=description)


def emit(as_json: bool, result: dict, text: str) -> None:
    """A command's result: one JSON object (--json, nothing else on stdout) or one human line."""
    if as_json:
        print(json.dumps(result))
    else:
        stdout.print(text)
