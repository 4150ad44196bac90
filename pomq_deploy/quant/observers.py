"""Observers: running statistics of one activation over the calibration batches.

Each keeps a per-tensor range by its own rule and, when asked, a per-channel (last dimension) range for
the per-channel methods (PTF, O-2SF). FQ-ViT's settings: EMA momentum 0.01; percentile 0.99999 smoothed by
EMA 0.01; OMSE tracks min/max and searches the final range on the last batch (see ``functional.omse_range``).
Per-channel ranges follow min/max, or EMA for the ``ema`` observer.
"""

import torch

from .schemes import OBSERVERS

EMA_MOMENTUM = 0.01
PERCENTILE = 0.99999
_KTH_MAX = 1 << 24  # kthvalue on more elements than this samples them with a fixed stride


def _percentile_pair(x: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.detach().reshape(-1).float()
    if flat.numel() > _KTH_MAX:
        flat = flat[:: flat.numel() // _KTH_MAX + 1]
    n = flat.numel()
    hi_k = min(n, max(1, int(round(q * (n - 1))) + 1))
    lo_k = max(1, min(n, int(round((1 - q) * (n - 1))) + 1))
    return flat.kthvalue(lo_k).values, flat.kthvalue(hi_k).values


class RangeObserver:
    """Per-tensor (and optionally per-channel) running range of the tensors passed to ``update``."""

    def __init__(self, kind: str, per_channel: bool = False):
        if kind not in OBSERVERS:
            raise ValueError(f"observer {kind!r}; allowed: {', '.join(OBSERVERS)}")
        self.kind, self.per_channel = kind, per_channel
        self.lo = self.hi = None  # per-tensor, 0-d tensors
        self.lo_c = self.hi_c = None  # per-channel, (C,)

    def _smooth(self, old, new, reduce):
        if old is None:
            return new
        if self.kind in ("ema", "percentile"):
            return old + EMA_MOMENTUM * (new - old)
        return reduce(old, new)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if self.kind == "percentile":
            lo, hi = _percentile_pair(x, PERCENTILE)
        else:
            lo, hi = x.min(), x.max()
        self.lo, self.hi = self._smooth(self.lo, lo, torch.minimum), self._smooth(self.hi, hi, torch.maximum)
        if self.per_channel:
            x2d = x.reshape(-1, x.shape[-1])
            lo_c, hi_c = x2d.amin(dim=0), x2d.amax(dim=0)
            channel_kind = "ema" if self.kind == "ema" else "minmax"
            if self.lo_c is None or channel_kind == "minmax":
                self.lo_c = lo_c if self.lo_c is None else torch.minimum(self.lo_c, lo_c)
                self.hi_c = hi_c if self.hi_c is None else torch.maximum(self.hi_c, hi_c)
            else:
                self.lo_c = self.lo_c + EMA_MOMENTUM * (lo_c - self.lo_c)
                self.hi_c = self.hi_c + EMA_MOMENTUM * (hi_c - self.hi_c)
