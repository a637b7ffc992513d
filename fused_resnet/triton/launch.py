"""Launching the autotuned conv kernels (fwd, dgrad, wgrad): through Triton's autotuner the
first time per tuning key, then with the config it chose, straight to the JIT function; the
pinned config when one is set (`config.pin_config`, deterministic mode, the interpreter); and
inside a profiler range per kernel variant while torch's profiler records."""

import threading

import torch
from torch import Tensor

from fused_resnet.triton.config import compile_only_arch, pinned_config

# The config the autotuner chose, per (kernel, its tuning key): later launches with that key
# call the JIT function with it directly. Triton's Autotuner.run rebuilds its key on every
# launch by testing each of the ~35 arguments' names against a list of names and formatting
# every tensor's dtype as a string; this key is the same values from precomputed positions
# (a ResNet-50 batch-1 inference call, 53 launches: 0.6 ms less host time on a 2-core VM).
_chosen: dict[tuple, object] = {}
_key_positions: dict[int, tuple[int, ...]] = {}
_first_launch = threading.Lock()


def clear_launch_cache() -> None:
    """Forget the configs `launch` took from the autotuners (they tune again on next use)."""
    _chosen.clear()


def _tuning_key(kernel, args: tuple, kwargs: dict) -> tuple:
    """The autotuner's key for a launch: the values of its key arguments and the dtypes of
    the tensors (what Autotuner.run keys its cache by; tensors are passed positionally)."""
    positions = _key_positions.get(id(kernel))
    if positions is None:
        positions = tuple(kernel.arg_names.index(name) for name in kernel.keys)
        _key_positions[id(kernel)] = positions
    n = len(args)
    return (id(kernel), *(args[i] if i < n else kwargs[kernel.arg_names[i]] for i in positions),
            *(a.dtype for a in args if isinstance(a, Tensor)))


def _config_kwargs(config) -> dict:
    """A triton.Config as the keyword arguments Autotuner.run launches it with."""
    if hasattr(config, "all_kwargs"):
        return config.all_kwargs()
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


# Flags that name a conv launch's variant in the profiler (`launch`): the transformed-operand
# loops (PROLOGUE, BN_BWD) cost 1.5-3x the plain ones in SASS, the statistics epilogue
# (STATS) ~1600 instructions a tile; a profile should say what each costs in time.
_VARIANT_FLAGS = ("FLAT_K", "FLAT", "PROLOGUE", "BN_BWD", "STATS", "REDUCE", "HAS_RES")


def profile_label(kernel, kwargs: dict) -> str:
    """The profiler range of a conv launch: 'fr::conv_fwd 3x3 prologue stats'."""
    name = kernel.fn.fn.__name__.strip("_").removesuffix("_kernel")
    flags = [flag.lower() for flag in _VARIANT_FLAGS if kwargs.get(flag)]
    return " ".join([f"fr::{name}", f"{kwargs['KH']}x{kwargs['KW']}", *flags])


def launch(kernel, grid, *args, **kwargs) -> None:
    """Runs an autotuned kernel (through its autotuner the first time per tuning key, then
    with the config it chose), or its plain JIT function with the pinned config; inside a
    `profile_label` range while torch's profiler records (an attribute read otherwise)."""
    if getattr(torch.autograd.profiler, "_is_profiler_enabled", False):
        with torch.profiler.record_function(profile_label(kernel, kwargs)):
            _launch(kernel, grid, *args, **kwargs)
    else:
        _launch(kernel, grid, *args, **kwargs)


def _launch(kernel, grid, *args, **kwargs) -> None:
    config = pinned_config()
    if config is not None:
        kernel.fn[grid](*args, **kwargs, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                        BLOCK_K=config.block_k, num_warps=config.num_warps,
                        num_stages=config.num_stages)
        return
    key = _tuning_key(kernel, args, kwargs)
    chosen = _chosen.get(key)
    if chosen is not None:
        kernel.fn[grid](*args, **kwargs, **chosen)
        return
    # best_config is set by Autotuner.run (None: this launch chose nothing). The lock keeps
    # another thread's first launch (nn.DataParallel's replicas) from setting it in between.
    with _first_launch:
        kernel.best_config = None
        kernel[grid](*args, **kwargs)
        chosen = kernel.best_config
    if chosen is not None and compile_only_arch() is None:
        _chosen[key] = _config_kwargs(chosen)
