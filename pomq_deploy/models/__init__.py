"""Models: timm models by name (importing this registers the reference model with timm)."""

from . import reference  # noqa: F401  (registers deit_fmnist)
