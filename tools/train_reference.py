"""Train the embedded reference model (``deit_fmnist``), or any timm model shaped for 28x28 grey images
(``--arch`` with ``--kwargs``), on Fashion-MNIST.

Seeded and resumable: the full training state is saved after every epoch under --work-dir, and a second
run with the same arguments continues from the last finished epoch. At the end the FP32 weights are
written as safetensors with a JSON beside them (config, seed, epochs, measured test top-1).

    python tools/train_reference.py --epochs 10      # on 2 CPU cores: ~8-10 min/epoch (bf16 autocast)

The committed checkpoint was trained on an H100 (~7 s/epoch, batch 256, crop+flip throughout):
    python tools/train_reference.py --epochs 31 --batch-size 256 --lr 1e-3 --warmup-epochs 5
    python tools/train_reference.py --epochs 64 --batch-size 256 --lr 4e-4 --warmup-epochs 5   # resumed

A model of your own shape, as a recipe's model.arch and model.kwargs describe it:
    python tools/train_reference.py --arch vit_tiny_patch16_224 --epochs 3 --out /tmp/vit7.safetensors \
        --work-dir /tmp/vit7 --kwargs '{"img_size": 28, "patch_size": 7, "in_chans": 1, "num_classes": 10,
        "embed_dim": 128, "depth": 6, "num_heads": 4}'

Resuming with a larger --epochs than the saved run had extends the schedule: the cosine is recomputed over
the new total, so the learning rate rises once (a warm restart) and anneals again. Each history entry
records the total its epoch was scheduled for.
"""

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timm

import pomq_deploy
import pomq_deploy.models
from pomq_deploy.data.fashion_mnist import DEBIAN_ROOT, load_fashion_mnist
from pomq_deploy.evaluate import evaluate
from pomq_deploy.models.reference import FMNIST_MEAN, FMNIST_STD, REFERENCE_CONFIG


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEBIAN_ROOT, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--arch", default="deit_fmnist", help="timm model name (default: the reference, deit_fmnist)")
    p.add_argument("--kwargs", type=json.loads, default={}, help="timm.create_model keyword arguments, as JSON "
                   "(a recipe's model.kwargs): the model must take 1x28x28 images and give 10 classes")
    p.add_argument("--out", type=Path, default=Path("checkpoints/deit_fmnist.safetensors"))
    p.add_argument("--work-dir", type=Path, default=Path(".train/deit_fmnist"), help="resume state lives here")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bf16", action="store_true", help="train in FP32 (bf16 autocast is ~1.3x faster here)")
    p.add_argument("--no-augment", action="store_true", help="no random crop/flip (e.g. for the final annealing epochs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to train (default: cuda when available); the data set lives there whole")
    p.add_argument("--train-limit", type=int, help="train on the first N training images only (a smoke test)")
    p.add_argument("--init", type=Path, help="start from these weights (e.g. the committed checkpoint) with a fresh "
                   "optimizer, when --work-dir holds no saved state")
    return p.parse_args()


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random 28x28 crop of the image padded by 2, and a random horizontal flip (both per image).

    One gather for the whole batch; the draws come from the CPU generator ``g`` so that a run is
    reproducible whatever device it trains on."""
    n, _, h, w = x.shape
    padded = F.pad(x, (2, 2, 2, 2))
    dy, dx = torch.randint(0, 5, (2, n), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    cols = dx[:, None] + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(-1), cols)
    rows = (dy[:, None] + torch.arange(h)).to(x.device)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded[:, 0][batch, rows[:, :, None], cols.to(x.device)[:, None, :]][:, None]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 1% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    train_x, train_y = load_fashion_mnist(args.data, "train")
    train_x, train_y = train_x[: args.train_limit], train_y[: args.train_limit]
    test_x, test_y = load_fashion_mnist(args.data, "test")
    mean, std = FMNIST_MEAN[0], FMNIST_STD[0]
    train_x = (torch.from_numpy(train_x).float()[:, None] / 255 - mean) / std
    test_x = (torch.from_numpy(test_x).float()[:, None] / 255 - mean) / std
    train_y, test_y = torch.from_numpy(train_y), torch.from_numpy(test_y)
    dev = torch.device(args.device)
    train_x, train_y, test_x, test_y = (t.to(dev) for t in (train_x, train_y, test_x, test_y))

    model = timm.create_model(args.arch, **args.kwargs).to(dev)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n and "cls_token" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "pos_embed" not in n and "cls_token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    steps_per_epoch = math.ceil(len(train_y) / args.batch_size)
    total, warmup = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total))

    args.work_dir.mkdir(parents=True, exist_ok=True)
    state_path = args.work_dir / "state.pt"
    history: list[dict] = []
    start_epoch = 0
    if state_path.exists():
        state = torch.load(state_path, weights_only=False, map_location=dev)
        model.load_state_dict(state["model"])
        model.to(dev)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"], state["history"]
        # the peak learning rate given now applies to the rest of the schedule
        sched.base_lrs = [args.lr] * len(opt.param_groups)
        print(f"resuming from {state_path} after epoch {start_epoch}")
    elif args.init is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(args.init), device=str(dev)))
        history = [{"init": str(args.init)}]
        print(f"starting from the weights in {args.init}")

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=not args.no_bf16):
            return model(x).float()

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeRemainingColumn()]
    with Progress(*columns) as progress:
        for epoch in range(start_epoch, args.epochs):
            model.train()
            # Per-epoch generators make a resumed run draw exactly what an uninterrupted one would.
            g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
            order = torch.randperm(len(train_y), generator=g)
            task = progress.add_task(f"epoch {epoch + 1}/{args.epochs}", total=steps_per_epoch, info="")
            t0, loss_sum = time.time(), 0.0
            for step in range(steps_per_epoch):
                idx = order[step * args.batch_size : (step + 1) * args.batch_size].to(dev)
                x, y = (train_x[idx] if args.no_augment else augment(train_x[idx], g)), train_y[idx]
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=not args.no_bf16):
                    loss = F.cross_entropy(model(x).float(), y, label_smoothing=args.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                loss_sum += loss.detach()
                if step % 20 == 19 or step == steps_per_epoch - 1:  # reading the loss waits for the device
                    progress.update(task, completed=step + 1,
                                    info=f"loss {float(loss_sum) / (step + 1):.3f} lr {sched.get_last_lr()[0]:.2e}")
            loss_sum = float(loss_sum)
            model.eval()
            res = evaluate(predict, zip(test_x.split(500), test_y.split(500), strict=True))
            history.append({"epoch": epoch + 1, "train_loss": loss_sum / steps_per_epoch, "test_top1_bf16": res.top1,
                            "seconds": time.time() - t0, "schedule_epochs": args.epochs, "peak_lr": args.lr,
                            "augment": not args.no_augment})
            progress.console.print(f"epoch {epoch + 1}: loss {loss_sum / steps_per_epoch:.4f}, test top-1 {res.top1:.4f} "
                                   f"({time.time() - t0:.0f} s)")
            save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "epoch": epoch + 1, "history": history}, state_path)

    model.eval()
    model.cpu()  # the published number is FP32 on the CPU, as `pomq-deploy eval` measures it
    final = evaluate(model, zip(test_x.cpu().split(500), test_y.cpu().split(500), strict=True))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata={"arch": args.arch})
    os.replace(tmp, args.out)
    meta = {
        "arch": args.arch, "config": REFERENCE_CONFIG if args.arch == "deit_fmnist" else args.kwargs, "mean": FMNIST_MEAN, "std": FMNIST_STD,
        "seed": args.seed, "epochs": args.epochs, "init_from": str(args.init) if args.init else None, "batch_size": args.batch_size, "lr": args.lr,
        "weight_decay": args.weight_decay, "label_smoothing": args.label_smoothing, "bf16_autocast": not args.no_bf16,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "augmentation": "random crop (pad 2) + horizontal flip, where the history says augment",
        "test_top1_fp32": final.top1, "test_top5_fp32": final.top5,
        "test_images": final.images, "history": history,
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "pomq_deploy": pomq_deploy.__version__,
                     "python": platform.python_version()},
    }
    meta_path = args.out.with_suffix(".json")
    meta_path.with_name(meta_path.name + ".tmp").write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(meta_path.with_name(meta_path.name + ".tmp"), meta_path)
    print(f"wrote {args.out} and {meta_path}: FP32 test top-1 {final.top1:.4f}")


if __name__ == "__main__":
    main()
