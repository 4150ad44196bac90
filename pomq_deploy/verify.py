"""The build's self-check: does the built artifact compute what the PyTorch reference computes?

Both run on a fixed image set: the first calibration images of the recipe (real inputs) and seeded
uniform-noise images (every pixel value equally likely, so activations reach the ends of their ranges,
where a saturating integer kernel shows). Agreement is the share of images with the same top-1 class
and the cosine of the logits; below the thresholds the build fails, naming the block whose output
differs most when every block is fed the reference's own input (so one block's error is not blamed on
the blocks after it).

Top-1 is judged on numbers, not ties. Two correct float computations of one plan differ: the last bits of a
sum move a value across a rounding boundary, and the flipped code moves the logits (at 4-bit activations,
visibly). The reference measures that *float noise* on the same images as the largest logit difference
between two computations of its own (the exact and the fast path of the fake-quant model; a float model
against its float64 copy): ``noise``. An image whose top-1 margin (best logit minus second best) is below
``2 * noise`` may change class between two correct computations (each logit can move by ``noise``), so
top-1 agreement is counted on the other images only. Random or barely trained models, and real 1000-class
models on noise images, give near-tied logits: a correct artifact is no longer refused for them, while one
that miscomputes moves logits by far more than the noise and changes the class of images with clear margins.
"""

import copy
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
    top1: float  # share of the judged images with the same top-1 class (1.0 when none is judged)
    cosine: float  # cosine of the logits, all images' as one vector
    cosine_min: float  # the lowest per-image cosine
    judged: int  # images whose reference top-1 margin is above twice the float noise: those top-1 is counted on
    noise: float  # the float noise: the largest logit difference between two correct computations of the reference

    def ok(self) -> bool:
        return self.top1 >= MIN_TOP1 and self.cosine >= MIN_COSINE

    def describe(self) -> str:
        return (f"top-1 agreement {self.top1:.4f} on the {self.judged} of {self.images} images whose margin exceeds "
                f"twice the float noise {self.noise:.3g}, logits cosine {self.cosine:.5f} (lowest image {self.cosine_min:.4f})")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two arrays taken as one vector each, in float64."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def float_noise(reference: np.ndarray, second: np.ndarray) -> float:
    """The largest logit difference between two correct computations of the same model on the same images."""
    return float(np.abs(np.asarray(reference, np.float64) - np.asarray(second, np.float64)).max(initial=0.0))


def margins(logits: np.ndarray) -> np.ndarray:
    """Per image, the best logit minus the second best (0 for a single class)."""
    top = np.sort(np.asarray(logits, np.float64), axis=1)[:, -2:]
    return top[:, -1] - top[:, 0] if top.shape[1] == 2 else np.zeros(len(top))


def agreement(reference: np.ndarray, output: np.ndarray, noise: float = 0.0) -> Agreement:
    """How closely ``output`` logits (images x classes) follow ``reference``: top-1 counted on the images whose
    reference margin exceeds ``2 * noise`` (``float_noise``; 0: every image), cosine on all of them."""
    ref, out = np.asarray(reference, np.float64), np.asarray(output, np.float64)
    lowest = min(cosine(r, o) for r, o in zip(ref, out, strict=True))
    judged = margins(ref) > 2 * noise
    same = ref.argmax(1) == out.argmax(1)
    top1 = float(same[judged].mean()) if judged.any() else 1.0
    return Agreement(len(ref), top1, cosine(ref, out), lowest, int(judged.sum()), noise)


def noise_images(count: int, shape: tuple[int, ...], mean: tuple[float, ...], std: tuple[float, ...], seed: int = 0) -> torch.Tensor:
    """``count`` images of uniform pixel noise in [0, 1], normalised like the model's real inputs."""
    pixels = torch.rand(count, *shape, generator=torch.Generator().manual_seed(seed))
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (pixels - m) / s


def reference_pair(model: nn.Module) -> tuple[Callable, Callable]:
    """(the reference, a second correct computation of it) for ``verify``: a fake-quant model's exact path and its
    fast path (integer against float GEMMs on the same codes), or a float model and its float64 copy."""
    from .quant.model import QuantModel

    if isinstance(model, QuantModel):
        def exact(x: torch.Tensor) -> torch.Tensor:
            with model.exact_path():
                return model(x)

        return exact, model
    model64 = copy.deepcopy(model).double()
    return model, lambda x: model64(x.double())


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
        """The manifest's record (of a passed check: a failed one stops the build, its record in the VerifyError)."""
        return {"passed": self.passed, "thresholds": {"top1": MIN_TOP1, "cosine": MIN_COSINE, "margin": "2 x noise"},
                "calibration": asdict(self.calibration), "noise": asdict(self.noise)} | \
            ({"worst_block": asdict(self.worst_block)} if self.worst_block is not None else {})

    def failure(self) -> str:
        """The one line a failed check reports."""
        which = "calibration" if not self.calibration.ok() else "noise"
        got = self.calibration if which == "calibration" else self.noise
        line = (f"on {got.images} {which} images {got.describe()}; need top-1 agreement >= {MIN_TOP1} on those and "
                f"cosine >= {MIN_COSINE}")
        if self.worst_block is not None:
            b = self.worst_block
            line += f"; worst block {b.block} ({b.tensor}): output cosine {b.cosine:.5f}, max error {b.max_abs:.4g}"
        return line


def verify(run: Callable[[np.ndarray], np.ndarray], reference: Callable[[torch.Tensor], torch.Tensor],
           second: Callable[[torch.Tensor], torch.Tensor], calibration: torch.Tensor, noise: torch.Tensor) -> Verification:
    """Agreement of ``run`` (images -> logits, the built artifact) with ``reference`` on both image sets, top-1
    judged above the float noise between ``reference`` and ``second`` (another correct computation of it)."""
    results = []
    with torch.inference_mode():
        for x in (calibration, noise):
            ref = reference(x).float().cpu().numpy()
            results.append(agreement(ref, run(x.cpu().numpy()), float_noise(ref, second(x).float().cpu().numpy())))
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
        got = run_onnx(extractor.extract_model([x], [y]), {x: seen[i][0].cpu().numpy()})[0]
        ref = seen[i][1].cpu().numpy().astype(np.float64)
        diffs.append(BlockDiff(i, y, cosine(ref, got), float(np.abs(ref - got).max())))
    return diffs
