"""Nsight Systems: the ``nsys profile`` / ``nsys stats`` command lines, and its CUDA kernel summary.

``nsys stats --report cuda_gpu_kern_sum --format csv --output -`` prints the summary as CSV on stdout
(older releases called the report ``gpukernsum``), after progress lines such as ``Generating SQLite
file ...`` and ``Processing [...] with [.../cuda_gpu_kern_sum.py]...``. Its columns, per NVIDIA's report
script: ``Time (%)`` (share of the summed kernel time), ``Total Time (ns)``, ``Instances``, ``Avg (ns)``,
``Med (ns)``, ``Min (ns)``, ``Max (ns)``, ``StdDev (ns)``, ``Name``, one row per kernel, slowest first.
"""

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import ProfileError

REPORT = "cuda_gpu_kern_sum"
HEADER = "Time (%)"
COLUMNS = ("Time (%)", "Total Time (ns)", "Instances", "Avg (ns)", "Name")


@dataclass(frozen=True)
class KernelTime:
    """One CUDA kernel (by name) over the whole profiled process."""

    name: str
    percent: float  # of the summed kernel time
    total_ns: float
    instances: int
    avg_ns: float


def report_path(base: Path) -> Path:
    """The file ``nsys profile -o base`` writes: nsys appends ``.nsys-rep`` to the name it is given."""
    return base.with_name(base.name + ".nsys-rep")


def profile_command(nsys: str, base: Path, child: Sequence[str]) -> list[str]:
    """Run ``child`` under Nsight Systems, tracing CUDA and NVTX, into ``base``.nsys-rep (replacing it)."""
    return [nsys, "profile", "--trace=cuda,nvtx", "--force-overwrite=true", "-o", str(base), *child]


def stats_command(nsys: str, report: Path) -> list[str]:
    """Print the CUDA kernel summary of ``report`` as CSV on stdout; --force-export re-reads the report
    rather than a SQLite file left from an earlier run of the same name."""
    return [nsys, "stats", "--report", REPORT, "--format", "csv", "--output", "-", "--force-export=true", str(report)]


def _header_index(lines: list[str]) -> int:
    for i, line in enumerate(lines):
        if next(csv.reader([line]), [""])[:1] == [HEADER]:
            return i
    shown = next((line.strip() for line in lines if line.strip()), "no output")
    raise ProfileError(f"nsys stats printed no {REPORT} table ({shown}); did the profiled run launch CUDA kernels?")


def parse_kern_sum(text: str) -> tuple[KernelTime, ...]:
    """The kernels of one ``cuda_gpu_kern_sum`` CSV table, slowest first; lines before its header are skipped."""
    lines = text.splitlines()
    start = _header_index(lines)
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].strip()), len(lines))
    reader = csv.DictReader(io.StringIO("\n".join(lines[start:end])))
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ProfileError(f"the {REPORT} table has no column {', '.join(missing)}; columns: {', '.join(reader.fieldnames or [])}")
    rows = [KernelTime(r["Name"], float(r["Time (%)"]), float(r["Total Time (ns)"]), int(r["Instances"]), float(r["Avg (ns)"]))
            for r in reader]
    return tuple(sorted(rows, key=lambda k: (-k.total_ns, k.name)))
