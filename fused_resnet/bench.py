"""`python -m fused_resnet bench`: training-step and inference timings of a model, side by side.

Columns, all in one process on the same input: this package's model on each requested backend,
the eager reference model (torchvision's where it exists) in NCHW and in channels_last, and
optionally `torch.compile` of the reference. Each timing is the median of `iters` runs after
`warmup` runs (CUDA-synchronized on GPU), with the 20th and 80th percentiles; TFLOP/s counts
2 FLOPs per multiply-add, with a training step taken as 3x the forward's MACs.
"""

from __future__ import annotations

import copy
import csv
import datetime
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fused_resnet.flops import count_flops
from fused_resnet.models import build_model, is_cifar, reference_twin, set_backend
from fused_resnet.testing import DTYPES


@dataclass
class BenchRow:
    column: str
    mode: str  # "train" or "infer"
    batch: int
    ms_median: float
    ms_p20: float
    ms_p80: float
    images_per_s: float
    tflops: float
    peak_mem_mb: Optional[float]


def time_ms(fn: Callable[[], None], device: torch.device, warmup: int = 2, iters: int = 5):
    """(median, 20th, 80th percentile) of fn's time in ms: triton.testing.do_bench on CUDA
    (it flushes the L2 and picks its own repetitions), else `iters` timed runs after
    `warmup` untimed ones."""
    if device.type == "cuda":
        try:
            import triton.testing
        except ImportError:
            pass
        else:
            return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return statistics.median(times), q[1], q[7]


def bench(
    arch: str = "resnet50",
    backends: tuple[str, ...] = ("auto",),
    *,
    batch_size: Optional[int] = None,
    image_size: Optional[int] = None,
    dtype: str = "fp32",
    modes: tuple[str, ...] = ("train", "infer"),
    compile_model: bool = False,
    warmup: int = 2,
    iters: int = 5,
    device: Optional[str] = None,
) -> list[BenchRow]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype not in DTYPES or dtype == "fp64":
        raise ValueError(f"dtype must be one of fp32, bf16, fp16; got {dtype!r}")
    half = DTYPES[dtype] if dtype != "fp32" else None
    size = image_size or (32 if is_cifar(arch) else 224 if dev.type == "cuda" else 64)
    batch = batch_size or (64 if dev.type == "cuda" else 4)
    base = build_model(arch)
    fwd_macs = count_flops(base, (1, 3, size, size), training=False).macs * batch
    columns: dict[str, tuple[nn.Module, torch.memory_format]] = {}
    for name in backends:
        model = set_backend(copy.deepcopy(base), name)
        columns[f"fused_resnet[{name}]"] = (model, torch.channels_last)
    ref, _ = reference_twin(arch, base)
    columns["eager NCHW"] = (ref, torch.contiguous_format)
    columns["eager channels_last"] = (copy.deepcopy(ref), torch.channels_last)
    if compile_model:
        columns["torch.compile"] = (torch.compile(copy.deepcopy(ref)), torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=dev)
    target = torch.randint(0, base.fc.out_features, (batch,), device=dev)
    rows = []
    for column, (model, fmt) in columns.items():
        for mode in modes:
            med, p20, p80, peak = _time_mode(model.to(dev, memory_format=fmt), mode,
                                             x.contiguous(memory_format=fmt), target, half,
                                             warmup, iters)
            flops = 2 * fwd_macs * (3 if mode == "train" else 1)
            rows.append(BenchRow(column, mode, batch, med, p20, p80, batch / med * 1e3,
                                 flops / med / 1e9, peak))
    return rows


def _time_mode(model: nn.Module, mode: str, x, target, half, warmup: int, iters: int):
    """Median, p20, p80 (ms) and peak CUDA memory (MiB, or None) of one mode of `model`:
    "train" = forward + backward + SGD step, "infer" = eval forward under no_grad."""
    dev = x.device
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train_step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=half, enabled=half is not None):
            loss = F.cross_entropy(model(x).float(), target)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def infer():
        with torch.autocast(dev.type, dtype=half, enabled=half is not None):
            model(x)

    model.train(mode == "train")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    med, p20, p80 = time_ms(train_step if mode == "train" else infer, dev, warmup, iters)
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    return med, p20, p80, peak


def device_label() -> str:
    """The GPU's name, or "cpu"."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def report_header(title: str, details: str) -> str:
    """A markdown title line naming the device, torch and Triton versions and the date."""
    try:
        import triton

        versions = f"torch {torch.__version__}, triton {triton.__version__}"
    except ImportError:
        versions = f"torch {torch.__version__}"
    return f"# {title} on {device_label()}, {versions}, {details}, {datetime.date.today()}\n\n"


def results_stem(out_dir: str, kind: str, smoke: bool) -> str:
    """`<out_dir>/<gpu>-<date>-<kind>[-smoke]` (the folder is created)."""
    os.makedirs(out_dir, exist_ok=True)
    name = f"{device_label().replace(' ', '_')}-{datetime.date.today()}-{kind}"
    return os.path.join(out_dir, name + ("-smoke" if smoke else ""))


def write_report(rows: list[dict], stem: str, text: str) -> None:
    """Writes `rows` to `<stem>.csv` and the printed report `text` to `<stem>.md`."""
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(f"{stem}.md", "w") as f:
        f.write(text + "\n")
