"""Phases: shown while they run (a bar on a terminal, a start and an end line in a log) and timed."""

import io

from rich.console import Console

from pomq_deploy.progress import Phases


def _console(terminal: bool) -> Console:
    return Console(file=io.StringIO(), force_terminal=terminal, width=120, highlight=False, color_system=None)


def test_a_log_gets_a_start_and_an_end_line_per_phase_and_the_seconds_are_kept():
    console = _console(terminal=False)
    phases = Phases(console)
    with phases("design set", total=3) as step:
        for _ in range(3):
            step(info="last: top-1 0.9")
    assert list(phases.track(["a", "b"], 2, "two items")) == ["a", "b"]
    with phases("design set", total=1):  # the same phase again: its seconds add up
        pass
    lines = console.file.getvalue().splitlines()
    assert lines[0] == "design set (3 steps) ..." and lines[1].startswith("design set: ") and lines[1].endswith(" s")
    assert lines[2] == "two items (2 steps) ..." and len(lines) == 6
    assert [name for name, _ in phases.table()] == ["design set", "two items"]
    assert all(seconds >= 0 for _, seconds in phases.table())


def test_a_terminal_gets_the_bar_then_one_line_and_quiet_phases_only_time():
    console = _console(terminal=True)
    phases = Phases(console)
    with phases("timing", total=2) as step:
        step()
        step()
    out = console.file.getvalue()
    assert "timing (2 steps) ..." not in out and "timing: " in out  # the transient bar replaced by the closing line
    silent = Phases(None)
    with silent("inside a search's own phase"):
        pass
    assert [name for name, _ in silent.table()] == ["inside a search's own phase"]
