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
from fused_resnet.ops.layout import output_memory_format


def bn_add_relu(
    y: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Optional[Tensor] = None,
    relu: bool = True,
    *,
    backend: str = "auto",
) -> Tensor:
    """out = act(y * scale[c] + shift[c] + residual), forward only (inference).

    y: (N, C, H, W); scale, shift: (C,) fp32 (e.g. from `reference.fold_bn`); residual: y's
    shape, dtype and device, or None. The output keeps y's dtype and memory format.
    """
    if y.dim() != 4:
        raise ValueError(f"y must be 4-D (N, C, H, W), got shape {tuple(y.shape)}")
    for arg, t in (("scale", scale), ("shift", shift)):
        if t.shape != (y.shape[1],) or t.dtype != torch.float32 or t.device != y.device:
            raise ValueError(f"{arg} must be float32 of shape ({y.shape[1]},) on {y.device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")
    if residual is not None and (residual.shape != y.shape or residual.dtype != y.dtype
                                 or residual.device != y.device):
        raise ValueError(f"residual must match y ({y.dtype} {tuple(y.shape)} on {y.device}), "
                         f"got {residual.dtype} {tuple(residual.shape)} on {residual.device}")
    name = _backend.resolve(backend, "bn_add_relu", y.device)
    if name == "reference":
        return reference.bn_add_relu(y, scale, shift, residual, relu)
    if name == "triton":
        from fused_resnet.triton.conv import to_nhwc
        from fused_resnet.triton.eltwise import bn_act_fwd

        r = to_nhwc(residual) if residual is not None else None
        z = bn_act_fwd(to_nhwc(y), scale, shift, residual=r, relu=relu)
        return z.contiguous(memory_format=output_memory_format(y))
    return torch.ops.fused_resnet.bn_add_relu(y, scale, shift, residual, relu)
