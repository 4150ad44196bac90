"""Top-1/top-5 accuracy of a classifier over batches of (images, labels)."""

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EvalResult:
    top1: float  # fraction in [0, 1]
    top5: float
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """How many rows have their label among the k highest logits (k capped at the class count)."""
    k = min(k, logits.shape[-1])
    return int((logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1).sum())


@torch.inference_mode()
def evaluate(predict: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> EvalResult:
    """Run ``predict`` (images -> logits) over every batch and count top-1 and top-5 hits."""
    top1 = top5 = n = 0
    start = time.perf_counter()
    for images, labels in batches:
        logits = predict(images)
        labels = labels.to(logits.device)
        top1 += topk_correct(logits, labels, 1)
        top5 += topk_correct(logits, labels, 5)
        n += len(labels)
    seconds = time.perf_counter() - start
    return EvalResult(top1=top1 / n if n else 0.0, top5=top5 / n if n else 0.0, images=n, seconds=seconds)
