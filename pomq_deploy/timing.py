"""Latency ratios that reproduce on a shared machine: a candidate timed interleaved with its references.

A 30-run median taken at one moment mostly measures what else the host was doing then (a plan measured
27 ms in a search and 43.5 ms a minute later on a busy 2-core machine). What PoMQ-ViT's latency constraint
is about is the ratio to the FP32 model on the same backend, and a ratio is stable when both sides are timed
in the same moments: each round times every artifact in turn (a few runs, their median), the round's ratio
is candidate / reference, and rounds go on until the log-ratios' 90% confidence interval is within
``tolerance`` or ``max_rounds`` are spent. The spread is kept with the ratio.
"""

import math
import statistics
from collections.abc import Callable, Hashable
from dataclasses import dataclass

# Measured on a noisy 2-vCPU host (AMD EPYC VM): the geometric mean of 20 rounds' ratios repeated within +-4% where
# a single 60-run median, the ratio of all runs' medians or alternating single runs moved +-10-15%; few runs per
# round, more rounds. One warm-up run after switching models read the quantized ones ~5% slow (caches still
# holding the other model): three
ROUND_RUNS, WARMUP, MIN_ROUNDS, MAX_ROUNDS, TOLERANCE = 5, 3, 6, 10, 0.03
# Student's t, 95th percentile (two-sided 90% interval), by degrees of freedom 1..19
T95 = (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812, 1.796, 1.782, 1.771, 1.761, 1.753,
       1.746, 1.740, 1.734, 1.729)


@dataclass(frozen=True)
class Ratio:
    ratio: float  # geometric mean over rounds of (candidate median / reference median)
    low: float  # its 90% confidence interval
    high: float
    rounds: int
    ms: float  # the candidate's median over the rounds' medians (for tables; the ratio is what decides)
    reference_ms: float

    @property
    def spread(self) -> float:
        """Half-width of the interval relative to the ratio (0.03: +-3%)."""
        return (self.high - self.low) / (2 * self.ratio)

    def as_dict(self) -> dict:
        return {"ratio": self.ratio, "low": self.low, "high": self.high, "rounds": self.rounds, "ms": self.ms,
                "reference_ms": self.reference_ms}


def log_interval(logs: list[float]) -> tuple[float, float, float]:
    """Mean of ``logs`` and its 90% t-interval (exp'd by the caller); a single value has no width."""
    n = len(logs)
    mean = sum(logs) / n
    if n < 2:
        return mean, mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in logs) / (n - 1))
    half = T95[min(n - 2, len(T95) - 1)] * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def interleaved_ratios(time_ms: Callable[[Hashable], float], candidates: list[Hashable], reference: Hashable,
                       others: tuple[Hashable, ...] = (), min_rounds: int = MIN_ROUNDS, max_rounds: int = MAX_ROUNDS,
                       tolerance: float = TOLERANCE, on_round: Callable[[], None] | None = None) -> dict[Hashable, Ratio]:
    """Time ``reference``, each candidate and ``others`` in turn per round (``time_ms(key)``: one round's median
    in ms); return each candidate's (and other's) ratio to ``reference``. Rounds stop once every ratio's
    interval is within ``tolerance`` (relative half-width), after ``min_rounds``, at most ``max_rounds``;
    ``on_round`` is called after each (progress)."""
    keys = [reference, *candidates, *[o for o in others if o not in candidates and o != reference]]
    times: dict[Hashable, list[float]] = {k: [] for k in keys}
    for r in range(max_rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]  # no artifact always runs first (cold caches)
        for k in order:
            times[k].append(time_ms(k))
        if on_round is not None:
            on_round()
        if r + 1 >= min_rounds and all(_ratio(times[k], times[reference]).spread <= tolerance for k in keys[1:]):
            break
    return {k: _ratio(times[k], times[reference]) for k in keys[1:]}


def _ratio(candidate: list[float], reference: list[float]) -> Ratio:
    mean, low, high = log_interval([math.log(c / r) for c, r in zip(candidate, reference, strict=True)])
    return Ratio(math.exp(mean), math.exp(low), math.exp(high), len(candidate), statistics.median(candidate),
                 statistics.median(reference))


def backend_ratios(backend, artifacts: dict, batch: int, candidates: list[str], reference: str = "fp32",
                   runs: int = ROUND_RUNS, **rounds) -> dict[str, Ratio]:
    """``interleaved_ratios`` of built artifacts (name -> Artifact) on ``backend`` at ``batch``: each round runs
    ``runs`` timed inferences of each after WARMUP untimed ones; ``rounds``: its min/max rounds and tolerance."""
    def time_ms(name):
        return backend.latency(artifacts[name], batch, runs, warmup=WARMUP).median_ms

    others = tuple(k for k in artifacts if k != reference and k not in candidates)
    return interleaved_ratios(time_ms, candidates, reference, others, **rounds)
