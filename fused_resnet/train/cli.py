"""`python -m fused_resnet train`: arguments, single runs, DDP under torchrun, and the
degradation demo.

    train --arch cifar_resnet56 --data synthetic|<ImageFolder> --epochs N --batch-size B
          [--amp bf16|fp16] [--backend auto] [--resume runs/x/checkpoint.pt] [--out runs/x]
          [--cuda-graphs]
    torchrun --nproc-per-node 2 -m fused_resnet train --ddp [--sync-bn] ...
    train --compare plain_net,cifar_resnet --depths 20,56     (the paper's degradation figure)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings

from fused_resnet.backend import BACKENDS
from fused_resnet.models import ARCH_HELP
from fused_resnet.train.checkpoint import ResumeWarning
from fused_resnet.train.loop import AMP, SCHEDULES, TrainConfig, train

# --compare family names -> model name patterns (`{}` is the depth)
FAMILIES = {"plain_net": "plain_cifar{}", "plain_cifar": "plain_cifar{}",
            "cifar_resnet": "cifar_resnet{}", "plain": "plain{}", "resnet": "resnet{}"}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="cifar_resnet56", help=f"model: {ARCH_HELP}")
    p.add_argument("--data", default="synthetic",
                   help="'synthetic' (deterministic, built in) or an ImageFolder root (with "
                        "train/ and val/ subfolders, or one folder for both)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128, help="per process")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--schedule", choices=SCHEDULES, default="milestones",
                   help="lr / 10 at fixed fractions of the run, or on a validation plateau")
    p.add_argument("--milestones", type=float, nargs="+", default=[0.5, 0.75],
                   help="fractions of all iterations where lr drops 10x (paper: 32k, 48k of "
                        "64k)")
    p.add_argument("--patience", type=int, default=2, help="plateau: epochs to wait")
    p.add_argument("--warmup-iters", type=int, default=0,
                   help="iterations at lr / 10 first (paper: ResNet-110, ~400)")
    p.add_argument("--amp", choices=AMP, default="fp32", help="autocast dtype (fp16 scales)")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--out", default=None, help="output folder (default runs/<arch>)")
    p.add_argument("--resume", default=None,
                   help="a checkpoint.pt to continue from, with this command's --momentum "
                        "and --weight-decay; a warning says what another --epochs, "
                        "--batch-size (at an epoch boundary only) or --amp changes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None,
                   help="data-loading processes per process (default: none for synthetic "
                        "images up to 64x64, else up to 8)")
    p.add_argument("--synthetic-size", type=int, default=2048, help="synthetic images")
    p.add_argument("--image-size", type=int, default=None,
                   help="synthetic image size (default 32 for CIFAR nets, else 224)")
    p.add_argument("--log-every", type=int, default=10,
                   help="iterations per iterations.csv row (each the mean of those steps)")
    p.add_argument("--max-iters", type=int, default=None,
                   help="stop after this many steps, with a checkpoint there (mid-epoch too)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--nchw", action="store_true", help="NCHW instead of channels_last")
    p.add_argument("--ddp", action="store_true",
                   help="DistributedDataParallel over the processes torchrun started")
    p.add_argument("--sync-bn", action="store_true",
                   help="batch statistics over all processes (FusedSyncBatchNorm)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture the training step once and replay it from a CUDA graph "
                        "(one GPU; fp16 with a fused SGD)")
    p.add_argument("--weights", default=None,
                   help="fine-tune from torchvision's pretrained weights (ImageNet archs: "
                        "DEFAULT, IMAGENET1K_V1, ...); fc is replaced where the data has "
                        "another number of classes")
    p.add_argument("--compare", default=None, metavar="FAMILIES",
                   help=f"comma-separated families to train side by side: {', '.join(FAMILIES)}")
    p.add_argument("--depths", default="20,56", help="with --compare: comma-separated depths")
    p.add_argument("--no-progress", action="store_true")


def config_from(args: argparse.Namespace, arch: str, out: str) -> TrainConfig:
    return TrainConfig(
        arch=arch, data=args.data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
        milestones=tuple(args.milestones), patience=args.patience,
        warmup_iters=args.warmup_iters, amp=args.amp, backend=args.backend, out=out,
        resume=args.resume, seed=args.seed, workers=args.workers,
        synthetic_size=args.synthetic_size, image_size=args.image_size,
        log_every=args.log_every, max_iters=args.max_iters, device=args.device,
        channels_last=not args.nchw, sync_bn=args.sync_bn, ddp=args.ddp,
        cuda_graphs=args.cuda_graphs, weights=args.weights, progress=not args.no_progress)


OUTPUTS = ("checkpoint.pt", "iterations.csv", "epochs.csv", "curves.png")


def written(folder: str, names, since: float) -> list[str]:
    """Those of `names` in `folder` written at or after `since` (time.time()): what this run
    wrote, not what an earlier run left there."""
    out = []
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path) and os.path.getmtime(path) >= since - 1:
            out.append(name)
    return out


def _report_written(folder: str, names, since: float) -> None:
    files = written(folder, names, since)
    if files:
        print(f"\nwrote {folder}/{files[0]}" + "".join(f", {n}" for n in files[1:]))
    else:
        print(f"\nwrote nothing to {folder}")


def check_arch(arch: str) -> None:
    """Raises ValueError where `arch` names no model (checked without building one)."""
    import torch

    from fused_resnet.models import build_model

    with torch.device("meta"):
        build_model(arch)


@contextlib.contextmanager
def resume_warnings_as_lines():
    """Inside, a ResumeWarning prints as one line on stderr ("python -m fused_resnet
    train: warning: ..."), not as Python's file:line report; other warnings as before."""
    with warnings.catch_warnings():
        show = warnings.showwarning

        def showwarning(message, category, *args, **kwargs):
            if issubclass(category, ResumeWarning):
                print(f"python -m fused_resnet train: warning: {message}", file=sys.stderr,
                      flush=True)
            else:
                show(message, category, *args, **kwargs)

        warnings.showwarning = showwarning
        yield


def cmd_train(args: argparse.Namespace) -> int:
    import time

    from fused_resnet.table import format_table
    from fused_resnet.train.report import write_comparison

    if args.compare is None:
        out = args.out or os.path.join("runs", args.arch)
        since = time.time()
        with resume_warnings_as_lines():
            result = train(config_from(args, args.arch, out))
        _print_epochs(args.arch, result["epochs"], format_table)
        _report_written(out, OUTPUTS, since)
        return 0
    if args.resume:
        raise ValueError("--resume continues one run; it does not combine with --compare")
    families = [f.strip() for f in args.compare.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise ValueError(f"--compare takes families among {tuple(FAMILIES)}, got {unknown}")
    try:
        depths = [int(d) for d in args.depths.split(",")]
    except ValueError:
        raise ValueError(f"--depths must be comma-separated integers, got {args.depths!r}"
                         ) from None
    root = args.out or os.path.join("runs", "compare")
    # every run's model and settings checked before the first one trains
    configs = {}
    for family in families:
        for depth in depths:
            arch = FAMILIES[family].format(depth)
            try:
                check_arch(arch)
            except ValueError as exc:
                raise ValueError(f"--compare {family} --depths {depth}: {exc}") from None
            configs[(family, depth)] = config_from(args, arch, os.path.join(root, arch))
            configs[(family, depth)].check()
    runs = {}
    for (family, depth), cfg in configs.items():
        runs[(family, depth)] = train(cfg)
        _print_epochs(cfg.arch, runs[(family, depth)]["epochs"], format_table)
    os.makedirs(root, exist_ok=True)
    since = time.time()
    write_comparison(root, runs)
    print(format_table(("family", "depth", "final train error %", "final validation error %"),
                       [(f, d, f"{r['epochs'][-1]['train_err']:.1f}",
                         f"{r['epochs'][-1]['val_err']:.1f}") for (f, d), r in runs.items()]))
    _report_written(root, ("compare.csv", "compare.png"), since)
    return 0


def _print_epochs(arch: str, epochs: list[dict], format_table) -> None:
    print(f"\n{arch}\n")
    print(format_table(
        ("epoch", "iteration", "lr", "train loss", "train err %", "val loss", "val err %",
         "img/s"),
        [(r["epoch"], r["iteration"], f"{r['lr']:.4g}", f"{r['train_loss']:.4f}",
          f"{r['train_err']:.1f}", f"{r['val_loss']:.4f}", f"{r['val_err']:.1f}",
          f"{r['images_per_s']:.0f}") for r in epochs]))
