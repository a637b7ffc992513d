"""Per-stage breakdown: every distinct residual block of an arch, timed on each backend.

The blocks are found by running the model once (forward pre-hooks record each block's input
shape) and deduplicated by shape; each distinct block is copied out of the model with its
weights and timed, in one process on the same input, as "train" (forward + backward of a
fixed output gradient) and "eval" (forward under no_grad) on each backend column ("triton",
"cuda", "cpu", "reference" = the eager ops), plus "compile" (torch.compile of the reference
block) and, for eval of stride-1 identity bottlenecks on Triton, "triton single" (the
single-launch kernel). Each row carries the block's key in the per-shape backend table
(`fused_resnet.tuning`), and `fastest_backends` turns rows into table entries.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from fused_resnet.backend import unavailable_reason
from fused_resnet.bench.hardware import default_device
from fused_resnet.bench.suite import precision
from fused_resnet.bench.timing import time_columns
from fused_resnet.flops import count_flops
from fused_resnet.models import build_model, is_cifar
from fused_resnet.nn.blocks import FusedBottleneck, ResidualBlock
from fused_resnet.triton.config import BOTTLENECK_EVAL_MAX_MID
from fused_resnet.tuning import CHOICES, SINGLE_LAUNCH

BLOCK_BACKENDS = ("triton", "cuda", "cpu", "reference")


def distinct_blocks(model: nn.Module, image_size: int) -> list[tuple[str, ResidualBlock, tuple]]:
    """(name of the first block of each shape, the block, its input shape at batch 1)."""
    shapes: dict[str, tuple] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            shapes.setdefault(name, tuple(args[0].shape))
        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules()
             if isinstance(m, ResidualBlock)]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, image_size, image_size))
    finally:
        for h in hooks:
            h.remove()
    seen, out = set(), []
    for name, shape in shapes.items():
        block = model.get_submodule(name)
        signature = (type(block).__name__, block.shortcut_kind(), shape,
                     tuple((c.out_channels, c.stride[0]) for c, _ in block.main_path()))
        if signature not in seen:
            seen.add(signature)
            out.append((name, block, shape))
    return out


def default_block_columns(device: torch.device) -> tuple[str, ...]:
    """The backends that run on `device` at full speed (Triton only on CUDA), and compile."""
    usable = [b for b in BLOCK_BACKENDS if unavailable_reason(b, device) is None
              and (b != "triton" or device.type == "cuda")]
    return (*usable, "compile") if device.type == "cuda" else tuple(usable)


def bench_stages(arch: str, *, batch: int, dtype: str, image_size: Optional[int] = None,
                 columns: Optional[tuple[str, ...]] = None, device: Optional[str] = None,
                 warmup: int = 2, iters: int = 5, channels_last: bool = True,
                 variant: str = "v1.5") -> list[dict]:
    """One row per (distinct block, mode, column)."""
    dev = default_device(device)
    size = image_size or (32 if is_cifar(arch) else 224)
    model = build_model(arch, **({} if is_cifar(arch) else {"variant": variant}))
    columns = columns or default_block_columns(dev)
    bad = [c for c in columns if c not in BLOCK_BACKENDS + ("compile",)]
    if bad:
        raise ValueError(f"columns must be among {BLOCK_BACKENDS + ('compile',)}, got {bad}")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    rows = []
    for name, block, shape in distinct_blocks(model, size):
        x = torch.randn(batch, *shape[1:], device=dev).contiguous(memory_format=fmt)
        x.requires_grad_()
        macs = count_flops(block, (1, *shape[1:]), training=False).macs * batch
        modules = {}
        for column in columns:
            module = copy.deepcopy(block).to(dev, memory_format=fmt)
            module.backend = "reference" if column == "compile" else column
            modules[column] = torch.compile(module) if column == "compile" else module
        if "triton" in modules and isinstance(block, FusedBottleneck):
            single = copy.deepcopy(modules["triton"])
            single.eval_kernel = "single"
            if single._single_launch_eval() and block.conv2.out_channels <= (
                    BOTTLENECK_EVAL_MAX_MID):
                modules[SINGLE_LAUNCH] = single
        with torch.no_grad(), precision(dtype, dev):
            dz = torch.randn_like(block.to(dev, memory_format=fmt).train()(x))
        for mode in ("train", "eval"):
            fns = {}
            for column, module in modules.items():
                if column == SINGLE_LAUNCH and mode == "train":
                    continue
                module.train(mode == "train")
                fns[column] = _block_step(module, x, dz, mode, dtype, dev)
            with precision(dtype, dev):
                key = block.train(mode == "train").tuning_key(x)
            for column, t in time_columns(fns, dev, warmup, iters).items():
                flops = 2 * macs * (3 if mode == "train" else 1)
                rows.append({"block": name, "input": "x".join(map(str, shape[1:])),
                             "key": key, "dtype": dtype, "batch": batch, "mode": mode,
                             "column": column, "ms": t.median, "ms_p20": t.p20,
                             "ms_p80": t.p80, "tflops": flops / t.median / 1e9})
    return rows


def _block_step(module: nn.Module, x, dz, mode: str, dtype: str, dev: torch.device):
    def step() -> None:
        with precision(dtype, dev):
            if mode == "train":
                module(x).backward(dz)
            else:
                with torch.no_grad():
                    module(x)
    return step


def fastest_backends(rows: list[dict], margin: float = 0.03) -> dict[str, str]:
    """{table key: choice} for each (block, mode): the fastest backend column (or "triton
    single", the single-launch eval kernel), kept only when it beats the one `auto` picks
    without a table (the first of BLOCK_BACKENDS measured) by more than `margin` (3%), else
    that default - so noise does not flip choices."""
    out = {}
    for key in dict.fromkeys(r["key"] for r in rows):
        times = {r["column"]: r["ms"] for r in rows if r["key"] == key and r["column"] in
                 CHOICES}
        if not any(b in times for b in BLOCK_BACKENDS):
            continue
        default = next(b for b in BLOCK_BACKENDS if b in times)
        best = min(times, key=times.get)
        out[key] = best if times[best] < (1 - margin) * times[default] else default
    return out
