"""ONNX Runtime's profiler trace (``SessionOptions.enable_profiling``) -> time per operator type and node.

The file is a JSON list of Chrome-trace events. Per inference, ORT writes one ``"cat": "Session"`` event
named ``model_run`` spanning the run, and one ``"cat": "Node"`` event per executed node named
``<node>_kernel_time`` with ``"args": {"op_name": <op type>, ...}``; ``ts`` and ``dur`` are microseconds
from the start of profiling (ONNX Runtime 1.32; older releases add ``_fence_before``/``_fence_after``
events, which are not kernel time and are skipped). The profiler starts with the session, so warm-up runs
are in the trace: a node event belongs to the ``model_run`` whose span holds its start, and the first
``warmup`` runs are dropped by that index.
"""

import bisect
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

KERNEL_SUFFIX = "_kernel_time"


@dataclass(frozen=True)
class Timing:
    """Kernel time of one operator type (``name == op_type``) or one node over the timed runs."""

    name: str
    op_type: str
    total_us: float
    calls: int
    median_us: float  # per call: on a shared machine one preempted call can swell the total, not this


@dataclass(frozen=True)
class OrtProfile:
    runs: int  # timed runs counted
    warmup: int  # leading runs dropped
    run_us: float  # summed model_run spans of the timed runs (kernels plus ORT's own overhead)
    node_us: float  # summed kernel time of the timed runs
    ops: tuple[Timing, ...]  # per operator type, slowest first
    nodes: tuple[Timing, ...]  # per node, slowest first

    def share(self, t: Timing) -> float:
        """Fraction of the timed runs' kernel time."""
        return t.total_us / self.node_us if self.node_us else 0.0

    def ms_per_run(self, t: Timing) -> float:
        return t.total_us / self.runs / 1e3

    def to_json(self, top: int) -> dict[str, Any]:
        def row(t: Timing) -> dict[str, Any]:
            return {"name": t.name, "op_type": t.op_type, "total_ms": round(t.total_us / 1e3, 3), "calls": t.calls,
                    "share": round(self.share(t), 4), "ms_per_run": round(self.ms_per_run(t), 4),
                    "median_us_per_call": t.median_us}

        return {"runs": self.runs, "warmup_runs": self.warmup, "run_ms_per_run": round(self.run_us / self.runs / 1e3, 4),
                "node_ms_per_run": round(self.node_us / self.runs / 1e3, 4),
                "ops": [row(t) for t in self.ops], "top_nodes": [row(t) for t in self.nodes[:top]]}


def run_spans(events: Iterable[dict]) -> list[tuple[float, float]]:
    """(start, end) of every ``model_run``, in time order."""
    return sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")


def timed_kernels(events: list[dict], warmup: int) -> tuple[list[dict], list[tuple[float, float]]]:
    """The kernel events of the runs after the first ``warmup``, and those runs' spans."""
    spans = run_spans(events)
    if len(spans) <= warmup:
        raise ValueError(f"the trace holds {len(spans)} model runs, not more than the {warmup} warm-up runs to drop")
    starts = [s for s, _ in spans]
    kept = []
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith(KERNEL_SUFFIX):
            continue
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i >= warmup and e["ts"] < spans[i][1]:
            kept.append(e)
    return kept, spans[warmup:]


def _ranked(totals: dict[tuple[str, str], list[float]]) -> tuple[Timing, ...]:
    rows = (Timing(name, op, sum(durs), len(durs), statistics.median(durs)) for (name, op), durs in totals.items())
    return tuple(sorted(rows, key=lambda t: (-t.total_us, t.name)))


def summarize(events: list[dict], warmup: int) -> OrtProfile:
    """Kernel time per operator type and per node over the timed runs of one profiled session."""
    kernels, spans = timed_kernels(events, warmup)
    by_op: dict[tuple[str, str], list[float]] = defaultdict(list)
    by_node: dict[tuple[str, str], list[float]] = defaultdict(list)
    for e in kernels:
        op = e["args"]["op_name"]
        by_op[(op, op)].append(e["dur"])
        by_node[(e["name"][: -len(KERNEL_SUFFIX)], op)].append(e["dur"])
    return OrtProfile(len(spans), warmup, float(sum(end - start for start, end in spans)),
                      float(sum(e["dur"] for e in kernels)), _ranked(by_op), _ranked(by_node))
