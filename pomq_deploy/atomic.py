"""Outputs: each under the folder it was meant for, written whole or not at all (into a temporary name beside
the target, then renamed over it)."""

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from .errors import PomqError


def inside(folder: Path, *names: str) -> Path:
    """``folder / names...``, refused in one line unless it resolves (``..``, symbolic links followed) to a path
    under ``folder``'s own resolution. Names are checked where they are read (``_schema.Name``); this holds for
    every name, wherever it came from, at the join that makes it an output."""
    folder = Path(folder)
    path = folder.joinpath(*names)
    if not path.resolve().is_relative_to(folder.resolve()) or path.resolve() == folder.resolve():
        raise PomqError(f"{path}: resolves to {path.resolve()}, not under {folder}; refusing to write there")
    return path


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` and rename ``tmp`` to ``path``; on failure remove ``tmp`` and keep ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_dead_processes_folders(parent: Path, prefix: str, suffix: str = "") -> list[Path]:
    """Remove the folders ``<prefix><pid>-<random><suffix>`` in ``parent`` whose process no longer runs (work or
    staging folders of a process killed with SIGKILL, which no ``except`` or ``finally`` saw); return them. A
    running process's folder stays."""
    pattern = re.compile(rf"{re.escape(prefix)}(\d+)-[^./]+{re.escape(suffix)}")
    gone = [p for p in sorted(Path(parent).iterdir()) if p.is_dir() and (m := pattern.fullmatch(p.name)) and not _running(int(m[1]))]
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
    return gone


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_text(path: Path, text: str) -> None:
    replace_atomically(path, lambda tmp: tmp.write_text(text))


NOTES_MARKER = "<!-- hand-written notes below: kept when the table above is regenerated -->"


def write_generated(path: Path, generated: str) -> None:
    """Write a generated document (the tools' tables) over ``path``, keeping what follows ``NOTES_MARKER`` there:
    notes and earlier machines' tables written by hand survive a regeneration."""
    path = Path(path)
    old = path.read_text() if path.is_file() else ""
    kept = old.split(NOTES_MARKER, 1)[1] if NOTES_MARKER in old else "\n"
    write_text(path, generated.rstrip("\n") + "\n\n" + NOTES_MARKER + kept)
