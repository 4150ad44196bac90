"""Search spaces: the per-block settings a search draws from, how a plan is written as optuna parameters, and
which of PoMQ-ViT's constraints hold.

- ``paper`` (PoMQ-ViT, the default): per block ``w``, ``a`` and ``attn`` each 4 or 8, three parameters
  ``b{i}_w``, ``b{i}_a``, ``b{i}_attn`` (the studies of before spaces existed); a plan must mix widths
  (constraint 2) and be smaller than uniform 8-bit (constraint 4).
- ``engine``: per block one of the formats the target's engine really runs (:mod:`..targets`: float, INT8,
  FP8, INT4 weight-only on TensorRT; float, INT8, INT4 weights on ONNX Runtime), one parameter ``b{i}``
  naming it ``w/a/attn``. No mixing constraint (uniform INT8 is a fair answer), and the size is held against
  FP32's: a block kept in float is what an accuracy budget may need.
"""

import itertools
from dataclasses import dataclass

from ..plan import BlockBits, Plan, parse_uniform
from ..quant.roundings import DEFAULT_ROUNDING
from ..targets import get_target
from . import SPACES

GENES = ("w", "a", "attn")
BASE = (8, 8, 8)  # every space holds uniform 8-bit, the search's baseline plan


def text(setting: tuple) -> str:
    return "/".join(map(str, setting))


@dataclass(frozen=True)
class Space:
    name: str
    settings: tuple[tuple, ...]  # (w, a, attn) a block may take
    mixed: bool  # the paper's constraint 2: not every width 4, not every width 8
    size_reference: str  # the baseline a plan's size must stay below: "uniform8" or "fp32"

    def suggest(self, trial, n_blocks: int) -> list[tuple]:
        if self.name == "paper":
            return [tuple(trial.suggest_categorical(f"b{i}_{g}", [4, 8]) for g in GENES) for i in range(n_blocks)]
        return [parse_setting(trial.suggest_categorical(f"b{i}", [text(s) for s in self.settings]))
                for i in range(n_blocks)]

    def params(self, plan: Plan) -> dict:
        if self.name == "paper":
            return {f"b{i}_{g}": getattr(b, g) for i, b in enumerate(plan.blocks) for g in GENES}
        return {f"b{i}": b.text() for i, b in enumerate(plan.blocks)}

    def settings_of(self, params: dict, n_blocks: int) -> list[tuple]:
        if self.name == "paper":
            return [tuple(int(params[f"b{i}_{g}"]) for g in GENES) for i in range(n_blocks)]
        return [parse_setting(params[f"b{i}"]) for i in range(n_blocks)]

    def feasible_mix(self, plan: Plan) -> bool:
        return not self.mixed or plan.is_mixed


def parse_setting(value: str) -> tuple:
    b = parse_uniform(value)
    return b.w, b.a, b.attn


def plan_of(settings: list[tuple], recipe: str, scheme: str, rounding: str = DEFAULT_ROUNDING) -> Plan:
    return Plan(recipe=recipe, scheme=scheme, rounding=rounding, blocks=tuple(BlockBits(w=w, a=a, attn=t) for w, a, t in settings))


FLOAT_BLOCK = ("float",) * 3


def sensitivity_settings(space: Space) -> list[tuple]:
    """The engine space's settings a block's KL sensitivity is measured for: every one but float (KL 0)."""
    return [s for s in space.settings if s != FLOAT_BLOCK]


PAPER = Space("paper", tuple(itertools.product((4, 8), repeat=3)), mixed=True, size_reference="uniform8")


def get_space(name: str, target: str) -> Space:
    """``paper``, or ``engine`` for ``target``'s formats."""
    if name == "paper":
        return PAPER
    if name == "engine":
        return Space("engine", tuple(get_target(target).space()), mixed=False, size_reference="fp32")
    raise ValueError(f"search space {name!r}; allowed: {', '.join(SPACES)}")
