"""CPU benchmark: residual blocks on the `_C` CPU kernels ("cpu" backend) vs eager PyTorch.

For CIFAR-size basic blocks and the ResNet-50 stage bottlenecks, in one process on the same
weights and inputs, in NCHW and channels_last: the fused block (`backend="cpu"`: oneDNN
convolutions, BN statistics / BN + add + ReLU / their backward in one pass each) against the
same block on the reference ops (F.conv2d -> F.batch_norm -> add -> relu, what torchvision's
blocks run). "train" = forward + backward with a fixed random output gradient, "eval" =
forward under no_grad. The two are timed alternately, run after run, so that load on the
machine hits both alike; the speed-up is eager median / fused median (target >= 1.0x).

    python benchmarks/bench_cpu.py                  # writes results/cpu-<date>/cpu-blocks.*
    python benchmarks/bench_cpu.py --smoke --out /tmp/x     # tiny shapes: checks the script
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

from fused_resnet.bench import report_header, results_dir, time_columns, write_report
from fused_resnet.nn import FusedBasicBlock, FusedBottleneck
from fused_resnet.table import format_table
from fused_resnet.testing import DTYPES

RESULTS = Path(__file__).resolve().parent / "results"

# name, block factory (backend -> module), input channels, input size, which batch
BLOCKS = [
    ("cifar basic 16 @32", lambda b: FusedBasicBlock(16, 16, 1, backend=b), 16, 32, "cifar"),
    ("cifar basic 16>32 /2 A", lambda b: FusedBasicBlock(16, 32, 2, shortcut="A", backend=b), 16,
     32, "cifar"),
    ("cifar basic 32 @16", lambda b: FusedBasicBlock(32, 32, 1, backend=b), 32, 16, "cifar"),
    ("cifar basic 64 @8", lambda b: FusedBasicBlock(64, 64, 1, backend=b), 64, 8, "cifar"),
    ("r50 layer1 256 @56", lambda b: FusedBottleneck(256, 64, 1, backend=b), 256, 56, "imagenet"),
    ("r50 layer2 512 @28", lambda b: FusedBottleneck(512, 128, 1, backend=b), 512, 28, "imagenet"),
    ("r50 layer2.0 256>512 /2", lambda b: FusedBottleneck(256, 128, 2, backend=b), 256, 56,
     "imagenet"),
    ("r50 layer3 1024 @14", lambda b: FusedBottleneck(1024, 256, 1, backend=b), 1024, 14,
     "imagenet"),
    ("r50 layer4 2048 @7", lambda b: FusedBottleneck(2048, 512, 1, backend=b), 2048, 7,
     "imagenet"),
]


def bench_block(name, make, channels, size, batch, dtype, channels_last, warmup, iters):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    fused = make("cpu").to(dtype=dtype, memory_format=fmt)
    eager = make("reference").to(dtype=dtype, memory_format=fmt)
    eager.load_state_dict(fused.state_dict())
    x = torch.randn(batch, channels, size, size, dtype=dtype).contiguous(memory_format=fmt)
    x.requires_grad_()
    with torch.no_grad():
        dz = torch.randn_like(fused(x))
    rows = []
    for mode in ("train", "eval"):
        def step(model, mode=mode):
            if mode == "train":
                model.train()
                model(x).backward(dz)
            else:
                model.eval()
                with torch.no_grad():
                    model(x)
        timed = time_columns({"fused": lambda: step(fused), "eager": lambda: step(eager)},
                             torch.device("cpu"), warmup, iters)
        times = {k: (t.median, t.p20, t.p80) for k, t in timed.items()}
        rows.append({"block": name, "batch": batch, "dtype": str(dtype).split(".")[-1],
                     "layout": "channels_last" if channels_last else "NCHW", "mode": mode,
                     "fused_ms": times["fused"][0], "fused_p20": times["fused"][1],
                     "fused_p80": times["fused"][2], "eager_ms": times["eager"][0],
                     "eager_p20": times["eager"][1], "eager_p80": times["eager"][2],
                     "speedup": times["eager"][0] / times["fused"][0]})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cifar-batch", type=int, default=128)
    parser.add_argument("--imagenet-batch", type=int, default=8)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--smoke", action="store_true",
                        help="two tiny blocks, 2 runs: checks the script, not the speed")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    batches = {"cifar": args.cifar_batch, "imagenet": args.imagenet_batch}
    blocks, warmup, iters = BLOCKS, args.warmup, args.iters
    if args.smoke:
        blocks, warmup, iters = [BLOCKS[1], BLOCKS[5]], 1, 2
        batches = {"cifar": 2, "imagenet": 1}
    rows = []
    for name, make, channels, size, kind in blocks:
        if args.smoke and kind == "imagenet":
            size = 8
        for channels_last in (False, True):
            rows += bench_block(name, make, channels, size, batches[kind], dtype, channels_last,
                                warmup, iters)
        print(f"done {name}", file=sys.stderr)
    table = format_table(
        ["block", "batch", "layout", "mode", "fused ms (p20-p80)", "eager ms (p20-p80)",
         "speed-up"],
        [[r["block"], r["batch"], r["layout"], r["mode"],
          f"{r['fused_ms']:.2f} ({r['fused_p20']:.2f}-{r['fused_p80']:.2f})",
          f"{r['eager_ms']:.2f} ({r['eager_p20']:.2f}-{r['eager_p80']:.2f})",
          f"{r['speedup']:.2f}x"] for r in rows])
    ratios = [r["speedup"] for r in rows]
    geomean = statistics.geometric_mean(ratios)
    summary = (f"\ngeometric-mean speed-up {geomean:.2f}x over {len(rows)} rows "
               f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x), "
               f"{torch.get_num_threads()} threads\n")
    header = report_header("bench_cpu: fused CPU blocks vs eager", str(dtype).split(".")[-1])
    print(header + table + summary)
    stem = os.path.join(results_dir(args.out or str(RESULTS)),
                        "cpu-blocks-smoke" if args.smoke else "cpu-blocks")
    write_report(rows, stem, header + table + summary)
    print(f"wrote {stem}.csv and .md", file=sys.stderr)


if __name__ == "__main__":
    main()
