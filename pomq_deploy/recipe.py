"""Recipes: one YAML per model saying which weights, which data and which defaults to use.

Relative paths inside a recipe are relative to the recipe file, so the committed recipes work from any
working directory. ``--recipe`` takes a path or the bare name of a recipe in the repository's recipes/.
"""

import dataclasses
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt
from pydantic.dataclasses import dataclass

from ._schema import STRICT, Name, PathText, parse, read_yaml
from .errors import RecipeError
from .quant.roundings import DEFAULT_ROUNDING, RoundingName
from .quant.schemes import DEFAULT_SCHEME, SchemeName

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
DEFAULT_RECIPE = "deit_fmnist"


@dataclass(frozen=True, config=STRICT)
class DataConfig:
    """Overrides of timm's data config for the model: its input shape and eval transform."""

    input_size: tuple[PositiveInt, PositiveInt, PositiveInt] | None = None  # (C, H, W)
    mean: tuple[float, ...] | None = None  # one value per input channel
    std: tuple[PositiveFloat, ...] | None = None
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = None
    crop_pct: Annotated[float, Field(gt=0, le=1)] | None = None


@dataclass(frozen=True, config=STRICT)
class ModelSpec:
    arch: str  # a timm model name, e.g. deit_tiny_patch16_224 (deit_fmnist is registered by pomq_deploy)
    checkpoint: PathText | None = None  # .safetensors or .pth state dict in timm's key format
    # keyword arguments of timm.create_model for a fine-tuned model: num_classes, img_size, in_chans, patch_size, ...
    kwargs: dict[str, Any] = Field(default_factory=dict)
    data: DataConfig = DataConfig()


@dataclass(frozen=True, config=STRICT)
class DataSpec:
    kind: Literal["fashion_mnist", "image_folder"]
    # fashion_mnist: the folder holding the four IDX files; image_folder: the evaluation folder (<class>/<image>).
    root: PathText | None = None
    # image_folder only: the folder calibration images come from (ImageNet's train/); default: root.
    calib_root: PathText | None = None
    calib_images: PositiveInt = 1000  # FQ-ViT: 10 batches x 100 shuffled training images
    calib_batch: PositiveInt = 100
    seed: int = 0
    workers: NonNegativeInt = 0  # DataLoader worker processes for decoding image folders


@dataclass(frozen=True, config=STRICT)
class EvalSpec:
    batch_size: PositiveInt = 100
    limit: PositiveInt | None = None  # evaluate only the first N images


@dataclass(frozen=True, config=STRICT)
class FitSpec:
    """The block reconstruction's settings (``--rounding adaround`` / ``qdrop``, quant.reconstruction): per block
    setting, ``iterations`` Adam steps on minibatches of ``batch`` calibration images, at ``lr`` on the roundings
    and ``act_lr`` on the 4-bit activations' log step sizes (LSQ; 0 keeps the calibrated steps)."""

    # Many small steps: within a block setting's seconds on 2 CPU cores, the number of Adam steps limits the fit,
    # not the images per step (docs/roundings.md: 1000 x 4 images at 0.1 left about 40% of 200 x 32 at 0.01's block
    # output error at 4/8/8 and 53-69% at 4/4/4, on held-out calibration images, in 1.2-1.5x its time)
    iterations: PositiveInt = 1000
    batch: PositiveInt = 4
    lr: PositiveFloat = 0.1  # AdaRound's 1e-3 is for 20,000 iterations: a rounding's V must reach about +-2.4
    act_lr: float = Field(default=1e-3, ge=0.0)  # 1e-2 and 0 measured worse at 4/4/4 (docs/roundings.md)
    weight: PositiveFloat = 0.01  # the rounding regulariser's weight (AdaRound's lambda)
    drop: float = Field(default=0.5, ge=0.0, lt=1.0)  # qdrop: the probability an activation element stays float
    # what each block setting is fitted on: its inputs with the blocks before it at the same setting, or FP32's
    context: Literal["uniform", "fp32"] = "uniform"
    seed: int = 0


@dataclass(frozen=True, config=STRICT)
class SearchSpec:
    """Defaults of ``pomq-deploy search`` (PoMQ-ViT's NSGA-II), each overridable on the command line."""

    mode: Literal["model", "measured"] = "model"  # model-guided (design set + models + predicted front) or all measured
    builds: PositiveInt = 20  # model mode: real builds at most, the two baselines included
    sensitivity_images: PositiveInt = 32  # model mode: images of the per-gene KL sensitivity runs (PyTorch, no build)
    algorithm: Literal["nsga2", "random"] = "nsga2"
    population: PositiveInt = 12
    generations: PositiveInt = 6
    trials: PositiveInt | None = None  # random search: plans to evaluate (default population x generations)
    seed: int = 0
    scheme: SchemeName = DEFAULT_SCHEME
    rounding: RoundingName = DEFAULT_ROUNDING  # how the search's plans round their weights (quant.roundings)
    eval_images: PositiveInt = 1000  # top-1 objective on the first N evaluation images; the front gets the full set
    batch: PositiveInt = 8  # latency batch size
    latency_runs: PositiveInt = 5  # timed runs per artifact in each interleaved round (pomq_deploy.timing)


@dataclass(frozen=True, config=STRICT)
class Recipe:
    name: Name  # names the engines/ folder, the calibration cache file and the default study
    model: ModelSpec
    data: DataSpec
    eval: EvalSpec = EvalSpec()
    search: SearchSpec = SearchSpec()
    fit: FitSpec = FitSpec()


def find_recipe(spec: str | None) -> Path:
    """A recipe path from a path or a bare recipe name (default: the embedded reference recipe)."""
    spec = spec or DEFAULT_RECIPE
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    named = RECIPES_DIR / f"{spec}.yaml"
    if path.suffix == "" and "/" not in spec and named.is_file():
        return named
    known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    raise RecipeError(f"{spec}: no such recipe file or recipe name; recipes in {RECIPES_DIR}: {known}")


def _resolve(base: Path, value: str | None) -> str | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def load_recipe(spec: str | None = None) -> Recipe:
    """Load and validate a recipe; its relative paths come back resolved against the recipe's folder."""
    path = find_recipe(spec)
    recipe = parse(Recipe, read_yaml(path, RecipeError), str(path), RecipeError)
    import timm  # lazily: `--help` must not pay for it

    from . import models  # noqa: F401  (registers deit_fmnist with timm)

    if not timm.is_model(recipe.model.arch):
        raise RecipeError(f"{path}: model.arch '{recipe.model.arch}' is not a timm model name "
                          f"(see timm.list_models(), e.g. deit_tiny_patch16_224)")
    from .models.loading import data_model

    data_model(recipe.model, str(path))  # model.kwargs and model.data checked now, without weights
    base = path.resolve().parent
    model = dataclasses.replace(recipe.model, checkpoint=_resolve(base, recipe.model.checkpoint))
    data = dataclasses.replace(recipe.data, root=_resolve(base, recipe.data.root),
                               calib_root=_resolve(base, recipe.data.calib_root))
    return dataclasses.replace(recipe, model=model, data=data)
