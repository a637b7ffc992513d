"""The model benchmark behind `python -m fused_resnet bench`: every column on the same input.

For one arch, each setting (dtype x mode x batch) times every column on the same weights and
the same input, in one process:

- columns: "fused <backend>" (this package's model on that backend: triton, cuda, cpu, auto,
  reference), "fused triton, written operands" (the Triton model with
  `config.operands() == "written"`: relu(bn(y)) and the BN backward's dy written by an
  elementwise pass for plain conv loops, instead of applied on load), "eager NCHW" and
  "eager channels_last" (the pure-PyTorch twin: torchvision's
  model where it has one), "compile" and "compile max-autotune" (`torch.compile` of the
  eager channels_last twin);
- modes: "train" (zero_grad, forward, cross-entropy, backward, SGD step: fused on CUDA;
  in fp16 through a GradScaler, whose inf check the fused step takes on the device),
  "infer" (eval forward under no_grad at the batch sizes) and "latency" (the same at
  `latency_batch`);
  with `cuda_graphs` every column's step (the training step too: forward, backward and the
  optimizer's update) is captured once after its warm-up runs and replayed, which takes the
  host's launch costs out of the time (autocast then runs without its cast cache);
- dtypes: "fp32" (TF32 off), "tf32" (fp32 tensors, TF32 convs and matmuls), "bf16" and
  "fp16" (autocast; weights, BN parameters and statistics stay fp32).

TFLOP/s counts 2 FLOPs per multiply-add of `count_flops` (a training step as 3x the
forward); "% of peak" divides by the GPU's dense datasheet peak for the dtype
(`hardware.py`), or with `measure_peaks` by the rate of a large matrix product measured on the
card in this run ("peak_tflops" holds the divisor).
"activation MiB" is what autograd keeps for backward in one training forward (measured with
saved-tensor hooks, on every device); "peak MiB" is what the timed runs allocate at their peak
(`torch.cuda.max_memory_allocated`) above what was allocated when they began ("held_mib":
every column's model, optimizer state and gradients, the inputs), so columns compare alike
whatever another column keeps (CUDA only). A column that fails in a setting gets a row with
its error instead of stopping the run.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fused_resnet.bench.hardware import datasheet_tflops, default_device, measure_ceilings
from fused_resnet.bench.timing import activation_bytes, cuda_graph, time_columns
from fused_resnet.flops import count_flops
from fused_resnet.models import build_model, is_cifar, reference_twin, set_backend
from fused_resnet.testing import DTYPES
from fused_resnet.train.graphed import prime_momentum_buffers

FUSED_COLUMNS = ("triton", "triton-written", "cuda", "cpu", "auto", "reference")
# Fused columns that run a backend with the training chain's operands written, not on load.
OPERAND_COLUMNS = {"triton-written": ("triton", "written")}
OTHER_COLUMNS = ("eager-nchw", "eager-cl", "compile", "compile-max-autotune")
COLUMNS = FUSED_COLUMNS + OTHER_COLUMNS
MODES = ("train", "infer", "latency")
ROW_FIELDS = ("arch", "device", "dtype", "mode", "batch", "image_size", "column", "cuda_graphs",
              "ms", "ms_p20", "ms_p80", "ms_p90", "images_per_s", "tflops", "peak_tflops",
              "pct_peak", "peak_mib", "held_mib", "activation_mib", "error", "vs_eager_cl",
              "vs_compile")
BENCH_DTYPES = ("fp32", "tf32", "bf16", "fp16")
LABELS = {**{c: f"fused {c}" for c in FUSED_COLUMNS},
          "triton-written": "fused triton, written operands", "eager-nchw": "eager NCHW",
          "eager-cl": "eager channels_last", "compile": "compile",
          "compile-max-autotune": "compile max-autotune"}


def default_columns(device: torch.device) -> tuple[str, ...]:
    """Every column that runs at full speed on `device` (Triton on CPU only interprets)."""
    if device.type == "cuda":
        return ("triton", "triton-written", "cuda", "eager-nchw", "eager-cl", "compile",
                "compile-max-autotune")
    return ("cpu", "eager-nchw", "eager-cl")


@dataclass
class SuiteConfig:
    arch: str = "resnet50"
    variant: str = "v1.5"
    batch_sizes: tuple[int, ...] = (256,)
    latency_batch: int = 1
    dtypes: tuple[str, ...] = ("bf16",)
    modes: tuple[str, ...] = MODES
    columns: Optional[tuple[str, ...]] = None  # None: default_columns(device)
    image_size: Optional[int] = None  # None: 32 for CIFAR nets, 224 on CUDA, 64 on CPU
    layout: str = "channels_last"  # memory format of the fused and compiled columns' input
    cuda_graphs: bool = False  # replay every mode's step from a captured CUDA graph
    measure_peaks: bool = False  # "% of peak" over a measured matmul rate, not the datasheet
    warmup: int = 2
    iters: int = 5
    device: Optional[str] = None

    def check(self) -> torch.device:
        """Raises ValueError naming the first bad field; returns the device."""
        dev = default_device(self.device)
        for name, values, allowed in (("dtypes", self.dtypes, BENCH_DTYPES),
                                      ("modes", self.modes, MODES),
                                      ("columns", self.columns or (), COLUMNS)):
            bad = [v for v in values if v not in allowed]
            if bad or not (values or name == "columns"):
                raise ValueError(f"{name} must be a non-empty subset of {allowed}, got {values}")
        if not self.batch_sizes or min(self.batch_sizes) < 1 or self.latency_batch < 1:
            raise ValueError(f"batch sizes must be >= 1, got batch_sizes={self.batch_sizes}, "
                             f"latency_batch={self.latency_batch}")
        if self.layout not in ("channels_last", "nchw"):
            raise ValueError(f"layout must be 'channels_last' or 'nchw', got {self.layout!r}")
        if self.cuda_graphs and dev.type != "cuda":
            raise ValueError("cuda_graphs needs a CUDA device")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size must be >= 1 (or None: the default), got "
                             f"{self.image_size}")
        if self.iters < 1 or self.warmup < 0:
            raise ValueError(f"iters must be >= 1 and warmup >= 0, got {self.iters}, "
                             f"{self.warmup}")
        return dev

    def size(self, dev: torch.device) -> int:
        if self.image_size is not None:
            return self.image_size
        return 32 if is_cifar(self.arch) else 224 if dev.type == "cuda" else 64

    def settings(self) -> list[tuple[str, str, int]]:
        """(dtype, mode, batch) in run order."""
        out = []
        for dtype in self.dtypes:
            for mode in self.modes:
                for batch in ((self.latency_batch,) if mode == "latency" else self.batch_sizes):
                    out.append((dtype, mode, batch))
        return out


@contextlib.contextmanager
def column_context(label: str, dtype: str, device: torch.device,
                   graphs: bool = False) -> Iterator[None]:
    """What a column's runs happen in: `precision` (`graphs`: without autocast's cast
    cache), and the operand mode of the Triton training chain (`OPERAND_COLUMNS`; the
    default elsewhere)."""
    mode = {LABELS[c]: m for c, (_, m) in OPERAND_COLUMNS.items()}.get(label)
    with contextlib.ExitStack() as stack:
        if mode is not None:
            from fused_resnet.triton.config import operands_mode

            stack.enter_context(operands_mode(mode))
        stack.enter_context(precision(dtype, device, cache=not graphs))
        yield


@contextlib.contextmanager
def precision(dtype: str, device: torch.device, cache: bool = True) -> Iterator[None]:
    """TF32 on only for "tf32"; autocast to bf16 / fp16 for those dtypes. `cache=False`
    turns off autocast's cache of the weights' casts, as CUDA graph capture needs: a cast
    cached by a run before the capture lives outside the graph's memory pool and is freed
    when the autocast context closes, while the graph would go on reading it."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    tf32 = dtype == "tf32"
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    half = DTYPES.get(dtype) if dtype in ("bf16", "fp16") else None
    try:
        with torch.autocast(device.type, dtype=half, enabled=half is not None,
                            cache_enabled=cache):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def build_columns(cfg: SuiteConfig, base: nn.Module, dev: torch.device,
                  columns: tuple[str, ...]) -> dict[str, tuple[nn.Module, torch.memory_format]]:
    """{label: (model on dev, input memory format)} for the requested columns."""
    layout = torch.channels_last if cfg.layout == "channels_last" else torch.contiguous_format
    cl = torch.channels_last
    twin, _ = reference_twin(cfg.arch, base, cfg.variant)
    out = {}
    for column in columns:
        if column in FUSED_COLUMNS:
            backend = OPERAND_COLUMNS.get(column, (column,))[0]
            model, fmt = set_backend(copy.deepcopy(base), backend), layout
        elif column == "eager-nchw":
            model, fmt = copy.deepcopy(twin), torch.contiguous_format
        elif column == "eager-cl":
            model, fmt = copy.deepcopy(twin), cl
        else:
            mode = "max-autotune" if column == "compile-max-autotune" else None
            eager = copy.deepcopy(twin).to(dev, memory_format=cl)
            model, fmt = torch.compile(eager, mode=mode, dynamic=False), layout
        out[LABELS[column]] = (model.to(dev, memory_format=fmt), fmt)
    return out


def make_optimizer(model: nn.Module, dev: torch.device) -> torch.optim.SGD:
    """Every column's SGD (momentum 0.9): on CUDA the fused update (one multi-tensor kernel,
    and GradScaler's inf check read on the device), from zero momentum buffers (exact for
    dampening 0, and safe when fp16's first step overflows: `train.graphed`)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9,
                          fused=True if dev.type == "cuda" else None)
    prime_momentum_buffers(opt)
    return opt


def _step(model: nn.Module, mode: str, x, target, opt, dtype: str) -> Callable[[], None]:
    if mode == "train":
        if dtype == "fp16":  # a fresh scaler per setting: its scale made by the first call
            scaler = torch.amp.GradScaler(x.device.type)

            def train_step() -> None:
                opt.zero_grad(set_to_none=True)
                scaler.scale(F.cross_entropy(model(x).float(), target)).backward()
                scaler.step(opt)
                scaler.update()
            return train_step

        def train_step() -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x).float(), target).backward()
            opt.step()
        return train_step

    @torch.no_grad()
    def infer() -> None:
        model(x)
    return infer


def run_suite(cfg: SuiteConfig, progress: bool = True) -> list[dict]:
    """One row per (setting, column); see the module docstring for the columns."""
    dev = cfg.check()
    columns = cfg.columns or default_columns(dev)
    size = cfg.size(dev)
    kwargs = {} if is_cifar(cfg.arch) else {"variant": cfg.variant}
    base = build_model(cfg.arch, **kwargs)
    macs_per_image = count_flops(base, (1, 3, size, size), training=False).macs
    models = build_columns(cfg, base, dev, columns)
    opts = {label: make_optimizer(m, dev) for label, (m, _) in models.items()}
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    settings = cfg.settings()
    peaks = {d: (measure_ceilings(dev, d, n=8192 if dev.type == "cuda" else 512)[0]
                 if cfg.measure_peaks else datasheet_tflops(device_name, d)) for d in cfg.dtypes}
    bar = _progress(len(settings), progress)
    rows: list[dict] = []
    try:
        for dtype, mode, batch in settings:
            bar.set_description(f"{dtype} {mode} batch {batch}")
            x = torch.randn(batch, 3, size, size, device=dev)
            target = torch.randint(0, base.fc.out_features, (batch,), device=dev)
            fns, failed = {}, {}
            for label, (model, fmt) in models.items():
                model.train(mode == "train")
                xf = x.contiguous(memory_format=fmt)
                try:
                    with column_context(label, dtype, dev, cfg.cuda_graphs):
                        fn = _step(model, mode, xf, target, opts[label], dtype)
                        fn()  # first call: compile, autotune, fold BN
                        if cfg.cuda_graphs:
                            fn = cuda_graph(fn)
                    fns[label] = _in_context(fn, label, dtype, dev, cfg.cuda_graphs)
                except Exception as exc:  # noqa: BLE001 - one column's failure is a row, not a crash
                    failed[label] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            timings = _time_setting(fns, failed, dev, cfg)
            flops = 2 * macs_per_image * batch * (3 if mode == "train" else 1)
            for label, (model, fmt) in models.items():
                row = {"arch": cfg.arch, "device": device_name, "dtype": dtype,
                       "mode": mode, "batch": batch, "image_size": size, "column": label,
                       "cuda_graphs": cfg.cuda_graphs}
                if label in failed:
                    rows.append({**dict.fromkeys(ROW_FIELDS), **row, "error": failed[label]})
                    continue
                t, peak, held = timings[label]
                tflops = flops / t.median / 1e9
                act = None
                if mode == "train":
                    with column_context(label, dtype, dev, cfg.cuda_graphs):
                        xf = x.contiguous(memory_format=fmt)
                        act = activation_bytes(model, lambda m=model, xf=xf: m(xf)) / 2**20
                pct = None if peaks[dtype] is None else 100.0 * tflops / peaks[dtype]
                rows.append({**row, "ms": t.median, "ms_p20": t.p20, "ms_p80": t.p80,
                             "ms_p90": t.p90, "images_per_s": batch / t.median * 1e3,
                             "tflops": tflops, "peak_tflops": peaks[dtype], "pct_peak": pct,
                             "peak_mib": peak, "held_mib": held, "activation_mib": act,
                             "error": ""})
            bar.update(1)
    except KeyboardInterrupt:
        # A time limit's SIGINT (benchmarks/gpu_session.sh) keeps the settings that finished.
        if not rows:
            raise
        done = len({(r["dtype"], r["mode"], r["batch"]) for r in rows})
        print(f"\ninterrupted: reporting the {done} of {len(settings)} settings that ran",
              file=sys.stderr)
    bar.close()
    add_ratios(rows)
    return rows


def _time_setting(fns: dict, failed: dict, dev: torch.device, cfg: SuiteConfig) -> dict:
    """{label: (Timing, peak MiB, held MiB; None, None elsewhere than CUDA)} of the columns
    that ran; a column whose timed runs raise moves to `failed`. On CUDA one column at a time,
    each with its own peak (above what is allocated as it starts: the module docstring);
    elsewhere interleaved, so that load on the machine hits every column alike."""
    if dev.type != "cuda":
        try:
            return {k: (t, None, None) for k, t in time_columns(fns, dev, cfg.warmup,
                                                                  cfg.iters).items()}
        except Exception as exc:  # noqa: BLE001
            failed.update(dict.fromkeys(fns, f"{type(exc).__name__}: {exc}"[:200]))
            return {}
    out = {}
    for label, fn in fns.items():
        gc.collect()  # garbage of an earlier column (autograd graphs in reference cycles)
        torch.cuda.synchronize(dev)
        held = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        try:
            timing = time_columns({label: fn}, dev)[label]
        except Exception as exc:  # noqa: BLE001
            failed[label] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            continue
        peak = torch.cuda.max_memory_allocated(dev) - held
        out[label] = (timing, peak / 2**20, held / 2**20)
    return out


def _in_context(fn: Callable[[], None], label: str, dtype: str, dev: torch.device,
                graphs: bool):
    def run() -> None:
        with column_context(label, dtype, dev, graphs):
            fn()
    return run


def add_ratios(rows: list[dict]) -> None:
    """Each row's speed over eager channels_last's and over compile's in the same setting
    (img/s ratio: > 1 means faster), where those columns ran."""
    def key(r):
        return r["arch"], r["dtype"], r["mode"], r["batch"]

    speed = {(key(r), r["column"]): r["images_per_s"] for r in rows if not r["error"]}
    for r in rows:
        for name, column in (("vs_eager_cl", "eager channels_last"), ("vs_compile", "compile")):
            other = speed.get((key(r), column))
            r[name] = r["images_per_s"] / other if other and not r["error"] else None


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit="setting", leave=False)

