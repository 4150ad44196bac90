"""What a target's engine runs for each block of a plan, read from the plan alone (``check --plan``): no
export, no build. A plan is written in the fake-quant model's terms; the target says where its engine runs a
gene otherwise (:mod:`.targets`)."""

from dataclasses import dataclass

from .plan import Plan
from .targets import Target


@dataclass(frozen=True)
class BlockDeployment:
    index: int
    genes: str  # w/a/attn as the plan writes them
    gemm: str  # what runs qkv, proj, fc1 and fc2
    attention: str  # what runs probs @ v
    departs: tuple[str, ...]  # what runs otherwise than the plan writes it


def plan_deployment(plan: Plan, target: Target) -> list[BlockDeployment]:
    from .quant.quantizers import get_method
    from .quant.schemes import get_scheme

    scheme = get_scheme(plan.scheme)
    rows = []
    for i, b in enumerate(plan.blocks):
        log_domain = isinstance(b.attn, int) and get_method(scheme.method("attn", b.attn)).log_domain
        gemm, gemm_departs = target.gemm(b.w, b.a)
        attention, attention_departs = target.attention(b.a, b.attn, log_domain)
        rows.append(BlockDeployment(i, b.text(), gemm, attention, tuple(gemm_departs + attention_departs)))
    return rows


def departures(rows: list[BlockDeployment]) -> dict[str, list[int]]:
    """Each way the engine departs from the plan, with the blocks it concerns, in order of first appearance."""
    out: dict[str, list[int]] = {}
    for row in rows:
        for text in row.departs:
            out.setdefault(text, []).append(row.index)
    return out
