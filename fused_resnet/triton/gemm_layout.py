"""The conv weight as the implicit GEMM's operand: (C_out, C_in, kh, kw) -> (kh*kw*C_in,
C_out), K by N, K in (r, s, c) order as the kernels' K loops run (`conv`, `conv_bwd`), laid
out per call (one copy that also casts) or once for many calls (`gemm_ordered`)."""

from typing import Optional

import torch
from torch import Tensor


def dense_in(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in `dtype`, contiguous in its own dimension order: t itself, or one copy that casts
    and lays out at once (a weight in fp32 for a bf16 conv: no separate cast)."""
    if t.dtype == dtype and t.is_contiguous():
        return t
    return torch.empty(t.shape, device=t.device, dtype=dtype).copy_(t)


def gemm_weight(weight: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """(C_out, C_in, kh, kw) -> the (kh*kw*C_in, C_out) K-by-N GEMM operand in `dtype`
    (default weight's): one copy, or a view of a weight stored by `gemm_ordered` (made once
    and kept on it: two view ops are ~3 us of host time a conv)."""
    view = weight.__dict__.get(_GEMM_VIEW)
    if view is not None and view.dtype == (dtype or weight.dtype):
        return view
    ordered = dense_in(weight.permute(2, 3, 1, 0), dtype or weight.dtype)
    return ordered.reshape(-1, weight.shape[0])


_GEMM_VIEW = "_fused_resnet_gemm_view"


def gemm_ordered(weight: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """`weight` with the same shape and values (cast to `dtype`, default its own), stored in
    (kh, kw, C_in, C_out) order so that `gemm_weight` of it is a view (kept on the tensor,
    sharing its storage): for a weight laid out once and used by many calls."""
    ordered = dense_in(weight.permute(2, 3, 1, 0), dtype or weight.dtype).permute(3, 2, 0, 1)
    setattr(ordered, _GEMM_VIEW, ordered.permute(2, 3, 1, 0).reshape(-1, weight.shape[0]))
    return ordered
