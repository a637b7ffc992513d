"""Which implementation runs an op: "auto" | "triton" | "cuda" | "cpu" | "reference".

- "reference": the pure-PyTorch ops of `fused_resnet.reference` (every device, every dtype).
- "cpu" / "cuda": the C++ / CUDA kernels of the compiled extension `fused_resnet._C`.
- "triton": the Triton kernels of `fused_resnet.triton`.
- "auto": the fastest implementation available for the tensor's device, else "reference";
  Triton only for CUDA tensors (TRITON_INTERPRET=1 runs it on CPU tensors, but only when
  asked for by name).

`FUSED_RESNET_BACKEND`, when set and not empty, replaces "auto" (an explicitly named backend
wins over it). Under a torch.func transform or in a forward-mode AD dual level
(`transform_reason`) every op runs on "reference", whatever was asked for, warned.
Each op declares which backends implement it; asking for one that does not, or that cannot
run here, raises an error that names what is missing.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from types import ModuleType
from typing import Optional

import torch
import torch.autograd.forward_ad as _forward_ad

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")
ENV_VAR = "FUSED_RESNET_BACKEND"

# Backends that implement each op, in the order "auto" prefers them.
OP_BACKENDS: dict[str, tuple[str, ...]] = {
    "conv_bn_act": ("triton", "cuda", "cpu", "reference"),
    "residual_block": ("triton", "cuda", "cpu", "reference"),
    "bn_add_relu": ("cuda", "triton", "cpu", "reference"),
    # ATen's max_pool2d on every backend but Triton (`_C` has no pool of its own)
    "max_pool": ("triton", "cuda", "cpu", "reference"),
}


_forced: Optional[str] = None

# torch.func's stack of transforms (grad, vmap, jvp, jacrev, ...): an interpreter object
# while one runs around the call, None otherwise (~30 ns a question).
_FUNCTORCH_TOP = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack",
                         lambda: None)


@getattr(torch.compiler, "assume_constant_result", lambda fn: fn)
def _functorch_active() -> bool:
    """Whether a torch.func transform runs around the call. While dynamo traces, it runs
    this once and takes the answer as a constant of the graph (its guards on torch.func's
    stack recompile where that changes); it would judge `peek_interpreter_stack() is None`
    wrongly itself (torch 2.14: always "a transform")."""
    return _FUNCTORCH_TOP() is not None


def transform_reason() -> Optional[str]:
    """Why fused kernels cannot run here: a torch.func transform (grad, vmap, jvp, jacrev,
    functional per-sample gradients) runs around the call, or forward-mode AD's dual level
    (`torch.autograd.forward_ad.dual_level`) is open. The fused ops are autograd Functions
    and custom ops without functorch rules or a jvp, and Triton launches that read raw
    pointers; the reference ops (torch functions) support both. torch.func.functional_call
    alone is no transform. None otherwise. Under torch.compile too: a compiled function
    that calls torch.func.grad or jvp over fused code traces the reference ops."""
    if _functorch_active():
        return "a torch.func transform (grad, vmap, jvp, ...) runs around it"
    if getattr(_forward_ad, "_current_level", -1) >= 0:
        return "forward-mode AD (a torch.autograd.forward_ad.dual_level) is open"
    return None


# The TorchDispatchModes active around the call: how many (~50 ns a question), the i-th.
_DISPATCH_MODES = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)
_DISPATCH_MODE_AT = getattr(torch._C, "_get_dispatch_stack_at", None)


def _counting_flops() -> bool:
    """Whether torch's FlopCounterMode is among the dispatch modes around the call."""
    count = _DISPATCH_MODES()
    if not count or _DISPATCH_MODE_AT is None:
        return False
    return any(type(_DISPATCH_MODE_AT(i)).__module__ == "torch.utils.flop_counter"
               for i in range(count))


def ops_recorded() -> bool:
    """Whether the fused ops must run as the custom ops `torch.ops.fused_resnet.*`, which a
    tracer or FlopCounterMode sees as one op each, rather than by the eager shortcuts that
    skip the dispatcher (autograd.Function twins, kernels called directly, inference
    plans): while torch.compile / export traces, and under torch's FlopCounterMode, which
    counts the custom ops by `ops.flop_formulas` and would see no op at all for the Triton
    kernels. Other dispatch modes (an op logger, `traffic.AtenTraffic`) see the ATen ops
    inside the eager path, as they did."""
    return torch.compiler.is_compiling() or _counting_flops()


@contextlib.contextmanager
def forced_backend(backend: str) -> Iterator[None]:
    """Inside the block every op resolves to `backend`, whatever name the caller passed (used by
    `count_flops` to see the architecture's ATen ops instead of the fused custom ops)."""
    global _forced
    check_backend_name(backend)
    previous, _forced = _forced, backend
    try:
        yield
    finally:
        _forced = previous


_extension: Optional[ModuleType] = None
_extension_tried = False


def load_extension() -> Optional[ModuleType]:
    """The compiled `fused_resnet._C`, or None (with one warning) when it was not built.
    (Cached in module globals, not functools.cache, which torch.compile warns about.)"""
    global _extension, _extension_tried
    if not _extension_tried:
        _extension_tried = True
        try:
            from fused_resnet import _C
        except ImportError as exc:
            warnings.warn(
                f"fused_resnet._C is not built ({exc}); the 'cpu' and 'cuda' backends are "
                "unavailable and 'auto' falls back to the reference ops. Build it with "
                "`pip install --no-build-isolation -e .`.",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            _extension = _C
    return _extension


def check_backend_name(backend: str, argument: str = "backend") -> str:
    """Returns `backend` if it is one of BACKENDS, else raises ValueError naming `argument`."""
    if backend not in BACKENDS:
        raise ValueError(f"{argument} must be one of {BACKENDS}, got {backend!r}")
    return backend


def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why `backend` cannot run on `device` here, or None when it can."""
    if backend == "reference":
        return None
    if backend == "triton":
        config = _triton_config()
        if config is None:
            return "Triton is not installed (pip install triton)"
        interpreting = config.interpreting()  # TRITON_INTERPRET=1 when the kernels were made
        if (device.type != "cuda" and not interpreting
                and config.compile_only_arch() is None):  # aot.compile_only: CPU tensors
            return "Triton runs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)"
        return interpreter_problem() if interpreting else None
    ext = load_extension()
    if ext is None:
        return "fused_resnet._C is not built (pip install --no-build-isolation -e .)"
    if backend == "cpu" and device.type != "cpu":
        return f"the 'cpu' backend runs CPU tensors, got a {device.type} tensor"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the 'cuda' backend runs CUDA tensors, got a {device.type} tensor"
        if not ext.has_cuda_kernels():
            return ("fused_resnet._C was built without its CUDA part (needs nvcc of torch's CUDA "
                    f"major version, {torch.version.cuda}, at build time)")
    return None


_triton_config_module: Optional[ModuleType] = None
_triton_tried = False


def _triton_config() -> Optional[ModuleType]:
    """`fused_resnet.triton.config`, or None where Triton does not import (tried once: this
    runs twice a block call, and import statements cost ~1 us each)."""
    global _triton_config_module, _triton_tried
    if not _triton_tried:
        _triton_tried = True
        try:
            import triton  # noqa: F401
        except ImportError:
            return None
        from fused_resnet.triton import config

        _triton_config_module = config
    return _triton_config_module


_interpreter_problem: Optional[str] = None
_interpreter_checked = False


def interpreter_problem() -> Optional[str]:
    """Why Triton's interpreter cannot run the kernels here, or None (checked once).

    - Triton < 3.5 (torch <= 2.8): 3.1 computes wrong convolutions, 3.2 / 3.3 lack builder
      methods the kernels need, 3.4 has no fp64 tl.dot (tried on these kernels).
    - Triton 3.5 / 3.6 with NumPy >= 2.4: a loop bound becomes an int through int() of a
      1-element array, which NumPy 2.4 refuses (TypeError); Triton 3.7 squeezes it first.
    """
    global _interpreter_problem, _interpreter_checked
    if not _interpreter_checked:
        _interpreter_checked = True
        import numpy
        import triton

        from fused_resnet.triton.config import triton_version

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NumPy 1.25 - 2.3: a DeprecationWarning
            try:
                int(numpy.zeros(1))
                refused = False
            except TypeError:
                refused = True
        running = f"the interpreter of Triton {triton.__version__} (TRITON_INTERPRET=1)"
        if triton_version() < (3, 5):
            _interpreter_problem = (f"{running} cannot run these kernels; the interpreter "
                                    "needs Triton>=3.5")
        elif triton_version() < (3, 7) and refused:
            _interpreter_problem = (f"{running} fails with NumPy {numpy.__version__}; install "
                                    "numpy<2.4 or Triton>=3.7")
    return _interpreter_problem


def resolve(backend: str, op: str, device: torch.device, exclude: tuple[str, ...] = ()) -> str:
    """The concrete backend that runs `op` on `device` for the requested `backend` name;
    "auto" skips the backends in `exclude` (those that cannot run this particular call).
    "reference" under a torch.func transform or forward-mode AD (`transform_reason`)."""
    check_backend_name(backend)
    transform = transform_reason()
    if transform is not None:
        # (while dynamo compiles, the warning breaks the graph: the transform then runs
        # eagerly, where torch 2.14's traced jvp over a BN fails)
        warnings.warn(f"fused_resnet's {op} runs on the reference ops: {transform}",
                      stacklevel=3)
        return "reference"
    if _forced is not None:
        backend = _forced
    if backend == "auto":
        backend = check_backend_name(os.environ.get(ENV_VAR) or "auto", argument=ENV_VAR)
    implemented = OP_BACKENDS[op]
    if backend == "auto":
        for candidate in implemented:
            if candidate in exclude or (candidate == "triton" and device.type != "cuda"):
                continue
            if unavailable_reason(candidate, device) is None:
                return candidate
        return "reference"
    if backend not in implemented:
        raise NotImplementedError(
            f"backend {backend!r} does not implement {op} yet; it is implemented by {implemented}"
        )
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} cannot run {op}: {reason}")
    return backend
