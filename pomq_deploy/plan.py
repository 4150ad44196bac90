"""Bit-width plans: per encoder block, the widths of its weights (``w``), of the activations entering its
Linear layers and LayerNorms (``a``) and of its post-Softmax attention (``attn``), each 4 or 8.

A plan is a small YAML file a person can read, edit and diff (README.md, "Plans"). Its id is a hash of what
changes the quantized model (recipe, scheme, rounding, blocks), so identical plans share artifacts and results.
"""

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AliasChoices, Field
from pydantic.dataclasses import dataclass

from ._schema import STRICT, parse, read_yaml, to_plain
from .atomic import write_text
from .errors import PlanError
from .quant.roundings import DEFAULT_ROUNDING, RoundingName
from .quant.schemes import SchemeName

Bits = Literal[4, 8]


@dataclass(frozen=True, config=STRICT)
class BlockBits:
    w: Bits
    a: Bits
    attn: Bits


@dataclass(frozen=True, config=STRICT)
class Plan:
    recipe: Annotated[str, Field(validation_alias=AliasChoices("recipe", "model"))]  # earlier plan files call it "model"
    scheme: SchemeName
    blocks: tuple[BlockBits, ...] = Field(min_length=1)
    measured: dict[str, Any] | None = None  # written by search/build, informational only
    rounding: RoundingName = DEFAULT_ROUNDING  # how the weights are put on their grids (quant.roundings)

    @property
    def is_mixed(self) -> bool:
        """The paper's constraint 2: not every width 4 and not every width 8."""
        widths = {v for b in self.blocks for v in (b.w, b.a, b.attn)}
        return widths == {4, 8}

    @property
    def plan_id(self) -> str:
        # "model": the key plan ids have been hashed with since the first release; keeping it keeps them
        key = {"model": self.recipe, "scheme": self.scheme, "blocks": [[b.w, b.a, b.attn] for b in self.blocks]}
        if self.rounding != DEFAULT_ROUNDING:  # absent for nearest: the ids of plans before roundings existed stay
            key["rounding"] = self.rounding
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]

    def check_blocks(self, n_blocks: int, source: str = "plan") -> None:
        if len(self.blocks) != n_blocks:
            raise PlanError(f"{source}: 'blocks' has {len(self.blocks)} rows but recipe {self.recipe}'s model has {n_blocks} "
                            f"encoder blocks; give one {{w, a, attn}} row per block")


def parse_uniform(text: str) -> tuple[int, int, int]:
    """``W/A/ATTN`` (e.g. ``8/8/4``) as three widths, each 4 or 8."""
    parts = text.split("/")
    if len(parts) != 3 or any(p not in ("4", "8") for p in parts):
        raise ValueError(f"expected W/A/ATTN with each of 4 or 8, e.g. 8/8/4; got {text!r}")
    w, a, attn = (int(p) for p in parts)
    return w, a, attn


def uniform_plan(text: str, n_blocks: int, recipe: str, scheme: str, rounding: str = DEFAULT_ROUNDING) -> Plan:
    w, a, attn = parse_uniform(text)
    return Plan(recipe=recipe, scheme=scheme, blocks=tuple(BlockBits(w=w, a=a, attn=attn) for _ in range(n_blocks)),
                rounding=rounding)


def paper_plan(n_blocks: int, recipe: str, scheme: str, rounding: str = DEFAULT_ROUNDING) -> Plan:
    """PoMQ-ViT's plan as the tools measure it: the first two and the last two blocks at 4/4/4, the others at 8/8/8
    (DeiT's blocks 1-2 and 11-12 of 12)."""
    return Plan(recipe=recipe, scheme=scheme, blocks=tuple(BlockBits(w=b, a=b, attn=b) for b in
                                                          (4 if i < 2 or i >= n_blocks - 2 else 8 for i in range(n_blocks))),
                rounding=rounding)


def load_plan(path: Path) -> Plan:
    return parse(Plan, read_yaml(path, PlanError), str(path), PlanError)


def dump_plan(plan: Plan) -> str:
    """YAML with one flow-style row per block (README.md, "Plans")."""
    lines = [f"recipe: {plan.recipe}", f"scheme: {plan.scheme}", f"rounding: {plan.rounding}", "blocks:"]
    lines += [f"  - {{w: {b.w}, a: {b.a}, attn: {b.attn}}}" for b in plan.blocks]
    if plan.measured is not None:
        lines.append(yaml.safe_dump({"measured": to_plain(plan.measured)}, sort_keys=False).rstrip())
    return "\n".join(lines) + "\n"


def save_plan(plan: Plan, path: Path) -> None:
    """Write atomically: a temporary name, then a rename."""
    write_text(Path(path), dump_plan(plan))
