"""Write an outlier twin of a ViT checkpoint (pomq_deploy.models.twins): the same FP32 function, with channel
outliers in LayerNorm outputs (ln), in q and k (qk) and in v and the attention output (v). Prints how far the
twin's FP32 logits are from the original's and both top-1 on the first --images test images.

    python tools/outlier_twin.py --out /tmp/twin.safetensors                      # 4 channels per LayerNorm at 30x
    python tools/outlier_twin.py --kinds ln qk v --factor 50 --seed 1 --out /tmp/twin_all.safetensors
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    from safetensors.torch import save_file

    from pomq_deploy.data import eval_dataset, eval_loader
    from pomq_deploy.evaluate import evaluate
    from pomq_deploy.models.loading import create_model, read_state_dict
    from pomq_deploy.models.twins import KINDS, outlier_twin
    from pomq_deploy.recipe import load_recipe

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="deit_fmnist", help="the model and data (default: the reference)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=["ln"])
    p.add_argument("--channels", type=int, default=4, help="outlier channels per block and kind (default 4)")
    p.add_argument("--factor", type=float, default=30.0, help="how much larger they are (default 30)")
    p.add_argument("--seed", type=int, default=0, help="which channels (default 0)")
    p.add_argument("--images", type=int, default=1000, help="test images the FP32 check runs on (default 1000)")
    p.add_argument("--out", type=Path, required=True, help="the twin's .safetensors file")
    args = p.parse_args()
    recipe = load_recipe(args.recipe)
    twin = outlier_twin(read_state_dict(Path(recipe.model.checkpoint)), tuple(args.kinds), args.channels, args.factor, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in twin.items()}, str(args.out))
    models = {"original": create_model(recipe.model.arch, recipe.model.checkpoint, recipe.model.kwargs, recipe.model),
              "twin": create_model(recipe.model.arch, args.out, recipe.model.kwargs, recipe.model)}
    data = eval_dataset(recipe.data, models["original"])
    x = torch.stack([data[i][0] for i in range(min(64, len(data)))])
    with torch.no_grad():
        diff = (models["twin"](x) - models["original"](x)).abs().max().item()
    top1 = {k: evaluate(m, eval_loader(data, 100, args.images)).top1 for k, m in models.items()}
    print(f"{args.out}: kinds {' '.join(args.kinds)}, {args.channels} channels at {args.factor:g}x, seed {args.seed}; "
          f"FP32 logits max |diff| {diff:.2e} on {len(x)} images; top-1 on {args.images}: original {top1['original']:.4f}, "
          f"twin {top1['twin']:.4f}")
    return 0 if top1["original"] == top1["twin"] else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
