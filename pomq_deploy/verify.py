"""The build's self-check: does the built artifact compute what the PyTorch reference computes?

Both run on a fixed image set: the first calibration images of the recipe (real inputs) and seeded
uniform-noise images (every pixel value equally likely, so activations reach the ends of their ranges,
where a saturating integer kernel shows). Agreement is the share of images with the same top-1 class
and the cosine of the logits; below the thresholds the build fails, naming the block whose output
differs most when every block is fed the reference's own input (so one block's error is not blamed on
the blocks after it).
"""

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

CALIB_IMAGES = 64
NOISE_IMAGES = 64
# Loose enough for the last-bit float differences a correct build shows (a flipped 4-bit code spreads: up
# to 2 of 64 images change class on the paper plans), tight enough for a saturating GEMM on 4-bit plans.
MIN_TOP1 = 0.95  # share of images whose top-1 class agrees
MIN_COSINE = 0.995  # cosine of the logits (all images' logits as one vector)


@dataclass(frozen=True)
class Agreement:
    images: int
    top1: float  # share of images with the same top-1 class
    cosine: float  # cosine of the logits, all images' as one vector
    cosine_min: float  # the lowest per-image cosine

    def ok(self) -> bool:
        return self.top1 >= MIN_TOP1 and self.cosine >= MIN_COSINE

    def describe(self) -> str:
        return f"top-1 agreement {self.top1:.4f}, logits cosine {self.cosine:.5f} (lowest image {self.cosine_min:.4f})"


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two arrays taken as one vector each, in float64."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def agreement(reference: np.ndarray, output: np.ndarray) -> Agreement:
    """How closely ``output`` logits (images x classes) follow ``reference``."""
    ref, out = np.asarray(reference, np.float64), np.asarray(output, np.float64)
    lowest = min(cosine(r, o) for r, o in zip(ref, out, strict=True))
    return Agreement(len(ref), float((ref.argmax(1) == out.argmax(1)).mean()), cosine(ref, out), lowest)


def noise_images(count: int, shape: tuple[int, ...], mean: tuple[float, ...], std: tuple[float, ...], seed: int = 0) -> torch.Tensor:
    """``count`` images of uniform pixel noise in [0, 1], normalised like the model's real inputs."""
    pixels = torch.rand(count, *shape, generator=torch.Generator().manual_seed(seed))
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (pixels - m) / s


@dataclass(frozen=True)
class BlockDiff:
    block: int
    tensor: str  # the ONNX tensor holding the block's output
    cosine: float  # of the block's output, ORT vs the reference, given the reference's block input
    max_abs: float


@dataclass(frozen=True)
class Verification:
    calibration: Agreement
    noise: Agreement
    worst_block: BlockDiff | None = None  # only looked for when the check fails

    @property
    def passed(self) -> bool:
        return self.calibration.ok() and self.noise.ok()

    def to_json(self) -> dict:
        """The manifest's record (of a passed check: a failed one stops the build)."""
        return {"passed": self.passed, "thresholds": {"top1": MIN_TOP1, "cosine": MIN_COSINE},
                "calibration": asdict(self.calibration), "noise": asdict(self.noise)}

    def failure(self) -> str:
        """The one line a failed check reports."""
        which = "calibration" if not self.calibration.ok() else "noise"
        got = self.calibration if which == "calibration" else self.noise
        line = (f"on {got.images} {which} images {got.describe()}; need top-1 agreement >= {MIN_TOP1} and cosine "
                f">= {MIN_COSINE}")
        if self.worst_block is not None:
            b = self.worst_block
            line += f"; worst block {b.block} ({b.tensor}): output cosine {b.cosine:.5f}, max error {b.max_abs:.4g}"
        return line


def verify(run: Callable[[np.ndarray], np.ndarray], reference: nn.Module, calibration: torch.Tensor,
           noise: torch.Tensor) -> Verification:
    """Agreement of ``run`` (images -> logits, the built artifact) with ``reference`` on both image sets."""
    with torch.inference_mode():
        results = [agreement(reference(x).numpy(), run(x.numpy())) for x in (calibration, noise)]
    return Verification(*results)


def block_scopes(model: nn.Module, blocks: list[nn.Module]) -> list[tuple[str, ...]]:
    """Each block's module path as the ONNX exporter's scope segments: ``model.layers.0.blocks.1`` ->
    ``('model', 'layers.0', 'blocks.1')`` (a node of it is named ``/model/layers/layers.0/blocks/blocks.1/...``)."""
    names = {id(m): name for name, m in model.named_modules()}
    scopes = []
    for block in blocks:
        parts: list[str] = []
        for part in names[id(block)].split("."):
            if part.isdigit() and parts:
                parts[-1] = f"{parts[-1]}.{part}"
            else:
                parts.append(part)
        scopes.append(tuple(parts))
    return scopes


def _in_scope(node_name: str, scope: tuple[str, ...]) -> bool:
    segments = iter(node_name.split("/"))
    return all(any(seg == part for seg in segments) for part in scope)


def _scope_nodes(model, scope: tuple[str, ...]) -> list:
    return [n for n in model.graph.node if _in_scope(n.name, scope)]


def scope_output(model, scope: tuple[str, ...]) -> str | None:
    """The tensor a module's scope ends with in an exported graph (its last node's output; the exporter writes
    nodes in execution order), or None where no node carries the scope."""
    nodes = _scope_nodes(model, scope)
    return nodes[-1].output[0] if nodes else None


def block_boundaries(model, scopes: list[tuple[str, ...]]) -> list[tuple[str, str]]:
    """(input tensor, output tensor) of each block in an exported graph: the output is the last node of the
    block's scope; the input is the one tensor its nodes read from outside it that is not a constant."""
    constant = {i.name for i in model.graph.initializer}
    for n in model.graph.node:  # Constant nodes, and what is computed from constants only (the exporter's Identity
        if all(i in constant for i in n.input if i):  # nodes for initializers of equal value, e.g. zero biases)
            constant.update(n.output)
    out = []
    for scope in scopes:
        nodes = _scope_nodes(model, scope)
        if not nodes:
            raise ValueError(f"no node of block {'.'.join(scope)} in the exported graph")
        made = {o for n in nodes for o in n.output}
        inputs = sorted({i for n in nodes for i in n.input if i and i not in made and i not in constant})
        if len(inputs) != 1:
            raise ValueError(f"block {'.'.join(scope)} reads {len(inputs)} tensors from outside it: {inputs[:4]}")
        out.append((inputs[0], nodes[-1].output[0]))
    return out


def worst_block(run_onnx: Callable, model, qmodel: nn.Module, blocks: list[nn.Module], images: torch.Tensor) -> BlockDiff:
    """The block whose output differs most from the reference's when both get the reference's block input."""
    return min(block_diffs(run_onnx, model, qmodel, blocks, images), key=lambda d: d.cosine)


def block_diffs(run_onnx: Callable, model, qmodel: nn.Module, blocks: list[nn.Module], images: torch.Tensor) -> list[BlockDiff]:
    """Each block's output against the reference's when both get the reference's block input.

    ``run_onnx(model, feeds) -> outputs`` runs an ONNX model the way the backend does. Each block is cut
    out of ``model`` (onnx.utils.Extractor) and fed the input the PyTorch reference gave that block."""
    from onnx.shape_inference import infer_shapes
    from onnx.utils import Extractor

    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [b.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, (args[0], out))) for i, b in enumerate(blocks)]
    try:
        with torch.inference_mode():
            qmodel(images)
    finally:
        for h in hooks:
            h.remove()
    extractor = Extractor(infer_shapes(model))  # it cuts along typed tensors
    diffs = []
    for i, (x, y) in enumerate(block_boundaries(model, block_scopes(qmodel, blocks))):
        got = run_onnx(extractor.extract_model([x], [y]), {x: seen[i][0].numpy()})[0]
        ref = seen[i][1].numpy().astype(np.float64)
        diffs.append(BlockDiff(i, y, cosine(ref, got), float(np.abs(ref - got).max())))
    return diffs
