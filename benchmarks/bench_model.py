"""Whole-model benchmark: fused ResNet vs eager (NCHW and channels_last) vs torch.compile.

One process, the same weights and inputs, for each dtype (bf16 / fp16 autocast, fp32):
training step (forward + backward + SGD) img/s and peak memory at `--train-batch`, inference
throughput at `--infer-batch` and latency at batch 1. Rows come from `fused_resnet.bench`;
this script adds the dtype sweep, the ratios to eager channels_last and torch.compile, and
writes CSV + markdown + PNG under benchmarks/results/<gpu>-<date>-model.*.

    python benchmarks/bench_model.py --arch resnet50                 # GPU: the full run
    python benchmarks/bench_model.py --smoke --out /tmp/x            # CPU: checks the script
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fused_resnet.bench import bench, report_header, results_stem, write_report  # noqa: E402
from fused_resnet.table import format_table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def run(arch, dtypes, train_batch, infer_batch, image_size, compile_model, iters,
        backends=("auto",)):
    rows = []
    for dtype in dtypes:
        for mode, batch in (("train", train_batch), ("infer", infer_batch), ("infer", 1)):
            for row in bench(arch, backends, batch_size=batch, image_size=image_size,
                             dtype=dtype, modes=(mode,), compile_model=compile_model,
                             iters=iters):
                entry = asdict(row)
                entry["dtype"] = dtype
                rows.append(entry)
            print(f"done {dtype} {mode} batch {batch}", file=sys.stderr)
    for row in rows:  # ratios of the fused column's img/s to each column, same setting
        same = [r for r in rows if (r["dtype"], r["mode"], r["batch"]) ==
                (row["dtype"], row["mode"], row["batch"])]
        fused = next(r for r in same if r["column"] == f"fused_resnet[{backends[0]}]")
        row["fused_speedup"] = fused["images_per_s"] / row["images_per_s"]
    return rows


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install .[bench]): no plot", file=sys.stderr)
        return
    settings = sorted({(r["dtype"], r["mode"], r["batch"]) for r in rows})
    columns = list(dict.fromkeys(r["column"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(settings)), 4))
    width = 0.8 / len(columns)
    for i, column in enumerate(columns):
        values = [next((r["images_per_s"] for r in rows if r["column"] == column and
                        (r["dtype"], r["mode"], r["batch"]) == s), 0) for s in settings]
        ax.bar([j + i * width for j in range(len(settings))], values, width, label=column)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(settings))])
    ax.set_xticklabels([f"{d} {m}\nbatch {b}" for d, m, b in settings], fontsize=8)
    ax.set_ylabel("images / s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32"])
    parser.add_argument("--train-batch", type=int, default=256)
    parser.add_argument("--infer-batch", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="fused columns (default: auto, plus cuda on a GPU); the first is "
                             "the one the 'fused x' ratios divide by")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run that checks the script")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    backends = tuple(args.backends or (("auto", "cuda") if torch.cuda.is_available()
                                       else ("auto",)))
    if args.smoke:
        args.arch, args.dtypes, args.image_size = "cifar_resnet20", ["fp32"], 8
        args.train_batch = args.infer_batch = args.iters = 2
        args.no_compile = True
    rows = run(args.arch, args.dtypes, args.train_batch, args.infer_batch, args.image_size,
               not args.no_compile, args.iters, backends)
    header = report_header(f"bench_model: {args.arch}", f"{', '.join(args.dtypes)}")
    table = format_table(
        ["dtype", "mode", "batch", "column", "ms", "img/s", "TFLOP/s", "peak MiB", "fused x"],
        [[r["dtype"], r["mode"], r["batch"], r["column"], f"{r['ms_median']:.2f}",
          f"{r['images_per_s']:.1f}", f"{r['tflops']:.2f}",
          "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}",
          f"{r['fused_speedup']:.2f}"] for r in rows])
    print(header + table)
    stem = results_stem(args.out or str(RESULTS), "model", args.smoke)
    write_report(rows, stem, header + table)
    plot(rows, f"{stem}.png")
    print(f"\nwrote {stem}.csv, .md, .png", file=sys.stderr)


if __name__ == "__main__":
    main()
