"""Calibrate once, materialise any plan fast.

Calibration fits, for every activation, a quantizer for 4 and 8 bits in both formats (see
``QuantModel.calibrate``) and stores them on disk, keyed by everything that changes them: the recipe's
model and checkpoint contents, the scheme, the observer and the calibration set. Applying a plan then
only picks fitted quantizers and fake-quantizes the weights: no new calibration pass.
"""

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..atomic import inside, replace_atomically
from ..device import to_cpu
from ..recipe import Recipe
from . import reconstruction  # noqa: F401  (registers the adaround and qdrop fitters)
from .fitting import FITTERS
from .model import QuantModel
from .roundings import DEFAULT_ROUNDING, get_rounding

log = logging.getLogger(__name__)

CACHE_ENV = "POMQ_DEPLOY_CACHE"
# Bump when the fitted state's meaning changes, so that old cache files are not reused.
CALIB_FORMAT = 3  # 2: GELU correctly rounded while observing (quant.modules.PreciseGELU); 3: an FP8 quantizer per activation
FIT_FORMAT = 5  # the same for a fitted rounding's weights (quant.fitting); 2: learned activation quantizers beside them; 3: reconstruction in its setting's uniform context; 4: 8-bit weights and steps not learned; 5: steps-only settings at a quarter of the iterations


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pomq-deploy")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class CalibInfo:
    path: Path
    cached: bool  # True: loaded from the cache; False: calibrated now
    seconds: float


def calibration_key(recipe: Recipe, scheme: str, observer: str) -> dict:
    return {"format": CALIB_FORMAT, "arch": recipe.model.arch, "checkpoint_sha256": file_sha256(recipe.model.checkpoint),
            "model_kwargs": recipe.model.kwargs, "model_data": dataclasses.asdict(recipe.model.data),
            "scheme": scheme, "observer": observer, "data": dataclasses.asdict(recipe.data) | {"workers": None}}


def cache_path(recipe: Recipe, key: dict, suffix: str = "") -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return inside(cache_root() / "calib", f"{recipe.name}-{key['scheme']}-{key['observer']}{suffix}-{digest}.pt")


Track = Callable[[Iterable, int, str], Iterable]


def quant_model(recipe: Recipe, scheme: str, observer: str = "minmax", rounding: str = DEFAULT_ROUNDING,
                device: torch.device | None = None) -> QuantModel:
    """The recipe's model wrapped for ``scheme``, not yet calibrated (cheap: use it to check a plan first), on
    ``device`` (None: the CPU), where its calibration, fitting and fake-quant forward then run."""
    from ..models.loading import load_model

    qmodel = QuantModel(load_model(recipe.model), scheme, observer, rounding)
    return qmodel.to_device(device) if device is not None else qmodel


def calibrate_cached(qmodel: QuantModel, recipe: Recipe, force: bool = False, track: Track | None = None) -> CalibInfo:
    """Load ``qmodel``'s fitted quantizers from the cache, or calibrate now and store them. With a fitted
    rounding, its weights are fitted (or read from their own cache file) per activation format when a plan
    first needs them (``qmodel.fit_source``)."""
    from ..data import calibration_batches

    start = time.perf_counter()
    key = calibration_key(recipe, qmodel.scheme, qmodel.observer)
    path = cache_path(recipe, key)
    batches: list[torch.Tensor] = []
    if path.is_file() and not force:
        qmodel.load_state(torch.load(path, weights_only=True)["points"])
        log.info("calibration loaded from %s", path)
        cached = True
    else:
        batches = calibration_batches(recipe.data, qmodel)
        progress = track(batches, len(batches), f"calibrate {qmodel.scheme}/{qmodel.observer}") if track else None
        state = qmodel.calibrate(batches, progress)
        replace_atomically(path, lambda tmp: torch.save({"key": key, "version": __version__, "points": state}, tmp))
        log.info("calibration saved to %s", path)
        cached = False
    if get_rounding(qmodel.rounding).fitted:
        qmodel.weight_fits.clear()
        qmodel.fit_source = lambda fmt: _fits_cached(qmodel, recipe, key, fmt, batches, force, track)
    return CalibInfo(path, cached, time.perf_counter() - start)


def _fits_cached(qmodel: QuantModel, recipe: Recipe, calib_key: dict, fmt: str, batches: list[torch.Tensor],
                 force: bool, track: Track | None) -> dict:
    """``qmodel.rounding``'s fits in activation format ``fmt``: from the cache, or fitted on the calibration
    images now (the calibration's own batches when it just ran) and stored."""
    from ..data import calibration_batches

    key = calib_key | {"rounding": qmodel.rounding, "format": fmt, "fit_format": FIT_FORMAT}
    if get_rounding(qmodel.rounding).reads_fit_spec:
        key["fit"] = dataclasses.asdict(recipe.fit)
    path = cache_path(recipe, key, f"-{qmodel.rounding}-{fmt}")
    if path.is_file() and not force:
        log.info("%s weights (%s) loaded from %s", qmodel.rounding, fmt, path)
        return torch.load(path, weights_only=True)["fits"]
    start = time.perf_counter()
    fits = FITTERS[qmodel.rounding](qmodel, batches or calibration_batches(recipe.data, qmodel), fmt, track, recipe.fit)
    replace_atomically(path, lambda tmp: torch.save({"key": key, "version": __version__, "fits": to_cpu(fits),
                                                     "seconds": time.perf_counter() - start}, tmp))
    log.info("%s weights (%s) fitted in %.1f s, saved to %s", qmodel.rounding, fmt, time.perf_counter() - start, path)
    return fits


def calibrated_model(recipe: Recipe, scheme: str, observer: str = "minmax", force: bool = False,
                     track: Track | None = None, rounding: str = DEFAULT_ROUNDING,
                     device: torch.device | None = None) -> tuple[QuantModel, CalibInfo]:
    """The recipe's model wrapped for ``scheme`` on ``device``, with its quantizers (and a fitted rounding's
    weights) calibrated or loaded from the cache."""
    start = time.perf_counter()
    qmodel = quant_model(recipe, scheme, observer, rounding, device)
    info = calibrate_cached(qmodel, recipe, force, track)
    return qmodel, dataclasses.replace(info, seconds=time.perf_counter() - start)
