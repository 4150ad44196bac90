"""Roundings: how a weight's values are put on its grid, beside the scheme that chose the activations' grids.

The grid itself does not change with the rounding (symmetric per output channel, min/max scale, int8 or int4),
so the export stores codes and scales exactly as before; only which code each weight gets does. (Each row's
clipping searched by least squared error first, as GPTQ's, BRECQ's and QDrop's code can, was measured on the
reference model: no consistent gain under GPTQ, 0.45-0.75 point lost at 4/4/4 under block reconstruction;
docs/roundings.md.)

- ``nearest``: each weight to its nearest code (what every scheme did so far; nothing is fitted).
- ``gptq``: GPTQ (Frantar et al., ICLR 2023): each Linear's columns quantized in turn, each column's rounding
  error fed back onto the columns not yet quantized through the inverse Hessian ``X^T X`` of that Linear's
  inputs on the calibration images, collected under the plan's own activation quantizers (see
  :mod:`.fitting`). Closed form, seconds.
- ``adaround``: each block's weights rounded up or down as learned against the block's FP32 output (AdaRound
  at BRECQ's block granularity, :mod:`.reconstruction`), under the block's own activation quantizers, whose
  4-bit step sizes are learned with them (LSQ). Minutes; the recipe's ``fit`` section sets iterations, batch
  and learning rates.
- ``qdrop``: ``adaround`` with QDrop's random dropping of activation quantization while fitting
  (probability ``fit.drop``).

Data only (no torch), like :mod:`.schemes`: the command line and the plan schema read it cheaply.
"""

from dataclasses import dataclass

from .registry import Registry

DEFAULT_ROUNDING = "nearest"


@dataclass(frozen=True)
class Rounding:
    name: str
    summary: str  # one line, for --help and the docs
    fitted: bool  # fitted to calibration data per (block, block setting): cached beside the calibration
    reads_fit_spec: bool = False  # the recipe's ``fit`` section changes its result (part of its cache key)


ROUNDINGS: Registry[Rounding] = Registry("rounding")
register_rounding = ROUNDINGS.register
get_rounding = ROUNDINGS.lookup
RoundingName = ROUNDINGS.name_field()  # a schema field holding a registered rounding's name

register_rounding(Rounding("nearest", "each weight to its nearest code (no fitting)", fitted=False))
register_rounding(Rounding("gptq", "GPTQ: columns in turn, rounding errors fed forward through each Linear's "
                           "inverse input Hessian on the calibration images (about a minute for the reference model)",
                           fitted=True))
register_rounding(Rounding("adaround", "block reconstruction: each block's 4-bit weights' roundings and 4-bit activation "
                           "steps learned against its FP32 output (AdaRound at block granularity, LSQ; about 12 minutes "
                           "for the reference model)", fitted=True,
                           reads_fit_spec=True))
register_rounding(Rounding("qdrop", "adaround with QDrop's random dropping of activation quantization while fitting",
                           fitted=True, reads_fit_spec=True))
