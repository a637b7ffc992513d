"""`bench --profile COLUMN`: where one column's time goes, kernel by kernel.

Runs the column's step of each of the config's settings under `torch.profiler` (after the
warm-up runs that compile, autotune and fold BN) and returns, per setting, the profiler's
table of the top ops / kernels by self time on the device (CUDA time on a GPU, CPU time
elsewhere): the breakdown that says which kernels to work on when a target is missed.
Below it, the Triton conv launches by kernel and variant (`variant_table`: the forward with
the BN + ReLU prologue and statistics apart from the plain one, and so on), from the ranges
`triton.launch.launch` opens while the profiler records. With `trace`, each setting's profile
is also written as a Chrome trace (every launch with its grid and the op that made it),
`<trace>-<dtype>-<mode>-<batch>.json.gz`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile

from fused_resnet.bench.suite import SuiteConfig, _step, build_columns, column_context
from fused_resnet.models import build_model, is_cifar


def profile_column(cfg: SuiteConfig, column: str, steps: int = 3, rows: int = 25,
                   trace: Optional[str] = None) -> str:
    """The profiler tables of `column`, one per setting, as text."""
    dev = cfg.check()
    size = cfg.size(dev)
    base = build_model(cfg.arch, **({} if is_cifar(cfg.arch) else {"variant": cfg.variant}))
    ((label, (model, fmt)),) = build_columns(cfg, base, dev, (column,)).items()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda"
                                           else [])
    sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    out = []
    for dtype, mode, batch in cfg.settings():
        x = torch.randn(batch, 3, size, size, device=dev).contiguous(memory_format=fmt)
        target = torch.randint(0, base.fc.out_features, (batch,), device=dev)
        model.train(mode == "train")
        with column_context(label, dtype, dev):
            fn = _step(model, mode, x, target, opt)
            for _ in range(max(1, cfg.warmup)):
                fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            with profile(activities=activities) as prof:
                for _ in range(steps):
                    fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
        if trace:
            prof.export_chrome_trace(f"{trace}-{dtype}-{mode}-{batch}.json.gz")
        averages = prof.key_averages()
        table = averages.table(sort_by=sort, row_limit=rows)
        out.append(f"## {label}, {cfg.arch}, {dtype} {mode} batch {batch} ({steps} steps)\n\n"
                   f"{table}\n{variant_table(averages, dev.type, steps)}")
    return "\n".join(out)


def variant_table(averages, device: str, steps: int) -> str:
    """The Triton conv launches by kernel and variant (the `fr::` ranges of
    `triton.launch.launch`), by time per step: the profiler's own table lists each kernel
    once, whatever its variant. Empty where no Triton conv ran."""
    # the host-side ranges, whose device time is that of the kernels launched inside them
    # (on a GPU the profiler also lists each range on the device timeline, as a separate
    # entry of the same name)
    ranges = [e for e in averages if e.key.startswith("fr::")
              and str(getattr(e, "device_type", "CPU")).endswith("CPU")]
    if not ranges:
        return ""

    def ms(event) -> float:  # device (CUDA) time, or CPU time without a GPU; us -> ms
        if device == "cuda":
            total = getattr(event, "device_time_total", None)
            if total is None:  # torch < 2.4
                total = event.cuda_time_total
        else:
            total = event.cpu_time_total
        return total / 1000 / steps

    ranges.sort(key=ms, reverse=True)
    everything = sum(ms(e) for e in ranges) or 1.0
    lines = [f"Triton conv launches by variant ({'GPU' if device == 'cuda' else 'CPU'} time "
             "a step)", "", "| kernel variant | launches a step | ms a step | share |",
             "|---|---|---|---|"]
    for e in ranges:
        lines.append(f"| {e.key[4:]} | {e.count / steps:g} | {ms(e):.3f} | "
                     f"{100 * ms(e) / everything:.1f}% |")
    return "\n".join(lines) + "\n"
