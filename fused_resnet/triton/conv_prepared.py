"""The inference conv (`conv.conv_fwd` with a bias, an optional residual and ReLU) prepared for
repeated calls with one input shape and dtype, as a model serving one input size makes them:
the output shape, the weight's GEMM view, the integer and constexpr arguments and, once known,
the launch config are worked out once (`PreparedConvFwd`), so that a call allocates its output
and launches (`launch.PreparedLaunch`). A ResNet-50 inference call at batch 1 is host-bound:
53 conv launches, each ~11 us of `conv_fwd`'s Python and ~5 us of `launch`'s before Triton's
own (2-core VM).
"""

from typing import Optional

import torch
from torch import Tensor

from fused_resnet.triton.config import cdiv
from fused_resnet.triton.conv import (
    STAT_ROWS,
    _conv_fwd_kernel,
    fwd_flags,
    fwd_grid,
    fwd_output,
)
from fused_resnet.triton.gemm_layout import gemm_weight
from fused_resnet.triton.launch import PreparedLaunch


class PreparedConvFwd:
    """out = relu?(conv(x, weight) + bias[c] (+ residual)) for x of shape `x_shape` and
    `dtype`, stored channels_last (NHWC-contiguous), as `conv_fwd(x, weight, stride=,
    padding=, dilation=, bias=, residual=, relu=)` computes it; out is a new channels_last
    tensor.

    weight: (C_out, C_in, kh, kw), kept as its GEMM view in `dtype` (a copy unless it was
    laid out by `gemm_layout.gemm_ordered`); bias: (C_out,) fp32 (fp64 for fp64 x), contiguous;
    residual (when `has_residual`): out's shape, channels_last, `dtype`. The caller checks
    the arguments once (`ops.residual_block_eval`) and keeps the inputs to this contract."""

    __slots__ = ("out_shape", "dtype", "weight", "bias", "ints", "has_residual", "launch")

    def __init__(self, x_shape: tuple, dtype: torch.dtype, weight: Tensor, bias: Tensor, *,
                 stride: int, padding: int, has_residual: bool, relu: bool,
                 dilation: int = 1) -> None:
        n, c_in, h, w = x_shape
        c_out, _, kh, kw = weight.shape
        ho, wo, m = fwd_output(x_shape, weight.shape, stride, padding, dilation)
        self.out_shape, self.dtype = (n, c_out, ho, wo), dtype
        self.weight, self.bias = gemm_weight(weight, dtype), bias
        # conv_fwd's integer arguments: statistics groups (unused here), then the shapes
        self.ints = (cdiv(m, STAT_ROWS), h, w, c_in, ho, wo, c_out, m, stride, padding)
        self.has_residual = has_residual
        self.launch = PreparedLaunch(
            _conv_fwd_kernel, fwd_grid(m, c_out),
            fwd_flags(dtype, kh, kw, c_in, padding, device=weight.device, prologue=False,
                      in_relu=False, bias=True, residual=has_residual, relu=relu, stats=False,
                      dilation=dilation))

    def __call__(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        out = torch.empty(self.out_shape, device=x.device, dtype=self.dtype,
                          memory_format=torch.channels_last)
        res = residual if self.has_residual else out
        # conv_fwd's pointer arguments; `out` stands in for the absent ones (never read)
        self.launch(x, self.weight, out, out, out, self.bias, res, out, out, out, out, out, out,
                    *self.ints)
        return out
