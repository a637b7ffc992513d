"""The precision rule every comparison to the reference uses (DESIGN.md, "Precision").

- fp32 / fp64: |actual - expected| <= atol + rtol * |expected| elementwise, with
  rtol = atol = 1e-4 for outputs and 1e-3 for gradients (sums over large K), or tighter.
- fp16 / bf16: the candidate's max error against an fp64 truth must be at most
  2 x the max error of PyTorch's own eager result in the same dtype against that truth,
  plus a small floor (so a bit-exact baseline does not demand a bit-exact candidate); and,
  where eager is clearly closer to the truth than zeros would be (its max error below half
  the truth's largest value), the candidate must be closer than zeros too: the floor is
  absolute for values below 1, where an all-zero bf16 gradient of values below 8e-3, or a
  running mean never updated, passed it. A floor relative to the values would fail honest
  results instead: on the tiny CPU inputs of `validate`, bf16 / fp16 gradients sit 30-170%
  from the truth, eager's too.
- Ill-conditioned fp32 (`compare_norm`, used by `validate` when the fixed tolerance fails):
  the same 2x rule on L2 norms of the errors. With few values per channel in a BN, fp32
  rounding alone moves some gradients of a ResNet-50 by 15-30% of their size (eager NCHW and
  eager channels_last differ that much); element-wise maxima then swing by 10x between any
  two fp32 implementations, their norms do not.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

TOLERANCES = {"output": 1e-4, "grad": 1e-3}  # rtol = atol for fp32 / fp64
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16,
          "fp16": torch.float16}


@contextlib.contextmanager
def exact_fp32():
    """TF32 off for cuDNN convolutions and matmuls (and so for the Triton kernels, which
    follow cuDNN's flag) while inside; usable as a decorator. fp32 comparisons need it."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@dataclass
class Comparison:
    """Max abs error, error relative to max |expected|, the bound applied and the verdict."""

    max_abs: float
    max_rel: float
    bound: str
    ok: bool


def _max_abs(a: Tensor, b: Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def compare(
    actual: Tensor,
    expected: Tensor,
    *,
    kind: str = "output",
    baseline: Optional[Tensor] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> Comparison:
    """Applies the precision rule to `actual` against `expected`.

    kind: "output" or "grad" (picks the fp32 tolerance).
    baseline: PyTorch's eager result computed in fp16/bf16; `expected` is then the fp64
    truth and the 2x rule applies. Without it the fp32 rule is applied in every dtype.
    compute_dtype: the low precision the results were computed in, which sets the floor
    (default: actual's dtype; pass it for fp32 results of autocast runs, e.g. the loss).
    """
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch: actual {tuple(actual.shape)} vs expected "
                         f"{tuple(expected.shape)}")
    err = _max_abs(actual, expected)
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    rel = err / scale if scale > 0 else err
    if baseline is not None:
        floor = LOW_PRECISION_FLOOR.get(compute_dtype or actual.dtype, TOLERANCES[kind])
        eager = _max_abs(baseline, expected)
        allowed = LOW_PRECISION_FACTOR * eager + floor * max(scale, 1.0)
        # and closer to the truth than zeros would be, where eager clearly is
        ok = err <= allowed and (err < scale or eager >= scale / 2 or err == 0)
        return Comparison(err, rel, f"<= {allowed:.2e} (2x eager + floor)", ok)
    tol = TOLERANCES[kind]
    ok = bool(torch.allclose(actual.double(), expected.double(), rtol=tol, atol=tol))
    return Comparison(err, rel, f"rtol=atol={tol:g}", ok)


def compare_norm(actual: Tensor, expected: Tensor, baseline: Tensor, *,
                 kind: str = "output") -> Comparison:
    """||actual - expected|| <= 2 ||baseline - expected|| + tol ||expected|| (L2 norms), with
    `expected` an fp64 truth and `baseline` eager PyTorch in the candidate's dtype. The
    Comparison reports the norm of the error and its ratio to ||expected||."""
    diff = lambda a: (a.double() - expected.double()).norm().item()  # noqa: E731
    scale = expected.double().norm().item()
    err = diff(actual)
    allowed = LOW_PRECISION_FACTOR * diff(baseline) + TOLERANCES[kind] * scale
    return Comparison(err, err / scale if scale > 0 else err,
                      f"L2 <= {allowed:.2e} (2x eager + floor)", err <= allowed)


def assert_close(actual: Tensor, expected: Tensor, *, kind: str = "output",
                 baseline: Optional[Tensor] = None, compute_dtype: Optional[torch.dtype] = None,
                 name: str = "tensor") -> None:
    """Raises AssertionError with the numbers when `compare` fails."""
    result = compare(actual, expected, kind=kind, baseline=baseline, compute_dtype=compute_dtype)
    if not result.ok:
        raise AssertionError(
            f"{name}: max abs error {result.max_abs:.3e} (relative {result.max_rel:.3e}) "
            f"violates {result.bound}"
        )


def assert_modules_close(module: torch.nn.Module, reference: torch.nn.Module) -> None:
    """Every parameter's gradient and every buffer of `module` against `reference` (same
    names), with the rule above; buffers compared in fp64 (num_batches_tracked is an int)."""
    grads = dict(reference.named_parameters())
    for name, p in module.named_parameters():
        assert_close(p.grad, grads[name].grad, kind="grad", name=f"{name}.grad")
    buffers = dict(reference.named_buffers())
    for name, b in module.named_buffers():
        assert_close(b.double(), buffers[name].double(), name=name)
