"""Export -> backend build -> self-check -> top-1 -> latency -> size: the one pipeline every command and tool
measures a plan with (``build``, ``search``, ``bench --onnx``, tools/bench_*.py, tools/accuracy_table.py).

Each step runs only when asked for, so a caller pays for what it reports: the search times at one batch and
checks nothing, ``build`` does everything, the accuracy table only exports and builds.
"""

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .backends import Artifact, Backend, LatencyStats
from .evaluate import EvalResult, evaluate
from .export import ExportInfo
from .plan import Plan
from .progress import Phases
from .recipe import Recipe

Track = Callable[[Iterable, int, str], Iterable]


@dataclass(frozen=True)
class Measured:
    onnx: ExportInfo | None  # None when the ONNX file came from elsewhere (e.g. ORT's own quantizer)
    onnx_path: Path
    artifact: Artifact
    verify: dict | None  # pomq_deploy.verify's record; None: not checked
    accuracy: EvalResult | None
    latency: dict[int, LatencyStats]  # by batch size


def evaluate_artifact(backend: Backend, artifact: Artifact, recipe: Recipe, track: Track | None = None) -> EvalResult:
    """Top-1/top-5 of the built artifact, run by its backend, on the recipe's evaluation split."""
    from .data import eval_dataset, eval_loader
    from .models.loading import data_model

    loader = eval_loader(eval_dataset(recipe.data, data_model(recipe.model)), recipe.eval.batch_size,
                         recipe.eval.limit, recipe.data.workers)
    batches = track(loader, len(loader), f"top-1 through {backend.name} on {len(loader.dataset)} images") if track else loader
    return evaluate(lambda x: torch.from_numpy(backend.run(artifact, x.numpy())), batches)


def self_check_images(recipe: Recipe, reference: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The images the self-check compares on: the recipe's first calibration images and seeded uniform noise
    normalised as the model's inputs are (pomq_deploy.verify's counts)."""
    from timm.data import resolve_data_config

    from .data import calibration_batches
    from .export.onnx_export import input_size
    from .verify import CALIB_IMAGES, NOISE_IMAGES, noise_images

    calib = torch.cat(calibration_batches(recipe.data, reference))[:CALIB_IMAGES]
    cfg = resolve_data_config({}, model=reference)
    return calib, noise_images(NOISE_IMAGES, input_size(getattr(reference, "model", reference)), cfg["mean"], cfg["std"])


def self_check(backend: Backend, artifact: Artifact, reference: nn.Module, recipe: Recipe, onnx_path: Path) -> dict:
    """The artifact against ``reference`` (pomq_deploy.verify) on ``self_check_images``; the manifest's record,
    or a VerifyError naming the worst block (where the backend can run parts of the ONNX model) when it does not
    agree."""
    from .errors import VerifyError
    from .quant.model import QuantModel, exactly, find_blocks
    from .verify import reference_pair, verify, worst_block

    calib, noise = self_check_images(recipe, reference)
    result = verify(lambda x: backend.run(artifact, x), *reference_pair(reference), calib, noise)
    if result.passed:
        return result.to_json()
    run_onnx = getattr(backend, "run_onnx", None)
    unlocated = ""
    if run_onnx is not None:
        import onnx

        images = calib if not result.calibration.ok() else noise
        try:
            blocks = reference.blocks if isinstance(reference, QuantModel) else find_blocks(reference)  # found once, when wrapped
            with exactly(reference):
                worst = worst_block(run_onnx, onnx.load(str(onnx_path)), reference, blocks, images)
            result = dataclasses.replace(result, worst_block=worst)
        except ValueError as e:  # blocks the graph does not delimit as expected: report without them
            unlocated = f" (no per-block comparison: {e})"
    raise VerifyError(f"self-check failed: {backend.name} vs the PyTorch reference {result.failure()}{unlocated}; "
                      "nothing was written (--no-verify builds it anyway)", result.to_json())


def export_model(model: nn.Module, plan: Plan | None, target: str, path: Path) -> ExportInfo:
    """``plan`` on the calibrated QuantModel ``model`` as Q/DQ ONNX in ``target``'s format; with ``plan`` None,
    ``model`` (a float model) as it is."""
    from .export import export_fp32, export_quantized
    from .quant.model import QuantModel

    if plan is None:
        return export_fp32(model, path)
    device = model.device if isinstance(model, QuantModel) else torch.device("cpu")
    if device.type == "cpu":
        return export_quantized(model, plan, target, path)
    model.to_device(torch.device("cpu"))  # the graph is traced on the CPU: its constants and input live there
    try:
        return export_quantized(model, plan, target, path)
    finally:  # back where the reference runs, the plan applied again as the export left it
        from .targets import get_target

        model.to_device(device).apply(plan, get_target(target).act_format)


def measure(backend: Backend, out_dir: Path, *, model: nn.Module | None = None, plan: Plan | None = None,
            target: str = "ort", onnx_path: Path | None = None, verify_recipe: Recipe | None = None,
            eval_recipe: Recipe | None = None, batches: tuple[int, ...] = (), runs: int = 50,
            phases: Phases | None = None) -> Measured:
    """Export ``plan`` on ``model`` (or take the ONNX file ``onnx_path``) into ``out_dir``, build it with
    ``backend``, then as asked: check it against ``model`` on ``verify_recipe``'s calibration images and noise,
    evaluate top-1 on ``eval_recipe``'s split, time it at each of ``batches``. ``phases``: each step shown and
    timed as a phase (none: silent, as inside a search's own phase)."""
    phases = phases or Phases(None)
    info = None
    if onnx_path is None:
        with phases(f"exporting {'the FP32 model' if plan is None else f'plan {plan.plan_id} ({plan.scheme}, target {target})'}"):
            info = export_model(model, plan, target, Path(out_dir) / "model.onnx")  # leaves the plan applied in the target's format
        onnx_path = info.path
    with phases(f"building with {backend.name}"):
        artifact = backend.build(onnx_path, Path(out_dir))
    check = None
    if verify_recipe is not None:
        with phases("self-check against the PyTorch reference (calibration and noise images)"):
            check = self_check(backend, artifact, model, verify_recipe, onnx_path)
    accuracy = evaluate_artifact(backend, artifact, eval_recipe, phases.track) if eval_recipe is not None else None
    latency = {}
    for batch in batches:
        with phases(f"timing batch {batch}: {runs} runs after warm-up"):
            latency[batch] = backend.latency(artifact, batch, runs)
    return Measured(info, onnx_path, artifact, check, accuracy, latency)


def graph_signature(path: Path) -> str:
    """A hash of what decides the kernels ONNX Runtime or TensorRT pick: ops, wiring, initializer types/shapes
    (constant values left out): two plans whose graphs differ only in scales run the same kernels (the search
    caches latency ratios by it)."""
    import hashlib

    import onnx

    from .onnx_graph import constant_value

    model = onnx.load(str(path))
    h = hashlib.sha256()
    for n in model.graph.node:
        if n.op_type == "Constant":
            t = constant_value(n)
            h.update((f"C{n.output[0]}:{t.data_type}:{list(t.dims)};" if t is not None else f"C{n.output[0]}:?;").encode())
            continue
        attrs = sorted((a.name, str(onnx.helper.get_attribute_value(a))) for a in n.attribute)
        h.update(f"{n.op_type}{list(n.input)}{list(n.output)}{attrs};".encode())
    for t in model.graph.initializer:
        h.update(f"I{t.name}:{t.data_type}:{list(t.dims)};".encode())
    return h.hexdigest()[:16]
