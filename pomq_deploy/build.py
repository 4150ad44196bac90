"""Plan -> Q/DQ ONNX -> backend artifact -> measured manifest: what ``pomq-deploy build`` does."""

import datetime
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import __version__
from ._schema import parse, to_plain
from .artifact import MANIFEST, ArtifactError, BuiltArtifact, seal, staging_dir, write_json_atomic
from .atomic import inside
from .backends import Backend
from .manifest import MANIFEST_FORMAT, Manifest
from .measure import measure
from .plan import Plan
from .progress import Phases
from .recipe import Recipe

if TYPE_CHECKING:
    from .quant.model import QuantModel

@dataclass(frozen=True)
class BuildOptions:
    backend: Backend
    target: str  # export target: "ort" or "tensorrt"
    out_root: Path = Path("engines")
    batch: int = 8  # latency batch size
    runs: int = 50
    observer: str = "minmax"
    verify: bool = True  # the self-check against the PyTorch reference (pomq_deploy.verify)
    vs_fp32: bool = False  # also time the latency ratio to the FP32 model, interleaved (pomq_deploy.timing)


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import timm

    return {"pomq_deploy": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__}


def emulated_settings(plan: Plan | None, backend: str) -> list[str]:
    """Plan settings a CPU backend runs without their width's speed-up (the numbers stay the plan's)."""
    if plan is None:
        return []
    notes = []
    w4 = [i for i, b in enumerate(plan.blocks) if b.w == 4 and b.a != "float"]
    if w4 and backend == "ort-cpu":
        notes.append(f"{backend}: 4-bit weights (w=4, blocks {w4}) are stored as INT4 in model.onnx but run on ONNX "
                     "Runtime's INT8 kernels (same codes; it has no int4 x uint8 GEMM on the CPU)")
    weight_only = [i for i, b in enumerate(plan.blocks) if isinstance(b.w, int) and b.a == "float"]
    if weight_only and backend == "ort-cpu":
        notes.append(f"{backend}: weight-only GEMMs (a=float, blocks {weight_only}) run in float on weights a "
                     "DequantizeLinear expands: a smaller file, float speed at best")
    fp8 = [i for i, b in enumerate(plan.blocks) if "fp8" in (b.w, b.a, b.attn)]
    if fp8 and backend == "ort-cpu":
        notes.append(f"{backend}: FP8 genes (blocks {fp8}) run as FP8 Q/DQ computed in float (no FP8 kernels on the "
                     "CPU): FP8's accuracy, float speed at best")
    a4 = [i for i, b in enumerate(plan.blocks) if b.a == 4]
    if a4:
        notes.append(f"{backend}: 4-bit activations (a=4, blocks {a4}) run as 8-bit Q/DQ clipped to 16 levels: "
                     "the accuracy effect is real, the kernels are INT8")
    from .quant.quantizers import get_method
    from .quant.schemes import get_scheme

    scheme = get_scheme(plan.scheme)
    for bits in (4, 8):
        method = scheme.method("attn", bits)
        blocks = [i for i, b in enumerate(plan.blocks) if b.attn == bits]
        if blocks and get_method(method).log_domain:
            notes.append(f"{backend}: {method} attention (attn={bits}, blocks {blocks}) runs as float log-domain ops")
        elif blocks and bits == 4:
            notes.append(f"{backend}: 4-bit attention (attn=4, blocks {blocks}) runs as 8-bit Q/DQ clipped to 16 levels")
    return notes


def ratio_to_fp32(opts: BuildOptions, recipe: Recipe, artifact, work: Path, on_round: Callable[[], None] | None = None):
    """``artifact``'s latency over the FP32 model's on the same backend, timed in interleaved rounds until the
    ratio's 90% interval is within +-3% (what the search measures, so the two can be compared)."""
    import shutil
    import tempfile

    from .models.loading import load_model
    from .timing import backend_ratios

    fp_dir = Path(tempfile.mkdtemp(dir=work))
    try:
        fp32 = measure(opts.backend, fp_dir, model=load_model(recipe.model), plan=None, target=opts.target).artifact
        return backend_ratios(opts.backend, {"fp32": fp32, "plan": artifact}, opts.batch, ["plan"], on_round=on_round)["plan"]
    finally:
        shutil.rmtree(fp_dir, ignore_errors=True)  # inside the staging directory: never part of the artifact


def build(recipe: Recipe, plan: Plan | None, opts: BuildOptions, phases: Phases | None = None,
          model: "QuantModel | None" = None) -> BuiltArtifact:
    """Export ``plan`` (None: the FP32 model), build it with the backend, measure it, write the directory.
    ``phases``: each step shown and timed (none: silent). ``model``: the recipe's model already wrapped for the
    plan's scheme (calibrated here if it is not), so that a caller who checked the plan against it does not load
    the checkpoint twice."""
    from .models.loading import load_model
    from .quant.calibration import calibrate_cached, quant_model
    from .timing import MAX_ROUNDS

    phases = phases or Phases(None)
    final = inside(opts.out_root, recipe.name, plan.plan_id if plan is not None else "fp32")
    if plan is None:
        reference = load_model(recipe.model)
    else:
        reference = model if model is not None else quant_model(recipe, plan.scheme, opts.observer, plan.rounding)
        plan.check_blocks(reference.num_blocks)
        calibrate_cached(reference, recipe, track=phases.track)
    with staging_dir(final, say=phases.note) as tmp:
        m = measure(opts.backend, tmp, model=reference, plan=plan, target=opts.target,
                    verify_recipe=recipe if opts.verify else None, eval_recipe=recipe, batches=(opts.batch,),
                    runs=opts.runs, phases=phases)
        info, artifact, latency, accuracy = m.onnx, m.artifact, m.latency[opts.batch], m.accuracy
        manifest = {
            "format": MANIFEST_FORMAT, "tool": "pomq-deploy", "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "recipe": recipe.name, "arch": recipe.model.arch, "recipe_spec": to_plain(recipe),
            "plan": to_plain(plan) if plan is not None else None, "plan_id": plan.plan_id if plan is not None else "fp32",
            "scheme": plan.scheme if plan is not None else None, "observer": opts.observer if plan is not None else None,
            "rounding": plan.rounding if plan is not None else None, "target": info.target,
            "onnx": {"file": info.path.name, "bytes": info.path.stat().st_size, "weight_bytes": info.weight_bytes,
                     "initializer_bytes": info.initializer_bytes, "weights_int8": info.weights_int8,
                     "weights_int4": info.weights_int4, "weights_fp8": info.weights_fp8, "ops": info.ops},
            "artifact": {"file": artifact.path.name, "file_bytes": artifact.path.stat().st_size, "size_bytes": artifact.size_bytes},
            "backend": {"name": artifact.backend, "options": artifact.options},
            "latency": {"batch": latency.batch, "runs": latency.runs, "median_ms": round(latency.median_ms, 4),
                        "p90_ms": round(latency.p90_ms, 4)},
            "accuracy": {"top1": accuracy.top1, "top5": accuracy.top5, "images": accuracy.images},
            "emulated": emulated_settings(plan, artifact.backend),
            "verify": m.verify if m.verify is not None else {"skipped": "--no-verify"},
            "versions": versions(),
        }
        if opts.vs_fp32 and plan is not None:
            with phases("latency / FP32: the FP32 model built and timed interleaved (rounds)", total=MAX_ROUNDS) as step:
                manifest["latency_vs_fp32"] = ratio_to_fp32(opts, recipe, artifact, tmp, on_round=step).as_dict()
        extra = getattr(opts.backend, "manifest_extra", None)  # optional Backend hook, see pomq_deploy.backends
        if extra is not None:
            manifest |= extra(artifact, plan)
        manifest = seal(manifest, tmp)
        typed = parse(Manifest, manifest, str(tmp / MANIFEST), ArtifactError)  # what we write is what a reader accepts
        write_json_atomic(manifest, tmp / MANIFEST)
    return BuiltArtifact(final, typed)
