"""Bit-width plans: per encoder block, the format of its weights (``w``), of the activations entering its
Linear layers and LayerNorms (``a``) and of its post-Softmax attention (``attn``).

PoMQ-ViT's genes are integer widths, 4 or 8. A gene may also be ``fp8`` (FP8 E4M3, scaled per tensor for
activations and per output channel for weights) or ``float`` (not quantized): the formats the engines run per
block besides integers (a block kept in float, an FP8 block, INT4 weight-only GEMMs with float activations:
``{w: 4, a: float}``). Which of them a target's engine runs, and as what, is the target's to say
(:mod:`.targets`).

A plan is a small YAML file a person can read, edit and diff (README.md, "Plans"). Its id is a hash of what
changes the quantized model (recipe, scheme, rounding, blocks), so identical plans share artifacts and results.
"""

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import AliasChoices, Field, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from ._schema import STRICT, parse, read_yaml, to_plain
from .atomic import write_text
from .errors import PlanError
from .quant.roundings import DEFAULT_ROUNDING, RoundingName
from .quant.schemes import SchemeName

Bits = Literal[4, 8]  # PoMQ-ViT's integer widths
Gene = Literal[4, 8, "fp8", "float"]
GENE_VALUES: tuple[Gene, ...] = get_args(Gene)
# what a GEMM's weights allow for the activations that enter it: integer weights take integer activations, or
# float ones (weight-only quantization); FP8 weights take FP8 activations; float weights float ones
GEMM_PAIRS = {4: (4, 8, "float"), 8: (4, 8, "float"), "fp8": ("fp8",), "float": ("float",)}


@dataclass(frozen=True, config=STRICT)
class BlockBits:
    w: Gene
    a: Gene
    attn: Gene

    @model_validator(mode="after")
    def _gemm_pair(self):
        if self.a not in GEMM_PAIRS[self.w]:
            allowed = " or ".join(map(str, GEMM_PAIRS[self.w]))
            raise ValueError(f"w={self.w} with a={self.a}: no engine runs that GEMM; with w={self.w}, a is {allowed}")
        return self

    @property
    def integer(self) -> bool:
        """Every gene an integer width (a PoMQ-ViT setting)."""
        return all(isinstance(v, int) for v in (self.w, self.a, self.attn))

    def text(self) -> str:
        return f"{self.w}/{self.a}/{self.attn}"


@dataclass(frozen=True, config=STRICT)
class Plan:
    recipe: Annotated[str, Field(validation_alias=AliasChoices("recipe", "model"))]  # earlier plan files call it "model"
    scheme: SchemeName
    blocks: tuple[BlockBits, ...] = Field(min_length=1)
    measured: dict[str, Any] | None = None  # written by search/build, informational only
    rounding: RoundingName = DEFAULT_ROUNDING  # how the weights are put on their grids (quant.roundings)

    @property
    def is_mixed(self) -> bool:
        """The paper's constraint 2: not every width 4 and not every width 8 (and every gene an integer width)."""
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


def parse_uniform(text: str) -> BlockBits:
    """``W/A/ATTN`` (e.g. ``8/8/4``, ``fp8/fp8/fp8``, ``4/float/float``) as one block's genes."""
    parts = text.split("/")
    allowed = [str(v) for v in GENE_VALUES]
    if len(parts) != 3 or any(p not in allowed for p in parts):
        raise ValueError(f"expected W/A/ATTN with each of {', '.join(allowed)}, e.g. 8/8/4; got {text!r}")
    w, a, attn = (int(p) if p.isdigit() else p for p in parts)
    try:
        return BlockBits(w=w, a=a, attn=attn)
    except ValidationError as e:
        raise ValueError(f"{text!r}: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def uniform_plan(text: str, n_blocks: int, recipe: str, scheme: str, rounding: str = DEFAULT_ROUNDING) -> Plan:
    return Plan(recipe=recipe, scheme=scheme, blocks=(parse_uniform(text),) * n_blocks, rounding=rounding)


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
