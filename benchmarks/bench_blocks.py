"""Per-block benchmark: every distinct bottleneck of ResNet-50, fused vs eager vs compile.

For each distinct block shape (input channels, planes, stride, projection, input size), in one
process and on the same weights and inputs: the fused block (one op in training, the folded
chain in eval; for stride-1 identity blocks also the single-launch eval kernel, "fused
single", so the faster eval path per shape can be read off; on GPU also "fused cuda", the
`_C` fallback of cuDNN convs and fused BN kernels), the same block on the
pure-PyTorch reference in channels_last (eager cuDNN on GPU), and torch.compile of that
reference block; "train" = forward + backward, "eval" = forward under no_grad, in autocast
`--dtype`. TFLOP/s counts 2 FLOPs per MAC (x3 with
backward). Writes benchmarks/results/<gpu>-<date>-blocks.{csv,md}.

    python benchmarks/bench_blocks.py --batch 256 --dtype bf16        # GPU
    python benchmarks/bench_blocks.py --smoke --out /tmp/x            # CPU: checks the script
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fused_resnet as fr  # noqa: E402
from fused_resnet.bench import report_header, results_stem, time_ms, write_report  # noqa: E402,E501
from fused_resnet.nn import FusedBottleneck  # noqa: E402
from fused_resnet.table import format_table  # noqa: E402
from fused_resnet.testing import DTYPES  # noqa: E402
from fused_resnet.triton.config import BOTTLENECK_EVAL_MAX_MID  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def resnet50_block_shapes(image_size: int = 224):
    """Distinct (inplanes, planes, stride, projection, h_in) of ResNet-50's bottlenecks."""
    model = fr.models.resnet50()
    h = image_size // 4  # after the stride-2 stem conv and max-pool
    shapes = []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            shape = (block.conv1.in_channels, block.conv1.out_channels, block.stride,
                     block.downsample is not None, h)
            if shape not in shapes:
                shapes.append(shape)
            h //= block.stride
    return shapes


def bench_block(shape, batch, dtype, device, use_compile):
    inplanes, planes, stride, _, h = shape
    cl = torch.channels_last
    fused = FusedBottleneck(inplanes, planes, stride, backend="auto").to(device, memory_format=cl)
    eager = copy.deepcopy(fused)
    fr.models.set_backend(eager, "reference")
    columns = {"fused": fused, "eager": eager}
    if device.type == "cuda":  # the _C fallback: cuDNN convs + the fused BN kernels
        columns["fused cuda"] = copy.deepcopy(fused)
        fr.models.set_backend(columns["fused cuda"], "cuda")
    if stride == 1 and not shape[3] and planes <= BOTTLENECK_EVAL_MAX_MID:  # single launch
        columns["fused single"] = copy.deepcopy(fused)
        columns["fused single"].eval_kernel = "single"
    if use_compile:
        columns["compile"] = torch.compile(copy.deepcopy(eager))
    x = torch.randn(batch, inplanes, h, h, device=device).contiguous(memory_format=cl)
    x.requires_grad_()
    macs = fr.count_flops(fused, (1, inplanes, h, h), training=False).macs * batch
    rows = []
    for mode in ("train", "eval"):
        for name, module in columns.items():
            if name == "fused single" and mode == "train":
                continue
            module.train(mode == "train")

            def fn(module=module, train=mode == "train"):
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    if train:
                        module(x).sum().backward()
                    else:
                        with torch.no_grad():
                            module(x)

            med, p20, p80 = time_ms(fn, device)
            flops = 2 * macs * (3 if mode == "train" else 1)
            rows.append({"block": f"{inplanes}>{planes}x4 s{stride}{' proj' if shape[3] else ''}"
                                  f" {h}x{h}", "batch": batch,
                         "dtype": str(dtype).split(".")[-1], "mode": mode, "impl": name,
                         "ms": med, "ms_p20": p20, "ms_p80": p80, "tflops": flops / med / 1e9})
    for row in rows:
        fused_row = next(r for r in rows if r["mode"] == row["mode"] and r["impl"] == "fused")
        row["fused_speedup"] = row["ms"] / fused_row["ms"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run that checks the script")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype, batch, shapes = DTYPES[args.dtype], args.batch, resnet50_block_shapes()
    if args.smoke:  # one identity and one projection block, channels / 16, 4x4 maps
        shapes = [(ci // 16, p // 16, s, proj, 4) for ci, p, s, proj, _ in shapes[:2]]
        dtype, batch = torch.float32, 2
    rows = []
    for shape in shapes:
        rows += bench_block(shape, batch, dtype, device, not (args.no_compile or args.smoke))
        print(f"done {shape}", file=sys.stderr)
    header = report_header("bench_blocks: ResNet-50 bottlenecks",
                           f"{str(dtype).split('.')[-1]}, batch {batch}")
    table = format_table(
        ["block", "mode", "impl", "ms", "p20-p80", "TFLOP/s", "fused speed-up"],
        [[r["block"], r["mode"], r["impl"], f"{r['ms']:.3f}",
          f"{r['ms_p20']:.3f}-{r['ms_p80']:.3f}", f"{r['tflops']:.1f}",
          f"{r['fused_speedup']:.2f}x"] for r in rows])
    print(header + table)
    write_report(rows, results_stem(args.out or str(RESULTS), "blocks", args.smoke),
                 header + table)


if __name__ == "__main__":
    main()
