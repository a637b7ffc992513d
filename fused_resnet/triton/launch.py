"""Launching the Triton kernels. The autotuned conv kernels (fwd, dgrad, wgrad, `launch`)
go through Triton's autotuner the first time per tuning key, then with the config it chose
straight to the JIT function; the pinned config when one is set (`config.pin_config`,
deterministic mode, the interpreter). Every kernel (`launch`, `run`) runs inside a profiler
range per kernel variant while torch's profiler records, and inside `counting_work` its work
(FLOPs, bytes) is counted per range, for `bench --profile`'s achieved TFLOP/s and GB/s."""

import contextlib
import threading
from collections.abc import Iterator
from typing import Optional

import torch

from fused_resnet.triton.config import compile_only_arch, pinned_config

# The config the autotuner chose, per (kernel, its tuning key): later launches with that key
# call the JIT function with it directly. Triton's Autotuner.run rebuilds its key on every
# launch by testing each of the ~35 arguments' names against a list of names and formatting
# every tensor's dtype as a string; this key takes the key arguments from precomputed
# positions and one dtype (`_tuning_key`; a ResNet-50 batch-1 inference call, 53 launches:
# 0.6 ms less host time on a 2-core VM, and ~2 us a launch more from the one dtype).
_chosen: dict[tuple, object] = {}
_chosen_generation = 0  # moves on when _chosen is cleared (PreparedLaunch asks again)
_key_positions: dict[int, tuple[int, ...]] = {}
_first_launch = threading.Lock()


def clear_launch_cache() -> None:
    """Forget the configs `launch` took from the autotuners (they tune again on next use)."""
    global _chosen_generation
    _chosen.clear()
    _chosen_generation += 1


def _tuning_key(kernel, args: tuple, kwargs: dict) -> tuple:
    """A launch's key among the configs chosen: the values of the autotuner's key arguments
    (shape and variant flags) and the dtype of the kernel's first argument (x or dy: every
    conv kernel's operands share it, and which fp32 tensors come beside them follows from
    the variant flags). Autotuner.run keys by the dtypes of every tensor argument as well
    (~25 of them: ~2 us a launch); where that tells two of its keys apart that this one does
    not (a bias given or not), the config tuned for the first serves both."""
    positions = _key_positions.get(id(kernel))
    if positions is None:
        positions = tuple(kernel.arg_names.index(name) for name in kernel.keys)
        _key_positions[id(kernel)] = positions
    n = len(args)
    return (id(kernel), args[0].dtype,
            *[args[i] if i < n else kwargs[kernel.arg_names[i]] for i in positions])


def _config_kwargs(config) -> dict:
    """A triton.Config as the keyword arguments Autotuner.run launches it with."""
    if hasattr(config, "all_kwargs"):
        return config.all_kwargs()
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


# Flags that name a launch's variant in the profiler (`launch`, `run`): the transformed-
# operand conv loops (PROLOGUE, BN_BWD) cost 1.5-3x the plain ones in SASS, the statistics
# epilogue (STATS) ~1600 instructions a tile; a profile should say what each costs in time.
_VARIANT_FLAGS = ("FLAT_K", "FLAT", "PROLOGUE", "BN_BWD", "ACT", "SUB", "STATS", "STATS_ONLY",
                  "REDUCE", "REDUCE_ACT", "BN_OUT", "HAS_RES", "RES_BN", "TAP_RES", "HAS_BN2",
                  "TWO", "WRITE_DY", "WRITE_DR", "WRITE_BITS", "WRITE_ARG", "FINAL")
# Per profiler range (`profile_label`), the work of the launches made inside
# `counting_work`: [launches, useful FLOPs, bytes] (`launch_work`), for `bench --profile` to
# divide by the ranges' device time. Counted in a step of its own, not in the profiled ones:
# ~20 us of Python a launch would distort a host-bound profile (batch 1).
_work: dict[str, list] = {}
_counting = False


def kernel_name(kernel) -> str:
    """'conv_fwd' for _conv_fwd_kernel, whether given as its autotuner or its JIT function."""
    fn = kernel.fn  # Autotuner.fn: the JITFunction; JITFunction.fn: the Python function
    fn = getattr(fn, "fn", fn)
    return fn.__name__.strip("_").removesuffix("_kernel")


def profile_label(kernel, kwargs: dict) -> str:
    """The profiler range of a launch: 'fr::conv_fwd 3x3 prologue stats', 'fr::conv_dgrad
    3x3d2' (dilated by 2), 'fr::bn_act_fwd has_res'."""
    size = []
    if "KH" in kwargs:
        dilated = f"d{kwargs['DIL']}" if kwargs.get("DIL", 1) > 1 else ""
        size = [f"{kwargs['KH']}x{kwargs['KW']}{dilated}"]
    flags = [flag.lower() for flag in _VARIANT_FLAGS if kwargs.get(flag)]
    return " ".join([f"fr::{kernel_name(kernel)}", *size, *flags])


def launch_work(kernel, args: tuple, kwargs: dict) -> tuple[int, int]:
    """(useful FLOPs, bytes) of one launch. FLOPs: a conv kernel's 2 * M * C_out * C_in *
    KH * KW (M: the output pixels of fwd and wgrad; dgrad's pixel slots per stride phase, as
    many wherever the output is the input's size over the stride, as in every ResNet conv),
    the single-launch bottleneck's three convs (its recomputed halo not counted),
    0 for the rest. Bytes: the span of every tensor argument, each storage once (the
    compulsory traffic where each is read or written once; an argument passed but unused,
    e.g. a stand-in pointer, counts too, so pass one that is used), except a conv's input
    read at a stride larger than its kernel (a 1x1 stride-2 conv reads a quarter of it): the
    rows and columns its taps land on."""
    named = dict(zip(kernel.arg_names, args), **kwargs)
    read = {}
    if "KH" in named:
        flops = 2 * named["M"] * named["C_out"] * named["C_in"] * named["KH"] * named["KW"]
        x = named.get("x_ptr")
        s, kh, kw = named["stride"], named["KH"], named["KW"]
        if isinstance(x, torch.Tensor) and x.dim() == 4 and (s > kh or s > kw):
            rows = min(named["H"], named["Ho"] * kh) if s > kh else named["H"]
            cols = min(named["W"], named["Wo"] * kw) if s > kw else named["W"]
            read[x.untyped_storage().data_ptr()] = (x.shape[0] * rows * cols * named["C_in"]
                                                    * x.element_size())
    elif "C_mid" in named:
        c, mid = named["C"], named["C_mid"]
        flops = 2 * named["M"] * (2 * c * mid + 9 * mid * mid)
    else:
        flops = 0
    return flops, tensor_spans(named.values(), read)


SECTOR = 32  # bytes: the unit a GPU reads from memory


def tensor_spans(values, read: Optional[dict[int, int]] = None) -> int:
    """Bytes spanned by the tensors among `values`, each storage once: from the first byte
    any of its views starts at to the last byte any ends at; or, where a storage is seen
    through one view only whose elements are strided with contiguous runs of at least a
    sector (x[:, :, ::2, ::2] of a channels_last x), the bytes of its elements; or `read`'s
    bytes for a storage (a caller that knows which part a kernel reads), where fewer."""
    spans: dict[int, list] = {}  # storage -> [first byte, end, its views, dense bytes]
    for t in values:
        if isinstance(t, torch.Tensor) and t.numel() > 0:
            start = t.storage_offset() * t.element_size()
            end = start + t.element_size() * (
                1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())))
            key = t.untyped_storage().data_ptr()
            view = (t.storage_offset(), tuple(t.shape), t.stride())
            entry = spans.setdefault(key, [start, end, set(), _dense_bytes(t)])
            entry[0], entry[1] = min(entry[0], start), max(entry[1], end)
            entry[2].add(view)
    total = 0
    for key, (start, end, views, dense) in spans.items():
        nbytes = min(end - start, dense) if len(views) == 1 else end - start
        total += min(nbytes, (read or {}).get(key, nbytes))
    return total


def _dense_bytes(t: torch.Tensor) -> int:
    """The bytes of t's elements where its innermost contiguous run is at least a sector
    long (reading them moves about that much), else a sector per run."""
    run = 1
    for n, s in sorted(((n, s) for n, s in zip(t.shape, t.stride()) if n > 1),
                       key=lambda d: abs(d[1])):
        if abs(s) != run:
            break
        run *= n
    nbytes = run * t.element_size()
    return t.numel() // run * max(nbytes, SECTOR)


def add_work(counts: dict[str, list], label: str, flops: int, nbytes: int) -> None:
    """One more call of `label` doing `flops` and `nbytes`, in counts' [calls, FLOPs, bytes]."""
    row = counts.setdefault(label, [0, 0, 0])
    row[0], row[1], row[2] = row[0] + 1, row[1] + flops, row[2] + nbytes


@contextlib.contextmanager
def counting_work() -> Iterator[dict[str, list]]:
    """Within the block every launch (`launch`, `run`) adds its work to the yielded dict:
    label (`profile_label`) -> [launches, FLOPs, bytes] (`launch_work`)."""
    global _counting
    _work.clear()
    _counting = True
    try:
        yield _work
    finally:
        _counting = False


def _observed(kernel, args: tuple, kwargs: dict):
    """The launch's profiler range (or a null context), its work counted if asked."""
    label = profile_label(kernel, kwargs)
    if _counting:
        add_work(_work, label, *launch_work(kernel, args, kwargs))
    if getattr(torch.autograd.profiler, "_is_profiler_enabled", False):
        return torch.profiler.record_function(label)
    return contextlib.nullcontext()


def _observing() -> bool:
    return _counting or getattr(torch.autograd.profiler, "_is_profiler_enabled", False)


def launch(kernel, grid, *args, **kwargs) -> None:
    """Runs an autotuned kernel (through its autotuner the first time per tuning key, then
    with the config it chose), or its plain JIT function with the pinned config; inside a
    `profile_label` range while torch's profiler records, its work counted inside
    `counting_work` (an attribute read otherwise)."""
    if _observing():
        with _observed(kernel, args, kwargs):
            _launch(kernel, grid, *args, **kwargs)
    else:
        _launch(kernel, grid, *args, **kwargs)


def run(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) for a JIT kernel that is not autotuned (BN statistics,
    elementwise), observed as `launch` observes its kernels."""
    if _observing():
        with _observed(kernel, args, kwargs):
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def _pinned_kwargs(config) -> dict:
    """A pinned TileConfig as the keyword arguments of a launch."""
    return dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                num_warps=config.num_warps, num_stages=config.num_stages)


def _launch(kernel, grid, *args, **kwargs) -> None:
    config = pinned_config()
    if config is not None:
        kernel.fn[grid](*args, **kwargs, **_pinned_kwargs(config))
        return
    key = _tuning_key(kernel, args, kwargs)
    chosen = _chosen.get(key)
    if chosen is not None:  # JITFunction.run: what kernel.fn[grid](...) calls, without the
        kernel.fn.run(*args, grid=grid, warmup=False, **kwargs, **chosen)  # lambda it makes
        return
    # best_config is set by Autotuner.run (None: this launch chose nothing). The lock keeps
    # another thread's first launch (nn.DataParallel's replicas) from setting it in between.
    with _first_launch:
        kernel.best_config = None
        kernel[grid](*args, **kwargs)
        chosen = kernel.best_config
    if chosen is not None and compile_only_arch() is None:
        _chosen[key] = _config_kwargs(chosen)


class PreparedLaunch:
    """`launch(kernel, grid, *args, **kwargs)` for launches that repeat with one tuning key:
    the same shapes and flags, other tensors (`conv_prepared`). Once the config is known (the
    autotuner chose it, or one is pinned) a call is one JITFunction.run with the grid
    evaluated and the keyword arguments merged beforehand: no tuning key, no dict merge, no
    grid lambda per launch. Until then, and while a profiler records or work is counted, a
    call is `launch` itself. The config is asked again when the pinned one changes
    (`pin_config`, deterministic mode) or the chosen ones are cleared."""

    __slots__ = ("kernel", "grid", "kwargs", "_ready")

    def __init__(self, kernel, grid, kwargs: dict) -> None:
        self.kernel, self.grid, self.kwargs = kernel, grid, kwargs
        self._ready = None  # (generation, pinned config, grid tuple, all keyword arguments)

    def __call__(self, *args) -> None:
        ready = self._ready
        if (ready is not None and ready[0] == _chosen_generation
                and ready[1] == pinned_config() and not _observing()):
            self.kernel.fn.run(*args, grid=ready[2], warmup=False, **ready[3])
            return
        launch(self.kernel, self.grid, *args, **self.kwargs)
        self._ready = self._resolve(args)

    def _resolve(self, args: tuple) -> Optional[tuple]:
        """What later calls launch with, once `launch` has a config for these arguments."""
        if compile_only_arch() is not None:
            return None
        pinned = pinned_config()
        if pinned is not None:
            config = _pinned_kwargs(pinned)
        else:
            config = _chosen.get(_tuning_key(self.kernel, args, self.kwargs))
            if config is None:
                return None
        merged = {**self.kwargs, **config}
        return (_chosen_generation, pinned, tuple(self.grid(merged)), merged)
