"""Options several subcommands share, each mapped onto one recipe field."""

import argparse
import dataclasses
from pathlib import Path

from ..recipe import Recipe, load_recipe


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data (override the recipe)")
    g.add_argument("--recipe", metavar="R", help="recipe YAML path or name in recipes/ (default: deit_fmnist, the embedded reference model)")
    g.add_argument("--checkpoint", metavar="FILE", type=Path, help="model weights (.safetensors or .pth); sets model.checkpoint")
    g.add_argument("--data", metavar="DIR", type=Path,
                   help="evaluation data: the Fashion-MNIST IDX folder, or an ImageNet-style <class>/<image> folder; sets data.root")


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--limit", metavar="N", type=positive_int, help="evaluate only the first N images; sets eval.limit")
    g.add_argument("--batch-size", metavar="B", type=positive_int, help="images per batch; sets eval.batch_size")


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The recipe named by --recipe with the command line's overrides applied."""
    recipe = load_recipe(args.recipe)
    if args.checkpoint is not None:
        recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, checkpoint=str(args.checkpoint)))
    if args.data is not None:
        recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, root=str(args.data)))
    limit, batch = getattr(args, "limit", None), getattr(args, "batch_size", None)
    if limit is not None or batch is not None:
        ev = recipe.eval
        recipe = dataclasses.replace(recipe, eval=dataclasses.replace(
            ev, limit=limit if limit is not None else ev.limit, batch_size=batch or ev.batch_size))
    return recipe
