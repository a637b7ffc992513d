"""Timing primitives shared by the benchmark suite and the scripts under `benchmarks/`.

A `Timing` holds the median and the 20th / 80th / 90th percentiles of one function's run time
in milliseconds. On CUDA each function is timed on its own by `triton.testing.do_bench` (it
synchronizes, flushes the L2 between runs and picks its own repetition count); on CPU the
functions of one setting are timed in turn, run after run, so that load on the machine hits
them alike (a noisy 2-core VM moves single timings by 10-30%).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Timing:
    median: float
    p20: float
    p80: float
    p90: float

    @classmethod
    def of(cls, times_ms: list[float]) -> Timing:
        """Quantiles of measured times (one run gives that run for every quantile)."""
        if len(times_ms) == 1:
            return cls(*times_ms * 4)
        q = statistics.quantiles(times_ms, n=10, method="inclusive")
        return cls(statistics.median(times_ms), q[1], q[7], q[8])


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 2,
            iters: int = 5) -> Timing:
    """Timing of `fn` (see the module docstring); `warmup` / `iters` apply on CPU only."""
    return time_columns({"fn": fn}, device, warmup, iters)["fn"]


def time_columns(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int = 2,
                 iters: int = 5) -> dict[str, Timing]:
    """{name: Timing} of each function: do_bench one after another on CUDA, interleaved
    `iters` rounds after `warmup` rounds elsewhere."""
    if device.type == "cuda":
        import triton.testing

        out = {}
        for name, fn in fns.items():
            fn()  # compile / autotune outside the timed region
            torch.cuda.synchronize(device)
            out[name] = Timing(*triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8, 0.9]))
        return out
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters must be >= 1 and warmup >= 0, got {iters}, {warmup}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: Timing.of(t) for name, t in times.items()}


def cuda_graph(fn: Callable[[], object], warmup: int = 3) -> Callable[[], None]:
    """`fn` captured once into a CUDA graph (after `warmup` runs on a side stream, as capture
    requires); the returned function replays it. `fn` must use only fixed-address tensors
    (true of inference on a fixed input, and of a training step on one that sets the
    gradients to None first: backward then allocates them in the graph's memory pool, and
    the optimizer's state exists after the warm-up) and must not synchronize with the host
    (no `.item()`; a BN with `momentum=None` reads its counter, a GradScaler its inf check)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def activation_bytes(model: nn.Module, forward: Callable[[], Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward during `forward()` (one
    training forward of `model`), parameters and buffers excluded: the activation memory a
    training step holds at its peak, on any device."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own and storage.nbytes() > 0:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())
