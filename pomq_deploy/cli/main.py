"""Entry point: parse arguments, dispatch to a subcommand, turn user errors into one line and exit 2."""

import argparse
import errno
import importlib
import logging
import sys
from types import ModuleType

from .. import __version__
from ..errors import PomqError

# what the machine answers about an output path, not a bug of ours: one line naming the path, never a traceback
# (outputs are written through staging folders and atomic renames, so nothing half-written is left)
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST,
                 errno.EISDIR}
# name -> module; each module has HELP, DESCRIPTION, add_arguments(parser) and run(args) -> int.
# Modules import their heavy dependencies (torch, timm, onnxruntime) inside run(), so --help stays fast.
COMMANDS = {
    "inspect": "pomq_deploy.cli.inspect_cmd",
    "calibrate": "pomq_deploy.cli.calibrate_cmd",
    "eval": "pomq_deploy.cli.eval_cmd",
    "export": "pomq_deploy.cli.export_cmd",
    "build": "pomq_deploy.cli.build_cmd",
    "bench": "pomq_deploy.cli.bench_cmd",
    "search": "pomq_deploy.cli.search_cmd",
    "check": "pomq_deploy.cli.check_cmd",
    "profile": "pomq_deploy.cli.profile_cmd",
    "compare": "pomq_deploy.cli.compare_cmd",
}


def _load(name: str, module: str) -> ModuleType | str:
    """The subcommand's module, or the reason it cannot load (one broken command must not break the CLI)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        return f"'{name}' is unavailable: {e}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pomq-deploy",
        description="Quantize a Vision Transformer after training to a mixed 4/8-bit plan, export it as Q/DQ ONNX, "
        "build and measure engines, and search for the Pareto-best plan.",
        epilog="Run 'pomq-deploy COMMAND --help' for a command's options. Without --recipe, commands use the "
        "embedded reference model (recipes/deit_fmnist.yaml: DeiT-Tiny blocks trained on Fashion-MNIST).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug) on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = _load(name, module_name)
        if isinstance(module, str):
            p = sub.add_parser(name, help=module, description=module)
            p.set_defaults(_unavailable=module)
            continue
        p = sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _setup_logging(verbosity: int) -> None:
    from rich.logging import RichHandler

    from ._console import stderr

    level = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=stderr, show_path=False)])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        if hasattr(args, "_unavailable"):
            raise PomqError(args._unavailable)
        return args._run(args)
    except PomqError as e:
        print(f"pomq-deploy {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        if e.errno not in OUTPUT_ERRNOS:
            raise
        where = e.filename or getattr(args, "out", None)  # the path at fault, else the output the user asked for
        wrong_kind = e.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR)  # a file where a folder goes, or back
        why = "a file stands where a folder goes, or a folder where a file goes" if wrong_kind else e.strerror or str(e)
        print(f"pomq-deploy {args.command}: error: {f'{where}: ' if where else ''}cannot write: {why}", file=sys.stderr)
        return 2 if wrong_kind else 1  # a wrong --out is a usage error; a full or read-only disk is not
    except KeyboardInterrupt:
        print("pomq-deploy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
