"""pomq-deploy calibrate: fit and cache the quantizers of a recipe's model for one scheme and observer."""

import argparse
import json

from ._common import add_device_argument, add_recipe_arguments, add_rounding_argument, add_scheme_argument, calib_track, device_of, recipe_from_args

HELP = "calibrate a recipe's model for a scheme and cache the result"
DESCRIPTION = """\
Run the calibration images (FQ-ViT: 10 batches x 100 shuffled training images, set in the recipe)
through the FP32 model, fit every activation's quantizer for 4 and 8 bits, and cache them on disk
(under $POMQ_DEPLOY_CACHE, default ~/.cache/pomq-deploy). Later commands that quantize with the same
recipe, checkpoint, scheme, observer and calibration set load the cache instead of calibrating again.
With a fitted --rounding (gptq), the weights' codes for every block and setting are fitted too, for both
export targets' activation formats, and cached beside the calibration (other commands fit the format
they need the first time they need it).

examples:
  pomq-deploy calibrate --scheme fqvit
  pomq-deploy calibrate --scheme tsptq --observer omse --force
  pomq-deploy calibrate --scheme repq --rounding gptq     # and GPTQ's weights, for both export targets
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..quant.roundings import DEFAULT_ROUNDING
    from ..quant.schemes import DEFAULT_SCHEME, OBSERVERS

    add_recipe_arguments(p)
    add_scheme_argument(p, DEFAULT_SCHEME, DEFAULT_SCHEME)
    add_rounding_argument(p, DEFAULT_ROUNDING, DEFAULT_ROUNDING)
    p.add_argument("--observer", choices=OBSERVERS, default="minmax", help="activation range observer (default: minmax)")
    p.add_argument("--force", action="store_true", help="calibrate again even if a cached calibration exists")
    add_device_argument(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run(args: argparse.Namespace) -> int:
    import time

    from ..quant.calibration import calibrated_model
    from ..quant.quantizers import FORMATS
    from ._console import stdout

    recipe = recipe_from_args(args)
    model, info = calibrated_model(recipe, args.scheme, args.observer, force=args.force, track=calib_track,
                                   rounding=args.rounding, device=device_of(args))
    out = {"recipe": recipe.name, "scheme": args.scheme, "observer": args.observer, "rounding": args.rounding,
           "cache": str(info.path), "cached": info.cached, "seconds": round(info.seconds, 2), "blocks": model.num_blocks,
           "activations": len(model.act_quants)}
    if model.fit_source is not None:  # a fitted rounding: both activation formats now, as calibration does
        start = time.perf_counter()
        for fmt in FORMATS:
            model.fits(args.rounding, fmt)
        out["fit_seconds"] = round(time.perf_counter() - start, 2)
    if args.json:
        print(json.dumps(out))
    else:
        verb = "loaded from cache" if info.cached else "calibrated"
        fitted = f"; {args.rounding} weights ready in {out['fit_seconds']:.1f} s" if "fit_seconds" in out else ""
        stdout.print(f"{recipe.name}: {args.scheme}/{args.observer} {verb} in {info.seconds:.1f} s "
                     f"({model.num_blocks} blocks, {len(model.act_quants)} activations) -> {info.path}{fitted}")
    return 0
