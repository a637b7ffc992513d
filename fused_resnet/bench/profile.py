"""`bench --profile COLUMN`: where one column's time goes, kernel by kernel.

Runs the column's step of each of the config's settings under `torch.profiler` (after the
warm-up runs that compile, autotune and fold BN) and returns, per setting, the profiler's
table of the top ops / kernels by self time on the device (CUDA time on a GPU, CPU time
elsewhere): the breakdown that says which kernels to work on when a target is missed.
Below it, the Triton launches by kernel and variant (`variant_table`: the conv forward with
the BN + ReLU prologue and statistics apart from the plain one, and so on), from the ranges
`triton.launch` opens while the profiler records, with each variant's achieved TFLOP/s and
GB/s (its work counted in one more, unprofiled, step) and, on a GPU of `bench.hardware`'s
table, its share of the roofline. With `trace`, each setting's profile is also written as a
Chrome trace (every launch with its grid and the op that made it),
`<trace>-<dtype>-<mode>-<batch>.json.gz`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile

from fused_resnet.bench.hardware import device_peak, roofline_ms
from fused_resnet.bench.suite import (
    SuiteConfig,
    _step,
    build_columns,
    column_context,
    make_optimizer,
)
from fused_resnet.models import build_model, is_cifar
from fused_resnet.triton.launch import counting_work


def profile_column(cfg: SuiteConfig, column: str, steps: int = 3, rows: int = 25,
                   trace: Optional[str] = None) -> str:
    """The profiler tables of `column`, one per setting, as text."""
    dev = cfg.check()
    size = cfg.size(dev)
    base = build_model(cfg.arch, **({} if is_cifar(cfg.arch) else {"variant": cfg.variant}))
    ((label, (model, fmt)),) = build_columns(cfg, base, dev, (column,)).items()
    opt = make_optimizer(model, dev)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda"
                                           else [])
    sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    known = device_peak(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None

    def peak(dtype: str) -> Optional[tuple[float, float]]:  # the roofline's (TFLOP/s, TB/s)
        return None if known is None else (known.tflops_for(dtype), known.tb_per_s)

    out = []
    for dtype, mode, batch in cfg.settings():
        x = torch.randn(batch, 3, size, size, device=dev).contiguous(memory_format=fmt)
        target = torch.randint(0, base.fc.out_features, (batch,), device=dev)
        model.train(mode == "train")
        with column_context(label, dtype, dev):
            fn = _step(model, mode, x, target, opt, dtype)
            for _ in range(max(1, cfg.warmup)):
                fn()
            with counting_work() as counted:  # one more step, its launches' work counted
                fn()
            work = {label: tuple(w) for label, w in counted.items()}
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
                   f"{table}\n{variant_table(averages, dev.type, steps, work, peak(dtype))}")
    return "\n".join(out)


def variant_table(averages, device: str, steps: int,
                  work: Optional[dict[str, tuple[int, int, int]]] = None,
                  peak: Optional[tuple[float, float]] = None) -> str:
    """The Triton launches by kernel and variant (the `fr::` ranges of `triton.launch`), by
    time per step: the profiler's own table lists each kernel once, whatever its variant.
    With `work` (label -> (launches, FLOPs, bytes) of one step, `triton.launch.counting_work`)
    each row also gives its achieved TFLOP/s (conv FLOPs) and GB/s (bytes of its tensor
    arguments), and with `peak` = (TFLOP/s, TB/s) of the device, "% roofline": the time
    those FLOPs and bytes need at the peaks, max(FLOPs / peak FLOP/s, bytes / peak B/s),
    over the time measured. Empty where no Triton kernel ran."""
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
    head = "| kernel variant | launches a step | ms a step | share |"
    if work is not None:
        head += " TFLOP/s | GB/s | % roofline |"
    lines = [f"Triton launches by kernel and variant ({'GPU' if device == 'cuda' else 'CPU'} "
             "time a step)", "", head, "|---" * head.count(" |") + "|"]
    totals = [0.0, 0.0, 0.0]  # ms, FLOPs, bytes a step
    for e in ranges:
        t = ms(e)
        row = f"| {e.key[4:]} | {e.count / steps:g} | {t:.3f} | {100 * t / everything:.1f}% |"
        if work is not None:
            _, flops, nbytes = work.get(e.key, (0, 0, 0))
            row += _rates(t, flops, nbytes, peak)
            totals = [totals[0] + t, totals[1] + flops, totals[2] + nbytes]
        lines.append(row)
    if work is not None:
        lines.append(f"| all | | {totals[0]:.3f} | 100% |{_rates(*totals, peak)}")
    return "\n".join(lines) + "\n"


def _rates(ms: float, flops: float, nbytes: float, peak: Optional[tuple[float, float]]) -> str:
    """' TFLOP/s | GB/s | % roofline |' cells of `ms` a step doing `flops` and `nbytes`."""
    if ms <= 0:
        return " - | - | - |"
    tflops = f"{flops / ms / 1e9:.1f}" if flops else "-"
    roofline = "-"
    if peak is not None:
        roofline = f"{100 * roofline_ms(flops, nbytes, *peak) / ms:.0f}%"
    return f" {tflops} | {nbytes / ms / 1e6:.0f} | {roofline} |"
