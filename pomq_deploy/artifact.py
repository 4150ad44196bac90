"""Build output: ``engines/<recipe>/<plan-id>/`` with the ONNX, the backend's artifact and ``manifest.json``.

The manifest records what was built and what was measured, with the sha256 of every file and of itself,
so that ``eval``/``bench`` refuse a directory whose files or manifest were changed after the build. A
build happens in a temporary sibling directory that is renamed into place only when complete.
"""

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._schema import parse
from .atomic import remove_dead_processes_folders, write_text
from .backends import Artifact
from .errors import PomqError
from .manifest import MANIFEST_FORMAT, Manifest
from .quant.calibration import file_sha256

MANIFEST = "manifest.json"


class ArtifactError(PomqError):
    """An artifact directory is missing, incomplete or was changed after its build."""


def _self_hash(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def seal(manifest: dict, directory: Path) -> dict:
    """Add the files' and the manifest's own checksums (call last, after every measurement)."""
    manifest = dict(manifest)
    manifest["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                         for p in sorted(Path(directory).iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest["manifest_sha256"] = _self_hash(manifest)
    return manifest


def write_json_atomic(obj: Any, path: Path) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


@contextmanager
def staging_dir(final: Path, say: Callable[[str], None] = lambda _: None) -> Iterator[Path]:
    """A temporary directory beside ``final`` that replaces it on success and vanishes on failure (with the folders
    made to hold it, when they are empty). Its name holds
    this process's id, ``.<final>.<pid>-<random>.tmp``: one left by a process that is gone (a build killed with
    SIGKILL, which no ``except`` sees) is removed by the next build into the same place, which ``say``s so."""
    final = Path(final)
    made = [p for p in (final.parent, *final.parent.parents) if not p.exists()]  # deepest first
    final.parent.mkdir(parents=True, exist_ok=True)
    stale = remove_dead_processes_folders(final.parent, f".{final.name}.", ".tmp")
    if stale:
        say(f"removed {len(stale)} staging folder(s) of {final} left by killed builds: {', '.join(p.name for p in stale)}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}-", suffix=".tmp", dir=final.parent))
    tmp.chmod(_folder_mode())  # mkdtemp's 0700 would stay on the artifact: an ordinary folder's mode instead
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:  # and the folders made for it, when nothing else went into them
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.{os.getpid()}-replaced.tmp")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _folder_mode() -> int:
    """The mode ``mkdir`` gives a new folder under this process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


@dataclass(frozen=True)
class BuiltArtifact:
    directory: Path
    manifest: Manifest

    @property
    def runnable(self) -> Artifact:
        """What the backend runs: its file in this directory, with the options it was built with."""
        m = self.manifest
        return Artifact(self.directory / m.artifact.file, m.backend.name, m.backend.options, m.artifact.size_bytes)


def load_artifact(directory: Path) -> BuiltArtifact:
    """Read and verify ``directory/manifest.json`` and the files it lists."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: no such artifact directory; create one with pomq-deploy build")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; this is not a complete build (rebuild with pomq-deploy build)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e}); rebuild with pomq-deploy build") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ArtifactError(f"{path}: not a pomq-deploy manifest of format {MANIFEST_FORMAT}; rebuild it")
    if manifest.get("manifest_sha256") != _self_hash(manifest):
        raise ArtifactError(f"{path}: edited after the build (its checksum does not match its contents); rebuild it")
    typed = parse(Manifest, manifest, str(path), ArtifactError)
    for name, meta in typed.files.items():
        f = directory / name
        if not f.is_file():
            raise ArtifactError(f"{f}: listed in the manifest but missing; rebuild the artifact")
        if f.stat().st_size != meta.bytes or file_sha256(f) != meta.sha256:
            raise ArtifactError(f"{f}: changed after the build (sha256 differs from the manifest's); rebuild it")
    return BuiltArtifact(directory, typed)
