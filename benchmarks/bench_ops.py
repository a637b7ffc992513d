"""Per-op benchmark: fused conv + BN (+ residual) + ReLU vs eager cuDNN vs torch.compile.

For every distinct conv of ResNet-50 (shapes read off the model), in one process and on the
same inputs, times three implementations of z = relu?(BN(conv(x)) + residual):
  fused   - fr.ops.conv_bn_act on the chosen backend (Triton by default),
  fused cuda - the same op on the `_C` fallback (cuDNN conv + fused BN kernels), on GPU,
  eager   - F.conv2d -> F.batch_norm -> add -> relu in channels_last (cuDNN on GPU),
  compile - torch.compile of the eager function,
in three modes: "train" (forward with batch statistics), "train+bwd" (forward + backward)
and "eval" (forward with running statistics). Times are medians (and 20/80 quantiles) of
triton.testing.do_bench on GPU, of repeated runs on CPU. TFLOP/s counts 2 FLOPs per MAC
(x3 with backward); GB/s divides the compulsory traffic (read x, w, residual; write z; and
with backward also read dz, write dx, dw) by the time.

    python benchmarks/bench_ops.py --batch 128 256 --dtype bf16       # GPU: writes results/
    python benchmarks/bench_ops.py --smoke                            # CPU: tiny shapes
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the Triton kernels run in the interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

import fused_resnet as fr  # noqa: E402
from fused_resnet.bench import report_header, results_dir, time_ms, write_report  # noqa: E402,E501
from fused_resnet.table import format_table  # noqa: E402
from fused_resnet.testing import DTYPES  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def resnet50_conv_shapes():
    """Distinct (c_in, c_out, kernel, stride, padding, h_in, residual, relu) of ResNet-50."""
    model = fr.models.resnet50()
    report = fr.count_flops(model, (1, 3, 224, 224), training=False)
    shapes = []
    for row in report.rows:
        if row.kind != "conv":
            continue
        conv = model.get_submodule(row.name)
        residual = row.name.endswith("conv3")  # the bottleneck's expand conv ends the block
        relu = "downsample" not in row.name
        shape = (conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0],
                 conv.padding[0], row.output_shape[2] * conv.stride[0], residual, relu)
        if shape not in shapes:
            shapes.append(shape)
    return shapes


def eager(x, w, gamma, beta, mean, var, residual, stride, padding, training, relu):
    y = F.batch_norm(F.conv2d(x, w, None, stride, padding), mean, var, gamma, beta, training)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def bench_shape(shape, batch, dtype, device, backend, use_compile):
    c_in, c_out, k, stride, padding, h, residual, relu = shape
    ho = (h + 2 * padding - k) // stride + 1
    cl = torch.channels_last
    x = torch.randn(batch, c_in, h, h, device=device, dtype=dtype).contiguous(memory_format=cl)
    w = (torch.randn(c_out, c_in, k, k, device=device) * (2 / (c_in * k * k)) ** 0.5).to(dtype)
    w = w.contiguous(memory_format=cl).requires_grad_()
    x.requires_grad_()
    gamma = torch.ones(c_out, device=device, requires_grad=True)
    beta = torch.zeros(c_out, device=device, requires_grad=True)
    mean, var = torch.zeros(c_out, device=device), torch.ones(c_out, device=device)
    r = (torch.randn(batch, c_out, ho, ho, device=device, dtype=dtype).contiguous(memory_format=cl)
         if residual else None)
    dz = torch.randn(batch, c_out, ho, ho, device=device, dtype=dtype).contiguous(memory_format=cl)
    impls = {
        "fused": lambda training: fr.ops.conv_bn_act(
            x, w, gamma, beta, mean, var, stride=stride, padding=padding, training=training,
            residual=r, relu=relu, backend=backend),
        **({"fused cuda": lambda training: fr.ops.conv_bn_act(
            x, w, gamma, beta, mean, var, stride=stride, padding=padding, training=training,
            residual=r, relu=relu, backend="cuda")} if device.type == "cuda" and
           backend != "cuda" else {}),
        "eager": lambda training: eager(x, w, gamma, beta, mean, var, r, stride, padding,
                                        training, relu),
    }
    if use_compile:
        compiled = torch.compile(eager)
        impls["compile"] = lambda training: compiled(x, w, gamma, beta, mean, var, r, stride,
                                                     padding, training, relu)
    macs = batch * ho * ho * c_out * c_in * k * k
    size = torch.finfo(dtype).bits // 8
    fwd_bytes = size * (x.numel() + w.numel() + 2 * dz.numel() + (dz.numel() if residual else 0))
    bwd_bytes = size * (dz.numel() + x.numel() + w.numel() + x.numel() + w.numel())
    rows = []
    for mode in ("train", "train+bwd", "eval"):
        for name, impl in impls.items():
            if mode == "train+bwd":
                def fn(impl=impl):
                    impl(True).backward(dz)
            else:
                def fn(impl=impl, training=mode == "train"):
                    with torch.no_grad():
                        impl(training)
            t = time_ms(fn, device)
            med, p20, p80 = t.median, t.p20, t.p80
            flops = 2 * macs * (3 if mode == "train+bwd" else 1)
            traffic = fwd_bytes + (bwd_bytes if mode == "train+bwd" else 0)
            rows.append({"shape": f"{c_in}>{c_out} k{k}s{stride} {h}x{h}"
                                  f"{' +res' if residual else ''}{'' if relu else ' norelu'}",
                         "batch": batch, "dtype": str(dtype).split(".")[-1], "mode": mode,
                         "impl": name, "ms": med, "ms_p20": p20, "ms_p80": p80,
                         "tflops": flops / med / 1e9, "gbps": traffic / med / 1e6})
    for row in rows:  # speed-up of fused over each other impl, same shape and mode
        fused = next(r for r in rows if r["mode"] == row["mode"] and r["impl"] == "fused")
        row["fused_speedup"] = row["ms"] / fused["ms"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes (CPU, CI): checks the script, not the speed")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    shapes = resnet50_conv_shapes()
    batches = args.batch
    if args.smoke:  # two shapes, channels / 16, 8x8 maps, batch 2, fp32
        shapes = [(max(3, ci // 16), co // 16, k, s, p, 8, res, relu)
                  for ci, co, k, s, p, _, res, relu in (shapes[0], shapes[-1])]
        batches, dtype = [2], torch.float32
    use_compile = not args.no_compile and not args.smoke
    rows = []
    for batch in batches:
        for shape in shapes:
            rows += bench_shape(shape, batch, dtype, device, args.backend, use_compile)
            print(f"done {shape} batch {batch}", file=sys.stderr)
    table = format_table(
        ["shape", "batch", "mode", "impl", "ms", "p20-p80", "TFLOP/s", "GB/s", "fused speed-up"],
        [[r["shape"], r["batch"], r["mode"], r["impl"], f"{r['ms']:.3f}",
          f"{r['ms_p20']:.3f}-{r['ms_p80']:.3f}", f"{r['tflops']:.1f}", f"{r['gbps']:.0f}",
          f"{r['fused_speedup']:.2f}x"] for r in rows])
    header = report_header("bench_ops: ResNet-50 convs", str(dtype).split(".")[-1])
    print(header + table)
    folder = results_dir(args.out or str(RESULTS))
    stem = os.path.join(folder, "ops-smoke" if args.smoke else "ops")
    write_report(rows, stem, header + table)
    print(f"\nwrote {stem}.csv and .md", file=sys.stderr)


if __name__ == "__main__":
    main()
