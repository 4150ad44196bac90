"""Plan -> Q/DQ ONNX -> backend artifact -> measured manifest: what ``pomq-deploy build`` does."""

import datetime
import platform
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__
from ._schema import to_plain
from .artifact import MANIFEST, MANIFEST_FORMAT, BuiltArtifact, seal, staging_dir, write_json_atomic
from .backends import Artifact, Backend
from .evaluate import EvalResult, evaluate
from .plan import Plan
from .recipe import Recipe

Track = Callable[[Iterable, int, str], Iterable]


@dataclass(frozen=True)
class BuildOptions:
    backend: Backend
    target: str  # export target: "ort" or "tensorrt"
    out_root: Path = Path("engines")
    batch: int = 8  # latency batch size
    runs: int = 50
    observer: str = "minmax"
    verify: bool = True  # the self-check against the PyTorch reference (pomq_deploy.verify)


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
    w4 = [i for i, b in enumerate(plan.blocks) if b.w == 4]
    if w4 and backend == "ort-cpu":
        notes.append(f"{backend}: 4-bit weights (w=4, blocks {w4}) are stored as INT4 in model.onnx but run on ONNX "
                     "Runtime's INT8 kernels (same codes; it has no int4 x uint8 GEMM on the CPU)")
    a4 = [i for i, b in enumerate(plan.blocks) if b.a == 4]
    if a4:
        notes.append(f"{backend}: 4-bit activations (a=4, blocks {a4}) run as 8-bit Q/DQ clipped to 16 levels: "
                     "the accuracy effect is real, the kernels are INT8")
    lis = [i for i, b in enumerate(plan.blocks) if b.attn == 4 and plan.scheme == "fqvit"]
    if lis:
        notes.append(f"{backend}: LIS log2 attention (attn=4, blocks {lis}) runs as float log-domain ops")
    attn4 = [i for i, b in enumerate(plan.blocks) if b.attn == 4 and plan.scheme != "fqvit"]
    if attn4:
        notes.append(f"{backend}: 4-bit attention (attn=4, blocks {attn4}) runs as 8-bit Q/DQ clipped to 16 levels")
    return notes


def evaluate_artifact(backend: Backend, artifact: Artifact, recipe: Recipe, track: Track | None = None) -> EvalResult:
    """Top-1/top-5 of the built artifact, run by its backend, on the recipe's evaluation split."""
    from .data import eval_dataset, eval_loader
    from .models.loading import data_model

    loader = eval_loader(eval_dataset(recipe.data, data_model(recipe.model.arch)), recipe.eval.batch_size,
                         recipe.eval.limit, recipe.data.workers)
    batches = track(loader, len(loader), f"eval {artifact.path.parent.name}") if track else loader
    return evaluate(lambda x: torch.from_numpy(backend.run(artifact, x.numpy())), batches)


def self_check(backend: Backend, artifact: Artifact, reference: torch.nn.Module, recipe: Recipe, onnx_path: Path) -> dict:
    """The artifact against ``reference`` (pomq_deploy.verify) on the recipe's first calibration images and
    seeded noise; the manifest's record, or a VerifyError naming the worst block (where the backend can run
    parts of the ONNX model) when it does not agree."""
    from timm.data import resolve_data_config

    from .data import calibration_batches
    from .errors import VerifyError
    from .export.onnx_export import input_size
    from .quant.model import find_blocks
    from .verify import CALIB_IMAGES, NOISE_IMAGES, noise_images, verify, worst_block

    calib = torch.cat(calibration_batches(recipe.data, reference))[:CALIB_IMAGES]
    cfg = resolve_data_config({}, model=reference)
    noise = noise_images(NOISE_IMAGES, input_size(getattr(reference, "model", reference)), cfg["mean"], cfg["std"])
    result = verify(lambda x: backend.run(artifact, x), reference, calib, noise)
    if result.passed:
        return result.to_json()
    run_onnx = getattr(backend, "run_onnx", None)
    unlocated = ""
    if run_onnx is not None:
        import dataclasses

        import onnx

        images = calib if not result.calibration.ok() else noise
        try:
            worst = worst_block(run_onnx, onnx.load(str(onnx_path)), reference, find_blocks(reference), images)
            result = dataclasses.replace(result, worst_block=worst)
        except ValueError as e:  # blocks the graph does not delimit as expected: report without them
            unlocated = f" (no per-block comparison: {e})"
    raise VerifyError(f"self-check failed: {backend.name} vs the PyTorch reference {result.failure()}{unlocated}; "
                      "nothing was written (--no-verify builds it anyway)")


def build(recipe: Recipe, plan: Plan | None, opts: BuildOptions, track: Track | None = None,
          status: Callable[[str], None] = lambda _: None) -> BuiltArtifact:
    """Export ``plan`` (None: the FP32 model), build it with the backend, measure it, write the directory."""
    from .export import export_fp32, export_quantized
    from .models.loading import create_model
    from .quant.calibration import calibrate_cached, quant_model

    final = opts.out_root / recipe.name / (plan.plan_id if plan is not None else "fp32")
    with staging_dir(final) as tmp:
        onnx_path = tmp / "model.onnx"
        if plan is None:
            status("exporting the FP32 model")
            reference = create_model(recipe.model.arch, recipe.model.checkpoint)
            info = export_fp32(reference, onnx_path)
        else:
            reference = quant_model(recipe, plan.scheme, opts.observer)
            plan.check_blocks(reference.num_blocks)
            calibrate_cached(reference, recipe, track=track)
            status(f"exporting plan {plan.plan_id} ({plan.scheme}, target {opts.target})")
            info = export_quantized(reference, plan, opts.target, onnx_path)  # leaves the plan applied in the target's format
        status(f"building with {opts.backend.name}")
        artifact = opts.backend.build(onnx_path, tmp)
        check = {"skipped": "--no-verify"}
        if opts.verify:
            status("checking the artifact against the PyTorch reference")
            check = self_check(opts.backend, artifact, reference, recipe, onnx_path)
        accuracy = evaluate_artifact(opts.backend, artifact, recipe, track)
        status(f"timing batch {opts.batch} x {opts.runs} runs")
        latency = opts.backend.latency(artifact, opts.batch, opts.runs)
        manifest = {
            "format": MANIFEST_FORMAT, "tool": "pomq-deploy", "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "recipe": recipe.name, "arch": recipe.model.arch, "recipe_spec": to_plain(recipe),
            "plan": to_plain(plan) if plan is not None else None, "plan_id": plan.plan_id if plan is not None else "fp32",
            "scheme": plan.scheme if plan is not None else None, "observer": opts.observer if plan is not None else None,
            "target": info.target,
            "onnx": {"file": onnx_path.name, "bytes": onnx_path.stat().st_size, "weight_bytes": info.weight_bytes,
                     "initializer_bytes": info.initializer_bytes, "weights_int8": info.weights_int8,
                     "weights_int4": info.weights_int4, "ops": info.ops},
            "artifact": {"file": artifact.path.name, "file_bytes": artifact.path.stat().st_size, "size_bytes": artifact.size_bytes},
            "backend": {"name": artifact.backend, "options": artifact.options},
            "latency": {"batch": latency.batch, "runs": latency.runs, "median_ms": round(latency.median_ms, 4),
                        "p90_ms": round(latency.p90_ms, 4)},
            "accuracy": {"top1": accuracy.top1, "top5": accuracy.top5, "images": accuracy.images},
            "emulated": emulated_settings(plan, artifact.backend),
            "verify": check,
            "versions": versions(),
        }
        extra = getattr(opts.backend, "manifest_extra", None)  # optional Backend hook, see pomq_deploy.backends
        if extra is not None:
            manifest |= extra(artifact, plan)
        manifest = seal(manifest, tmp)
        write_json_atomic(manifest, tmp / MANIFEST)
    return BuiltArtifact(final, manifest)
