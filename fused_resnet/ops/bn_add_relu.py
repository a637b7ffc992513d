"""`act(y * scale[c] + shift[c] + residual)`: the inference block end, on `_C` or the reference.

The schema `fused_resnet::bn_add_relu` is declared once, in csrc/fused_resnet.cpp, and its
fake kernel lives in `ops.native_kernels`; this file is the Python entry point.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fused_resnet import backend as _backend
from fused_resnet import reference
from fused_resnet.ops.layout import check_flags, output_memory_format


def _records_grad(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd records an op on `tensors` (grad mode on, one of them requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def bn_add_relu(
    y: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Optional[Tensor] = None,
    relu: bool = True,
    *,
    backend: str = "auto",
) -> Tensor:
    """out = act(y * scale[c] + shift[c] + residual), computed in fp32 (fp64 for fp64 y).

    y: (N, C, H, W); scale, shift: (C,) fp32, or fp64 for fp64 y (e.g. from
    `reference.fold_bn`); residual: y's shape, dtype and device, or None. The output keeps
    y's dtype and memory format.

    The fused kernels (`_C`, Triton) are forward only: where autograd records this call
    (grad mode on and y, scale, shift or residual requiring grad) it runs on the reference
    ops whatever `backend` says, so that every backend gives the same gradients (higher
    orders included); inference (no_grad, or nothing requiring grad) runs on `backend`.
    """
    check_flags(relu=relu)
    if y.dim() != 4:
        raise ValueError(f"y must be 4-D (N, C, H, W), got shape {tuple(y.shape)}")
    if not y.is_floating_point():
        raise ValueError(f"y must be a floating-point tensor, got {y.dtype}")
    allowed = (torch.float32, torch.float64) if y.dtype == torch.float64 else (torch.float32,)
    for arg, t in (("scale", scale), ("shift", shift)):
        if t.shape != (y.shape[1],) or t.dtype not in allowed or t.device != y.device:
            kinds = "float32 or float64" if len(allowed) == 2 else "float32"
            raise ValueError(f"{arg} must be {kinds} of shape ({y.shape[1]},) on {y.device} "
                             f"(float64 only for float64 y), got {t.dtype} {tuple(t.shape)} "
                             f"on {t.device}")
    if residual is not None and (residual.shape != y.shape or residual.dtype != y.dtype
                                 or residual.device != y.device):
        raise ValueError(f"residual must match y ({y.dtype} {tuple(y.shape)} on {y.device}), "
                         f"got {residual.dtype} {tuple(residual.shape)} on {residual.device}")
    name = _backend.resolve(backend, "bn_add_relu", y.device)
    if name == "reference" or _records_grad(y, scale, shift, residual):
        return reference.bn_add_relu(y, scale, shift, residual, relu)
    if name == "triton":
        from fused_resnet.triton.conv import to_nhwc
        from fused_resnet.triton.eltwise import bn_act_fwd

        r = to_nhwc(residual) if residual is not None else None
        z = bn_act_fwd(to_nhwc(y), scale, shift, residual=r, relu=relu)
        return z.contiguous(memory_format=output_memory_format(y))
    return torch.ops.fused_resnet.bn_add_relu(y, scale, shift, residual, relu)
