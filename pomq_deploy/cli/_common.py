"""Options several subcommands share, each mapped onto one recipe field."""

import argparse
import dataclasses
from pathlib import Path

from ..backends.args import positive_int
from ..errors import RecipeError
from ..recipe import Recipe, load_recipe

__all__ = ["positive_int"]  # shared by the subcommands with the backends' options


def output_folder(text: str) -> Path:
    """An --out that names a folder (made when missing): refused at once, before any work, when it is a file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    return path


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data (override the recipe)")
    g.add_argument("--recipe", metavar="R", help="recipe YAML path or name in recipes/ (default: deit_fmnist, the embedded reference model)")
    g.add_argument("--checkpoint", metavar="FILE", type=Path, help="model weights (.safetensors or .pth); sets model.checkpoint")
    g.add_argument("--data", metavar="DIR", type=Path,
                   help="evaluation data: the Fashion-MNIST IDX folder, or an ImageNet-style <class>/<image> folder; sets data.root")
    g.add_argument("--num-classes", metavar="N", type=positive_int, help="classes of a fine-tuned model; sets model.kwargs.num_classes")
    g.add_argument("--img-size", metavar="PX", type=positive_int,
                   help="input size the model was trained at (e.g. 384); sets model.kwargs.img_size, and the data config follows")


def add_device_argument(p: argparse.ArgumentParser) -> None:
    from ..device import DEVICES

    p.add_argument("--device", default="auto", metavar="D", help=f"where PyTorch calibrates, fits and runs the fake-quant "
                   f"reference: {', '.join(DEVICES)} or cuda:N (default auto: the first CUDA GPU PyTorch sees, else the CPU)")


def device_of(args: argparse.Namespace):
    from ..device import resolve_device

    return resolve_device(getattr(args, "device", "auto"))


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--limit", metavar="N", type=positive_int, help="evaluate only the first N images; sets eval.limit")
    g.add_argument("--batch-size", metavar="B", type=positive_int, help="images per batch; sets eval.batch_size")


def recipe_from_args(args: argparse.Namespace, recipe: Recipe | None = None) -> Recipe:
    """The recipe named by --recipe (else ``recipe``) with the command line's overrides applied."""
    recipe = load_recipe(args.recipe) if args.recipe is not None or recipe is None else recipe
    if args.checkpoint is not None:
        recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, checkpoint=str(args.checkpoint)))
    if args.data is not None:
        recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, root=str(args.data)))
    kwargs = {k: v for k, v in (("num_classes", getattr(args, "num_classes", None)), ("img_size", getattr(args, "img_size", None)))
              if v is not None}
    if kwargs:
        from ..models.loading import data_model

        recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, kwargs={**recipe.model.kwargs, **kwargs}))
        data_model(recipe.model, "command line")  # checked now, as a recipe's are when it loads
    limit, batch = getattr(args, "limit", None), getattr(args, "batch_size", None)
    if limit is not None or batch is not None:
        ev = recipe.eval
        recipe = dataclasses.replace(recipe, eval=dataclasses.replace(
            ev, limit=limit if limit is not None else ev.limit, batch_size=batch or ev.batch_size))
    return recipe


def uniform_spec(text: str) -> str:
    from ..plan import parse_uniform

    try:
        parse_uniform(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_scheme_argument(g, default_text: str, default: str | None = None) -> None:
    """``--scheme``, its choices and help read from the scheme registry."""
    from ..quant.schemes import SCHEMES

    g.add_argument("--scheme", choices=SCHEMES, default=default, help=f"quantization scheme (default: {default_text}); "
                   + "; ".join(f"{s.name}: {s.summary}" for s in SCHEMES.values()))


def add_rounding_argument(g, default_text: str, default: str | None = None) -> None:
    """``--rounding``, its choices and help read from the rounding registry."""
    from ..quant.roundings import ROUNDINGS

    g.add_argument("--rounding", choices=ROUNDINGS, default=default, help=f"how weights are put on their grids (default: "
                   f"{default_text}); " + "; ".join(f"{r.name}: {r.summary}" for r in ROUNDINGS.values())
                   + ". A fitted rounding is fitted once per recipe, scheme and observer and cached beside the calibration")


def add_quant_arguments(p: argparse.ArgumentParser, required: bool = False) -> None:
    from ..quant.roundings import DEFAULT_ROUNDING
    from ..quant.schemes import DEFAULT_SCHEME, OBSERVERS
    from ..targets import TARGETS

    g = p.add_argument_group("quantization")
    which = g.add_mutually_exclusive_group(required=required)
    which.add_argument("--plan", metavar="P", type=Path, help="bit-width plan YAML (names its recipe and scheme)")
    which.add_argument("--uniform", metavar="W/A/ATTN", type=uniform_spec,
                       help="the same genes in every block, each of 4, 8, fp8, float: e.g. 8/8/8, 8/8/4, 4/4/4, "
                       "fp8/fp8/fp8, 4/float/float (INT4 weight-only), float/float/float")
    add_scheme_argument(g, f"the plan's, else {DEFAULT_SCHEME}")
    add_rounding_argument(g, f"the plan's, else {DEFAULT_ROUNDING}")
    g.add_argument("--observer", choices=OBSERVERS, default="minmax", help="activation range observer (default: minmax)")
    g.add_argument("--target", choices=TARGETS, help="ONNX export target (default: the backend's); "
                   + "; ".join(f"{t.name}: {t.summary}" for t in TARGETS.values()))


def load_plan_arg(args: argparse.Namespace):
    """The --plan file, if one was given, and the recipe name it implies (--recipe wins)."""
    from ..plan import load_plan

    if getattr(args, "plan", None) is None:
        return None
    plan = load_plan(args.plan)
    if args.recipe is None:
        from ..recipe import find_recipe

        try:
            find_recipe(plan.recipe)
        except RecipeError as e:  # the plan file is what named it
            raise RecipeError(f"{args.plan}: its recipe {e} (or give --recipe)") from None
        args.recipe = plan.recipe
    return plan


def resolve_plan(args: argparse.Namespace, plan, recipe: Recipe, n_blocks: int):
    """The plan to apply: the --plan file (with --scheme and --rounding overriding its own) or the --uniform widths."""
    from ..plan import uniform_plan

    scheme, rounding = scheme_of(args, plan), rounding_of(args, plan)
    if plan is None:
        return uniform_plan(args.uniform, n_blocks, recipe.name, scheme, rounding)
    plan = dataclasses.replace(plan, scheme=scheme, recipe=recipe.name, rounding=rounding)
    plan.check_blocks(n_blocks, str(args.plan))
    return plan


def scheme_of(args: argparse.Namespace, plan) -> str:
    from ..quant.schemes import DEFAULT_SCHEME

    return args.scheme or (plan.scheme if plan is not None else DEFAULT_SCHEME)


def rounding_of(args: argparse.Namespace, plan) -> str:
    from ..quant.roundings import DEFAULT_ROUNDING

    return getattr(args, "rounding", None) or (plan.rounding if plan is not None else DEFAULT_ROUNDING)


def calib_track(items, total, description):
    from ._console import progress_iter

    return progress_iter(items, total, description)


def calibrated_from_args(args: argparse.Namespace):
    """(recipe, plan, calibrated QuantModel) for --plan/--uniform: the plan is checked before calibrating."""
    from ..quant.calibration import calibrate_cached, quant_model

    plan = load_plan_arg(args)
    recipe = recipe_from_args(args)
    model = quant_model(recipe, scheme_of(args, plan), args.observer, rounding_of(args, plan), device_of(args))
    plan = resolve_plan(args, plan, recipe, model.num_blocks)  # a bad plan fails fast, before calibration
    calibrate_cached(model, recipe, track=calib_track)
    return recipe, plan, model


def open_artifact(directory: Path):
    """(built artifact, its backend) for ``--artifact DIR``, verified against its manifest (see artifact_backend)."""
    from ..artifact import load_artifact

    built = load_artifact(directory)
    return built, artifact_backend(built)


def artifact_backend(built):
    """The backend that runs ``built``: refused where the artifact cannot run correctly, with a note on stderr
    where it was built for another machine."""
    from ..backends import get_backend
    from ._console import stderr

    backend = get_backend(built.runnable.backend)
    note = getattr(backend, "artifact_note", None)  # optional Backend hook, see pomq_deploy.backends
    text = note(built.runnable) if note is not None else None
    if text:
        stderr.print(f"note: {built.directory}: {text}")
    return backend
