"""`fr.set_deterministic(True)`: bitwise-identical results run to run.

What it fixes, and why that suffices here:
- Triton kernels: autotuning picks tile sizes (and so summation orders) by timing, which can
  differ run to run; in deterministic mode every launch uses the one pinned config
  (`triton.config.PINNED`). The kernels themselves reduce through per-tile partials combined
  in a fixed order (no atomics), so a pinned config gives the same bits every run.
- `_C` kernels: per-thread partial sums combined in a fixed order, no atomics: deterministic
  for a fixed `torch.get_num_threads()` (CPU) and launch configuration (CUDA) already.
- ATen (convolutions, matmuls): `torch.use_deterministic_algorithms(True)`, cuDNN's
  benchmark mode off, and CUBLAS_WORKSPACE_CONFIG=":4096:8" for cuBLAS (it must be in the
  environment before the first cuBLAS call, so set it early or in the shell).
Calling `torch.use_deterministic_algorithms(True)` directly has the same effect on the Triton
kernels: the pinned config follows `torch.are_deterministic_algorithms_enabled()`.
"""

from __future__ import annotations

import os

import torch


def set_deterministic(enabled: bool = True, *, warn_only: bool = False) -> None:
    """Turns deterministic mode on (or off) for this package and for PyTorch."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    torch.backends.cudnn.deterministic = enabled
    if enabled:
        torch.backends.cudnn.benchmark = False


def is_deterministic() -> bool:
    """Whether deterministic mode (torch's flag) is on."""
    return torch.are_deterministic_algorithms_enabled()
