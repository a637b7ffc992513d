"""Launching the autotuned conv kernels (fwd, dgrad, wgrad): through Triton's autotuner the
first time per tuning key, then with the config it chose, straight to the JIT function; the
pinned config when one is set (`config.pin_config`, deterministic mode, the interpreter); and
inside a profiler range per kernel variant while torch's profiler records."""

import threading

import torch

from fused_resnet.triton.config import compile_only_arch, pinned_config

# The config the autotuner chose, per (kernel, its tuning key): later launches with that key
# call the JIT function with it directly. Triton's Autotuner.run rebuilds its key on every
# launch by testing each of the ~35 arguments' names against a list of names and formatting
# every tensor's dtype as a string; this key takes the key arguments from precomputed
# positions and one dtype (`_tuning_key`; a ResNet-50 batch-1 inference call, 53 launches:
# 0.6 ms less host time on a 2-core VM, and ~2 us a launch more from the one dtype).
_chosen: dict[tuple, object] = {}
_key_positions: dict[int, tuple[int, ...]] = {}
_first_launch = threading.Lock()


def clear_launch_cache() -> None:
    """Forget the configs `launch` took from the autotuners (they tune again on next use)."""
    _chosen.clear()


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
