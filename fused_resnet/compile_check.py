"""Compile every Triton kernel a model launches, for a GPU architecture, without a GPU.

`python -m fused_resnet compile --arch 90 --dtype bf16` runs a fused model's training step
(forward and backward) and its inference (chained folded convs, and the single-launch
bottleneck where a block allows it) at real shapes, with every Triton launch turned into a
compile for sm_90 (`fused_resnet.triton.aot.compile_only`): every specialization the model
needs, with every autotuner config. It prints what ptxas gave each kernel (shared memory,
registers, stack bytes: a stack means spilled registers; SASS instructions and subroutine
CALLs: 64-bit integer division, which has no instruction) and fails when a kernel does not
compile or needs more shared memory than the architecture has. Nothing runs: this checks that a
GPU run can start, not what it computes (the interpreter tests and `validate` do that).
"""

from __future__ import annotations

import csv
from typing import Callable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# name -> (input shape of the training step, inference batch sizes): the shapes of
# benchmarks/bench_model.py (batch 256, latency at batch 1), so that a cache warmed by
# `compile --jobs N` holds every kernel that benchmark launches.
WORKLOADS: dict[str, tuple[tuple[int, int, int, int], tuple[int, ...]]] = {
    "resnet50": ((256, 3, 224, 224), (256, 1)),
    "resnet18": ((256, 3, 224, 224), (256, 1)),
    "cifar_resnet20": ((256, 3, 32, 32), (256, 1)),
    "blocks": ((2, 3, 64, 64), (2,)),  # a small set for the test suite: see `_blocks`
}


class _Stem(torch.nn.Module):
    """The ResNets' stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool), 32 channels wide."""

    def __init__(self, backend: str) -> None:
        from fused_resnet.nn import FusedMaxPool2d

        super().__init__()
        self.backend = backend
        self.conv1 = torch.nn.Conv2d(3, 32, 7, 2, 3, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(32)
        self.maxpool = FusedMaxPool2d(backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from fused_resnet.nn import conv_bn_relu_pool

        return conv_bn_relu_pool(x, self.conv1, self.bn1, self.maxpool, backend=self.backend)


def _blocks(backend: str) -> torch.nn.Module:
    """The stem, then every block kind at a small shape: projection and identity
    bottlenecks, identity and option-A basic blocks, a dilated bottleneck (a grouped 3x3 is
    not a Triton kernel, so it is left out)."""
    from fused_resnet.nn import FusedBasicBlock, FusedBottleneck

    return torch.nn.Sequential(
        _Stem(backend),  # 3 x 64 x 64 -> 32 x 16 x 16
        FusedBottleneck(32, 16, backend=backend),  # projection 32 -> 64 (1x1 conv + BN)
        FusedBottleneck(64, 16, stride=2, backend=backend),  # 3x3 and projection stride 2
        FusedBottleneck(64, 16, backend=backend),  # identity: the single-launch candidate
        FusedBasicBlock(64, 64, backend=backend),
        FusedBasicBlock(64, 128, stride=2, shortcut="A", backend=backend),  # -> 4 x 4
        # a dilated 3x3 (DIL=2) at stride 2: the dgrad's phases without taps
        FusedBottleneck(128, 32, stride=2, dilation=2, backend=backend),
    )


def build(workload: str, backend: str = "triton") -> torch.nn.Module:
    from fused_resnet.models import build_model

    if workload == "blocks":
        return _blocks(backend)
    return build_model(workload, backend=backend)


def drive(model: torch.nn.Module, shape: tuple[int, ...], batches: tuple[int, ...],
          dtype: torch.dtype) -> None:
    """One training step's forward and backward in each operand mode of the chain
    (`config.operands`), then inference at each batch size, chained and single-launch for
    the bottlenecks the kernel takes; autocast for bf16 / fp16."""
    from fused_resnet.nn import FusedBottleneck
    from fused_resnet.triton.config import BOTTLENECK_EVAL_MAX_MID, OPERAND_MODES, operands_mode

    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)

    def autocast():
        return torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)

    model.train()
    for mode in OPERAND_MODES:  # the chain's transformed operands on load, and written
        with autocast(), operands_mode(mode):
            out = model(x)
            out.float().sum().backward()
    model.eval()
    bottlenecks = [m for m in model.modules() if isinstance(m, FusedBottleneck)
                   and m.conv1.out_channels <= BOTTLENECK_EVAL_MAX_MID]  # the rest must chain
    for eval_kernel in ("chain", "single") if bottlenecks else ("chain",):
        for m in bottlenecks:
            m.eval_kernel = eval_kernel
        for batch in batches:
            with torch.no_grad(), autocast():
                model(x[:batch])


def check(workloads: list[str], dtypes: list[str], arch: int, workers: int = 1,
          progress: Callable[[str], None] = lambda _: None):
    """Drives each workload in each dtype with the launches recorded, then compiles them
    in `workers` processes; returns the `aot.Builds`."""
    from fused_resnet.triton.aot import compile_only

    with compile_only(arch, workers) as made:
        for workload in workloads:
            shape, batches = WORKLOADS[workload]
            for name in dtypes:
                progress(f"recording the launches of {workload} in {name}")
                torch.manual_seed(0)
                drive(build(workload), shape, batches, DTYPES[name])
        progress(f"compiling for sm_{arch} in {workers} process(es)")
    return made


def summary_rows(builds) -> list[tuple]:
    """Per kernel: builds, most shared memory, most registers, builds with a stack, builds
    with subroutine calls, builds whose wgmma wait for each other (`KernelBuild.
    wgmma_in_flight` 0, not counting a loop of one K step: `one_k_step`), autotuner
    candidates over the shared memory (which the autotuner skips), failures."""
    rows = []
    for name in sorted({b.name for b in builds}):
        mine = [b for b in builds if b.name == name]
        ok = [b for b in mine if b.error is None]
        regs = [b.registers for b in ok if b.registers is not None]
        spilled = [b for b in ok if b.stack]
        worst = max(spilled, key=lambda b: b.stack, default=None)
        rows.append((name, len(mine), f"{max((b.shared for b in ok), default=0) / 1024:.0f}",
                     max(regs, default="-"), len(spilled),
                     f"{worst.stack} B: {worst.tile} [{worst.variant}]" if worst else "-",
                     sum(bool(b.calls) for b in ok),
                     sum(b.wgmma_in_flight == 0 and not b.one_k_step for b in ok),
                     sum(b.skipped_by_autotuner for b in ok),
                     sum(bool(b.problems()) for b in mine)))
    return rows


SUMMARY_HEADER = ("kernel", "builds", "max shared KiB", "max regs", "builds with stack",
                  "largest stack", "builds with calls", "wgmma serialized",
                  "candidates over shared", "cannot launch")
BUILD_FIELDS = ("arch", "name", "dtype", "variant", "tile", "num_warps", "num_stages",
                "autotuned", "shared", "registers", "stack", "instructions", "calls",
                "wgmma_in_flight", "error")


def serialized_variants(builds) -> list[tuple[str, str, str, int]]:
    """(kernel, dtype, variant, candidates) where every autotuner candidate that uses wgmma
    (and that the autotuner can launch) waits for each K step's MMAs, none keeping a group
    in flight: whichever of them it picks, the tensor cores idle while the loop issues its
    loads and math. `candidates` counts those (a candidate without wgmma, a 32-row tile on
    mma.sync, is not one; nor is a loop of one K step, `KernelBuild.one_k_step`). Empty
    without cuobjdump, or for an architecture without wgmma."""
    groups: dict[tuple[str, str, str], list] = {}
    for b in builds:
        if (b.autotuned and b.error is None and not b.skipped_by_autotuner
                and b.wgmma_in_flight is not None and not b.one_k_step):
            groups.setdefault((b.name, b.dtype, b.variant), []).append(b.wgmma_in_flight)
    return sorted((*key, len(found)) for key, found in groups.items()
                  if all(n == 0 for n in found))


def write_csv(path: str, reports: list) -> None:
    """Every build of every `aot.Builds` in `reports`, one row each (BUILD_FIELDS)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(BUILD_FIELDS)
        for report in reports:
            for b in report:
                writer.writerow([getattr(b, k) for k in BUILD_FIELDS])
