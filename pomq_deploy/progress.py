"""Named phases of a long job, each shown while it runs and timed.

On a terminal a phase is one rich progress line (a bar where its steps are counted, the time spent); in a log
file, a line when it starts and one when it ends. Rich draws one live display at a time, so a job opens its
phases one after another, never inside each other, and code that runs inside a phase reports its steps
through the phase's ``step`` instead of drawing its own bar. The seconds of each phase are kept: a search
writes them into its report, so a user sees where the time went.
"""

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

T = TypeVar("T")
Step = Callable[..., None]  # step(advance=1, info=None): one more unit of the phase done, an optional note


class Phases:
    def __init__(self, console: Console | None, quiet: bool = False):
        """``quiet`` (or no console): time the phases without showing them (code that runs inside another job's
        phase)."""
        self.console, self.quiet = console, quiet or console is None
        self.seconds: dict[str, float] = {}  # phase -> seconds, summed over repeats, in the order first run

    @contextmanager
    def __call__(self, name: str, total: int | None = None, completed: int = 0) -> Iterator[Step]:
        """``with phases("design set", total=11) as step: ... step(info="last: ...")``; ``completed``: steps done
        before (a resumed search)."""
        live = not self.quiet and self.console.is_terminal
        if not live and not self.quiet:
            self.console.print(f"[dim]{name}{f' ({total} steps)' if total else ''} ...[/dim]", soft_wrap=True)
        counted = (BarColumn(), MofNCompleteColumn()) if total else ()  # a phase of no known length: its time alone
        columns = (SpinnerColumn(), TextColumn("{task.description}"), *counted, TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn())
        start = time.perf_counter()
        with Progress(*columns, console=self.console, transient=True, disable=not live) as progress:
            task = progress.add_task(name, total=total, completed=completed, info="")

            def step(advance: int = 1, info: str | None = None) -> None:
                progress.update(task, advance=advance, **({} if info is None else {"info": info}))

            yield step
        seconds = time.perf_counter() - start
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        if not self.quiet:
            self.console.print(f"[dim]{name}: {seconds:.1f} s[/dim]", soft_wrap=True)

    def note(self, text: str) -> None:
        """A line between phases (something the job did that the user should know of)."""
        if not self.quiet:
            self.console.print(text, soft_wrap=True)

    def track(self, items: Iterable[T], total: int | None, name: str) -> Iterator[T]:
        """``items`` yielded inside a phase of their own, one step each (the ``track`` argument of calibration
        and evaluation)."""
        with self(name, total) as step:
            for item in items:
                yield item
                step()

    def table(self) -> list[tuple[str, float]]:
        return [(name, round(seconds, 1)) for name, seconds in self.seconds.items()]
