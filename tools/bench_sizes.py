"""Time and peak memory of ``build --uniform 8/8/8``, a model-mode ``search`` and a block-reconstruction build
(``build --uniform 4/8/8 --rounding adaround``) at the paper's model sizes.

Each timm model (DeiT-S, DeiT-B, ViT-L at 224 px by default) gets random weights (timm's init, seed 0) saved as
a checkpoint and a small ImageNet-style folder of random JPEGs (nothing downloaded); the commands then run as a
user runs them, each in its own process under ``/usr/bin/time -v`` (wall time, peak resident memory). The
search is a small one (``--builds``, few images): what it shows is that the PyTorch side (calibration,
sensitivities, the fake-quant reference) and the builds fit in memory at that size, and what they cost. The
reconstruction runs ``--fit-iterations`` Adam steps per block (the recipe's default is 1,000): its memory is
what a full fit holds (each block's calibration activations), its time is not a full fit's.
The CPU heads the output; the table is markdown for docs/benchmarks.md.

    python tools/bench_sizes.py                                   # deit_small deit_base vit_large: build, search, fit
    python tools/bench_sizes.py --archs vit_base_patch16_224 --only build
    python tools/bench_sizes.py --archs vit_base_patch16_224 --only fit --calib-images 256
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timm
from safetensors.torch import save_file

from pomq_deploy.backends.cpu import detect

ARCHS = ["deit_small_patch16_224", "deit_base_patch16_224", "vit_large_patch16_224"]


def image_folder(root: Path, classes: int, per_class: int) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c:03d}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(root / f"c{c:03d}" / f"{i}.JPEG")
    return root


def recipe(work: Path, arch: str, data: Path, args) -> tuple[Path, float]:
    """The recipe of ``arch`` with random weights (saved once), and its parameter count in millions."""
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False)
    ckpt = work / f"{arch}.safetensors"
    if not ckpt.is_file():
        save_file(model.state_dict(), str(ckpt))
    path = work / f"{arch}.yaml"
    path.write_text(f"name: {arch}\nmodel: {{arch: {arch}, checkpoint: {ckpt}}}\n"
                    f"data: {{kind: image_folder, root: {data}, calib_images: {args.calib_images}, calib_batch: 32, workers: 0}}\n"
                    f"eval: {{batch_size: 16, limit: {args.eval_images}}}\n"
                    f"search: {{builds: {args.builds}, eval_images: {args.eval_images}, sensitivity_images: 8, batch: 1, latency_runs: 2}}\n"
                    f"fit: {{iterations: {args.fit_iterations}}}\n")
    return path, sum(t.numel() for t in model.parameters()) / 1e6


def timed(argv: list[str], log: Path, cache: Path) -> tuple[int, float, float]:
    """(exit code, wall seconds, peak resident GB) of ``argv`` under /usr/bin/time -v, with its own calibration
    cache (``cache``: each command calibrates, and fits, as on a fresh machine)."""
    env = {**os.environ, "POMQ_DEPLOY_CACHE": str(cache)}
    with open(log, "w") as out:
        rc = subprocess.run(["/usr/bin/time", "-v", *argv], stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    text = log.read_text()
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text).group(1)
    seconds = sum(float(p) * 60**i for i, p in enumerate(reversed(wall.split(":"))))
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    return rc, seconds, peak_kb / 1024**2


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=ARCHS)
    p.add_argument("--only", choices=("build", "search", "fit"), help="run one of the three commands (default all)")
    p.add_argument("--calib-images", type=int, default=64, help="calibration images (default 64)")
    p.add_argument("--eval-images", type=int, default=64, help="evaluation images of the build and the search (default 64)")
    p.add_argument("--builds", type=int, default=13,
                   help="the search's real builds, baselines included (default 13: the baselines and the design set, no front)")
    p.add_argument("--fit-iterations", type=int, default=20, help="Adam steps per block setting of the fit (default 20)")
    p.add_argument("--device", default="auto", help="--device of both commands (default auto)")
    p.add_argument("--work", type=Path, help="folder for checkpoints, images and logs (default: a new temporary one)")
    args = p.parse_args()
    if not Path("/usr/bin/time").is_file():
        print("needs /usr/bin/time (Debian's 'time' package)")
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="pomq-sizes-"))
    work.mkdir(parents=True, exist_ok=True)
    data = image_folder(work / "images", classes=8, per_class=max(args.calib_images, args.eval_images) // 8)
    cli = [sys.executable, "-m", "pomq_deploy.cli.main"]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "none"
    print(f"CPU: {detect().describe()}, {os.cpu_count()} CPUs; GPU: {gpu}; --device {args.device}; torch {torch.__version__}; "
          f"random weights, 224 px, {args.calib_images} calibration images, {args.eval_images} evaluation images; logs in {work}\n")
    print("| model | params | command | exit | wall s | peak memory GB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for arch in args.archs:
        r, params = recipe(work, arch, data, args)
        build = [*cli, "build", "--recipe", str(r), "--out", str(work / "engines"), "--runs", "5", "--batch", "1",
                 "--device", args.device, "--json"]
        runs = {"build": ("build --uniform 8/8/8", [*build, "--uniform", "8/8/8"]),
                "search": (f"search --builds {args.builds}", [*cli, "search", "--recipe", str(r), "--out", str(work / f"search-{arch}"),
                                                              "--allow-infeasible", "--device", args.device, "--json"]),
                "fit": (f"build --uniform 4/8/8 --rounding adaround ({args.fit_iterations} iterations)",
                        [*build, "--uniform", "4/8/8", "--rounding", "adaround"])}
        for kind, (label, argv) in runs.items():
            if args.only and kind != args.only:
                continue
            rc, seconds, peak = timed(argv, work / f"{arch}-{kind}.log", work / f"cache-{arch}-{kind}")
            print(f"| {arch} | {params:.0f} M | `{label}` | {rc} | {seconds:.0f} | {peak:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
