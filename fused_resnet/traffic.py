"""Work and memory traffic of a fused model's step, counted without a GPU.

`python -m fused_resnet traffic --arch resnet50 --dtype bf16 --batch 256` runs the fused
Triton model's training step (forward and backward) or inference call on CPU tensors with
every Triton launch counted instead of run (`counted_launches`): per kernel variant
(`triton.launch.profile_label`) its launches, FLOPs and bytes (`triton.launch.launch_work`:
useful conv FLOPs; the span of each tensor argument, each storage once, i.e. the compulsory
traffic). Beside them, the ATen ops the step runs around the kernels (`AtenTraffic`: the
bytes of each op's tensor arguments and results; views, allocations and the package's own
ops, whose insides are counted, left out). With a GPU's peaks (default the H100 SXM's), each
row gets the time its FLOPs and bytes need at those peaks, max(FLOPs / FLOP/s, bytes / B/s),
and their sum is the step's roofline floor: what a change to the kernels' traffic is worth,
before a GPU measures it. Nothing is computed: the values the kernels would write are
garbage, and the shapes are real.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fused_resnet.bench.hardware import roofline_ms
from fused_resnet.flags import check_at_least
from fused_resnet.models import ARCH_HELP, IMAGENET_ARCHS
from fused_resnet.table import format_table
from fused_resnet.triton.launch import add_work, tensor_spans

# label -> [launches (or calls), FLOPs, bytes]
Counts = dict[str, list]


@contextlib.contextmanager
def counted_launches() -> Iterator[Counts]:
    """Within the block Triton launches are not run but counted into the yielded dict (label
    -> [launches, FLOPs, bytes], `triton.launch.counting_work`), and the fused backends take
    CPU tensors as they do under `triton.aot.compile_only`. Every launch must go through
    `triton.launch` (`launch`, `run`): one that does not is an error on leaving the block
    (it would be missing from the counts, and from a profile's variant table). Needs
    TRITON_INTERPRET unset (the interpreter picks its own tile sizes and splits, not a
    GPU's)."""
    try:
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction
    except ImportError as exc:
        raise RuntimeError(f"counting launches needs Triton (pip install triton): {exc}") \
            from exc

    from fused_resnet.triton import config
    from fused_resnet.triton.launch import counting_work

    if config.interpreting():
        raise RuntimeError("counting launches needs TRITON_INTERPRET unset (the interpreter "
                           "runs its own tile sizes and splits, not a GPU's)")
    reached = [0]  # launches that got to Triton
    jit_run, tuner_run = JITFunction.run, Autotuner.run

    def skip(self, *args, grid, warmup=False, **kwargs):
        reached[0] += 1
        if isinstance(self, Autotuner):
            self.best_config = None  # chose nothing: `launch` caches no config

    JITFunction.run = Autotuner.run = skip
    config.set_compile_only(90)  # the backends' "Triton takes CUDA tensors" check lifted
    try:
        with counting_work() as counts:
            yield counts
    finally:
        config.set_compile_only(None)
        JITFunction.run, Autotuner.run = jit_run, tuner_run
    counted = sum(row[0] for label, row in counts.items() if label.startswith("fr::"))
    if counted != reached[0]:
        raise RuntimeError(f"{reached[0] - counted} Triton launches bypassed triton.launch "
                           "(launch / run): they are not counted")


class AtenTraffic(TorchDispatchMode):
    """Counts the ATen ops run inside it into `counts` ("aten::<op>" -> [calls, 0, bytes of
    their tensor arguments and results]). Views and allocations move no data and are left
    out, as are the package's own ops (`fused_resnet::*`), whose insides come through
    here too."""

    def __init__(self, counts: Counts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if (getattr(func, "is_view", False) or name.startswith(("empty", "new_empty"))
                or func.namespace != "aten" or name in ("detach", "lift_fresh", "alias")):
            return out
        add_work(self.counts, f"aten::{name}", 0,
                 tensor_spans(tree_flatten((args, kwargs, out))[0]))
        return out


def step_counts(arch: str, dtype: str, batch: int, mode: str = "train",
                operands: str = "on_load", image_size: int | None = None) -> Counts:
    """The counts of one step of the fused Triton `arch` (a training step's forward and
    backward, or an inference call after the first, which folds the BNs) at `batch` images,
    autocast to `dtype` (bf16 / fp16) or fp32, with the training chain's `operands` mode."""
    from fused_resnet.compile_check import DTYPES
    from fused_resnet.models import build_model, is_cifar
    from fused_resnet.triton.config import operands_mode

    if mode not in ("train", "infer"):
        raise ValueError(f"mode must be 'train' or 'infer', got {mode!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    size = image_size or (32 if is_cifar(arch) else 224)
    torch.manual_seed(0)
    model = build_model(arch, backend="triton").to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    model.train(mode == "train")

    def step() -> None:
        autocast = torch.autocast("cpu", dtype=DTYPES[dtype], enabled=dtype != "fp32")
        if mode == "train":
            with autocast:
                out = model(x)
            out.float().sum().backward()
        else:
            with torch.no_grad(), autocast:
                model(x)

    if mode == "infer":  # uncounted: the first call folds each BN into its conv (cached)
        with counted_launches():
            step()
    with counted_launches() as counts, operands_mode(operands), AtenTraffic(counts):
        step()
    return dict(counts)


def roofline_rows(counts: Counts, tflops: float, tb_per_s: float) -> list[tuple]:
    """(label, launches, GFLOP, GB, FLOP a byte, roofline ms) per label, slowest first, and a
    last row "all" whose ms is the sum: the floor at `tflops` and `tb_per_s`."""
    rows = []
    for label, (n, flops, nbytes) in counts.items():
        ms = roofline_ms(flops, nbytes, tflops, tb_per_s)
        rows.append((label, n, flops / 1e9, nbytes / 1e9,
                     flops / nbytes if nbytes else 0.0, ms))
    rows.sort(key=lambda r: -r[-1])
    total = [sum(r[i] for r in rows) for i in (1, 2, 3)]
    rows.append(("all", total[0], total[1], total[2],
                 total[1] / total[2] if total[2] else 0.0, sum(r[-1] for r in rows)))
    return rows


# Archs whose 3x3 convs are grouped: no Triton kernel, so `traffic` cannot count them.
GROUPED_ARCHS = ("resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d")
TRAFFIC_ARCH_HELP = ARCH_HELP.replace(", ".join(IMAGENET_ARCHS), ", ".join(
    a for a in IMAGENET_ARCHS if a not in GROUPED_ARCHS))


def cmd_traffic(args: argparse.Namespace) -> int:
    """`python -m fused_resnet traffic`: the step's FLOPs and compulsory bytes per kernel
    variant against a GPU's peaks (the floor a step cannot beat)."""
    from fused_resnet.bench.hardware import device_peak

    if args.arch in GROUPED_ARCHS:
        raise ValueError(f"--arch {args.arch}: its grouped 3x3 convolutions have no Triton "
                         f"kernel, so there is no fused Triton step to count; --arch takes "
                         f"{TRAFFIC_ARCH_HELP}")
    if args.mode == "infer" and args.operands is not None:
        raise ValueError("--operands sets the training chain's operand mode; inference has "
                         "no such choice (drop --operands or use --mode train)")
    operands = args.operands or "on_load"
    peak = device_peak(args.gpu)
    if peak is None:
        raise ValueError(f"--gpu must name a GPU of fused_resnet/bench/hardware.py's table "
                         f"(H100, H200, A100, ...), got {args.gpu!r}")
    for name in ("batch", "image_size", "rows"):
        check_at_least(args, name)
    counts = step_counts(args.arch, args.dtype, args.batch, args.mode, operands,
                         args.image_size)
    tflops = peak.tflops_for("tf32" if args.dtype == "fp32" else args.dtype)
    rows = roofline_rows(counts, tflops, peak.tb_per_s)
    *kinds, total = rows
    chain = f", operands {operands}" if args.mode == "train" else ""
    print(f"{args.arch} {args.mode} step, batch {args.batch}, {args.dtype}{chain}: Triton "
          f"launches (fr::) and ATen ops (aten::), at the {peak.name}'s "
          f"{tflops:g} TFLOP/s and {peak.tb_per_s:g} TB/s\n")
    print(format_table(("kernel variant / op", "calls", "GFLOP", "GB", "FLOP/B", "ms at peak"),
                       [(k, n, f"{f:.1f}", f"{b:.2f}", f"{ai:.0f}", f"{ms:.3f}")
                        for k, n, f, b, ai, ms in kinds[:args.rows] + [total]]))
    if len(kinds) > args.rows:
        print(f"({len(kinds) - args.rows} more rows: --rows)")
    by_source = {src: sum(r[3] for r in kinds if r[0].startswith(src))
                 for src in ("fr::", "aten::")}
    print(f"\nfloor {total[5]:.2f} ms: {total[2] / tflops:.2f} ms of FLOPs alone, "
          f"{total[3] / peak.tb_per_s:.2f} ms of bytes alone ({by_source['fr::']:.1f} GB Triton, "
          f"{by_source['aten::']:.1f} GB ATen)")
    return 0
