"""Where the PyTorch side runs (``--device``): calibration, the fake-quant reference, sensitivities and fitting.

``auto`` takes the first CUDA device when PyTorch sees one and the CPU otherwise; ``cuda`` without one is an
input error. On CUDA the work is made as deterministic as CUDA allows: deterministic algorithms where PyTorch
has them (warning where it has none), cuBLAS's fixed workspace, no TF32 (a float32 GEMM or convolution in
TF32 keeps 10 mantissa bits: float noise far above the last-bit differences docs/accuracy.md measures), no
cuDNN autotuning. What stays non-deterministic on CUDA: the summation order inside cuBLAS's float GEMMs may
differ from the CPU's (results differ in the last bits between devices, not between runs); the exact path's
integer GEMMs are exact on both.
"""

import os
from typing import TYPE_CHECKING

from .errors import PomqError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")  # --help reads this: the module imports torch only when a device is resolved


def resolve_device(text: str = "auto") -> "torch.device":
    """``auto`` | ``cpu`` | ``cuda`` (or ``cuda:N``) as a torch device, set up for deterministic work."""
    import torch

    if text not in DEVICES and not text.startswith("cuda:"):
        raise PomqError(f"--device {text}: allowed: {', '.join(DEVICES)} (or cuda:N)")
    if text == "cpu" or (text == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise PomqError(f"--device {text}: PyTorch sees no CUDA device here (torch {torch.__version__}, "
                        f"CUDA build {torch.version.cuda or 'none'}); use --device cpu or auto")
    device = torch.device("cuda" if text == "auto" else text)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise PomqError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) here")
    deterministic_cuda()
    return device


def deterministic_cuda() -> None:
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before the first GEMM
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False


def to_cpu(tree):
    """``tree`` (nested dicts, lists and tuples of tensors) with every tensor on the CPU: what a cache file holds,
    so that it loads on a machine without the device it was made on."""
    import torch

    if isinstance(tree, torch.Tensor):
        return tree.cpu()
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_cpu(v) for v in tree)
    return tree
