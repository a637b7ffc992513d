"""The whole benchmark run: every `python -m fused_resnet bench` mode, into one results folder.

On a GPU (the run whose results are committed and summarized in README.md), in order:
  1. the model suite: ResNet-50 training step, inference at batch 256 and latency at batch 1,
     bf16 / fp16 / TF32 / fp32, every column (fused Triton, fused `_C` CUDA, eager NCHW,
     eager channels_last, torch.compile default and max-autotune);
  2. the bf16 settings (training, inference, latency) replayed from CUDA graphs;
  3. the per-stage breakdown (every distinct block, bf16 / fp16, batch 256 and 1), which writes
     each shape's fastest backend into the per-shape auto table (`--write-table`);
  4. the family table (ResNet-18 ... 152: MACs, params, latency, img/s);
  5. the per-conv benchmark `bench_ops.py`.
Everything lands in benchmarks/results/<gpu>-<date>/. `--smoke` runs each step on tiny
CPU shapes (checks the script in CI); `--skip` leaves steps out.

    python benchmarks/run_all.py                       # GPU, about 20-30 minutes
    python benchmarks/run_all.py --smoke --out /tmp/x  # CPU smoke run
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_blocks import blocks_args  # the scripts beside this one
from bench_model import model_args

from fused_resnet.__main__ import main as cli

HERE = Path(__file__).resolve().parent
STEPS = ("model", "graphs", "stages", "family", "ops")


def steps(smoke: bool, out: str, table: str) -> dict[str, list[str]]:
    """The CLI arguments of each step: bench_model.py's and bench_blocks.py's runs, with
    TF32 / fp32 added to the model run and the block run writing the per-shape table."""
    model = model_args(smoke, out)
    stages = blocks_args(smoke, out) + ["--write-table", table]
    if smoke:  # tiny CPU shapes: the code paths, not the speed
        return {"model": model, "stages": stages,
                "family": ["bench", "--flops-table", "--archs", "resnet18", "--image-size",
                           "32", "--batch-sizes", "2", "--iters", "2", "--out", out,
                           "--no-progress"]}
    common = ["--arch", "resnet50", "--out", out]
    return {
        "model": model + ["--dtypes", "bf16", "fp16", "tf32", "fp32"],
        "graphs": ["bench", *common, "--dtypes", "bf16", "--batch-sizes", "256",
                   "--cuda-graphs"],
        "stages": stages,
        "family": ["bench", "--flops-table", "--dtypes", "bf16", "--batch-sizes", "256",
                   "--out", out],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of every step")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--table", default="",
                        help="per-shape auto table to update (default: the packaged one; "
                             "the smoke run writes <out>/auto_backend.json)")
    parser.add_argument("--skip", nargs="+", choices=STEPS, default=[])
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("the full run needs a GPU; use --smoke on CPU")
    table = args.table or (str(Path(args.out) / "auto_backend.json") if args.smoke else "")
    plan = steps(args.smoke, args.out, table)
    failed = []
    for name in STEPS:
        if name in args.skip or (name not in plan and name != "ops"):
            continue
        start = time.perf_counter()
        print(f"\n=== {name} ===", flush=True)
        if name == "ops":
            cmd = [sys.executable, str(HERE / "bench_ops.py"), "--out", args.out]
            code = subprocess.call(cmd + (["--smoke"] if args.smoke else []))
        else:
            code = cli(plan[name])
        print(f"=== {name}: exit {code} in {time.perf_counter() - start:.0f} s ===", flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        print(f"failed steps: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
