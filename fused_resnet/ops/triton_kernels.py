"""Bodies of the `conv_ops` custom ops on the Triton kernels (`kernels="triton"`).

The conv runs as an NHWC implicit GEMM whose epilogue writes the raw output y and its batch
statistics (training) or adds the folded-BN bias, residual and ReLU (inference). y and the
activation gradients are channels_last; the outputs z and dx take x's memory format.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fused_resnet.ops.layout import output_memory_format
from fused_resnet.triton.bn import bn_bwd_reduce, bn_finalize
from fused_resnet.triton.config import acc_dtype, operands
from fused_resnet.triton.conv import STAT_ROWS, conv_fwd, fwd_output, to_nhwc
from fused_resnet.triton.conv_bwd import BnGrad, conv_dgrad, conv_wgrad
from fused_resnet.triton.eltwise import BnBackward, bn_act_bwd, bn_act_fwd


def activation_format(x: Tensor) -> torch.memory_format:
    """The memory format of the saved conv output y and of d residual: always NHWC."""
    return torch.channels_last


def _check_groups(groups: int) -> None:
    if groups != 1:
        raise NotImplementedError(f"the Triton conv kernels are ungrouped, got groups={groups}")


def conv_batch_stats(x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor, eps: float, *,
                     stride: int, padding: int, dilation: int = 1, store: bool = True,
                     **prologue) -> tuple[Tensor, ...]:
    """(y, batch mean, biased var, (rstd, scale, shift) as a (3, C) tensor) of y = conv(x,
    weight), the conv applying `prologue` (in_scale, in_shift, in_relu) to x on load and
    writing the statistics' partials in its epilogue (`bn_finalize` merges them); without
    `store` y is not written (the statistics alone) and an empty tensor stands in for it."""
    y, parts = conv_fwd(x, weight, stride=stride, padding=padding, dilation=dilation, stats=True,
                        store=store, **prologue)
    m = fwd_output(x.shape, weight.shape, stride, padding, dilation)[2]  # y's pixels
    mean, var, affine = bn_finalize(*parts, STAT_ROWS, m, gamma, beta, eps)
    return (y if store else x.new_empty(0)), mean, var, affine


def conv_bn_train(
    x: Tensor, weight: Tensor, bn_weight: Tensor, bn_bias: Tensor, residual: Optional[Tensor],
    stride: int, padding: int, dilation: int, groups: int, eps: float, relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_groups(groups)
    y, mean, var, affine = conv_batch_stats(x, weight, bn_weight, bn_bias, eps, stride=stride,
                                            padding=padding, dilation=dilation)
    r = to_nhwc(residual) if residual is not None else None
    z = bn_act_fwd(y, affine[1], affine[2], residual=r, relu=relu)
    return z.contiguous(memory_format=output_memory_format(x)), y, mean, var


def conv_bn_train_backward(
    dz: Tensor, x: Tensor, weight: Tensor, bn_weight: Tensor, y: Tensor, z: Tensor,
    mean: Tensor, var: Tensor, stride: int, padding: int, dilation: int, groups: int, eps: float,
    relu: bool,
    has_residual: bool, need_dx: bool = True, need_dw: bool = True,
) -> tuple[Optional[Tensor], Optional[Tensor], Tensor, Tensor, Optional[Tensor]]:
    """(dx or None without need_dx, dw or None without need_dw, d gamma, d beta, d residual
    or None)."""
    _check_groups(groups)
    dz = to_nhwc(dz)
    z = to_nhwc(z) if relu else None
    rstd = torch.rsqrt(var + eps)
    # 1x1 convs read each dy element once: the BN backward applied on load by both the dgrad
    # and the wgrad, dy never written (unless `config.operands()` says "written"). g =
    # dz * [z > 0] is written by the pass that reduces the BN's sums (it reads dz and z
    # anyway) for the residual's gradient, and for two on-load convs to read instead of dz, z.
    on_load = weight.shape[2] * weight.shape[3] == 1 and operands() == "on_load"
    sum_g, sum_gy, _, g = bn_bwd_reduce(dz, z, y, mean, rstd,
                                        write_g=has_residual or (on_load and z is not None))
    if not (need_dx or need_dw):  # only the BN's (and the residual's) gradients: no dy
        return None, None, sum_gy, sum_g, g if has_residual else None
    bn = BnBackward(bn_weight, mean, rstd, sum_g, sum_gy, y.numel() // y.shape[1])
    g_args = (g, None) if g is not None else (dz, z)
    dy = BnGrad(*g_args, y, bn) if on_load else bn_act_bwd(*g_args, y, bn)[0]
    geometry = {"stride": stride, "padding": padding, "dilation": dilation}
    dx = conv_dgrad(dy, weight, x.shape, **geometry) if need_dx else None
    dw = conv_wgrad(x, dy, weight.shape, **geometry) if need_dw else None
    return dx, dw, sum_gy, sum_g, g if has_residual else None


def conv_bias_act(
    x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor], stride: int,
    padding: int, dilation: int, groups: int, relu: bool,
) -> Tensor:
    _check_groups(groups)
    z, _ = conv_fwd(x, weight, stride=stride, padding=padding, dilation=dilation, bias=bias,
                    residual=residual, relu=relu)
    return z


def conv_bias_act_backward(
    dz: Tensor, x: Tensor, weight: Tensor, z: Tensor, stride: int, padding: int, dilation: int,
    groups: int,
    relu: bool, has_residual: bool, need_dx: bool = True, need_dw: bool = True,
) -> tuple[Optional[Tensor], Optional[Tensor], Tensor, Optional[Tensor]]:
    """(dx or None without need_dx, dw or None without need_dw, d bias, d residual or None);
    g = dz * [z > 0]."""
    _check_groups(groups)
    dz = to_nhwc(dz)
    # g = dz * [z > 0], written once; it is the residual's gradient too, and then a new
    # tensor even without a ReLU (a custom op's output may not alias its input dz).
    g = dz
    if relu or has_residual:
        g = bn_act_bwd(dz, to_nhwc(z) if relu else None, dz, None, write_dy=False,
                       write_dr=True)[2]
    geometry = {"stride": stride, "padding": padding, "dilation": dilation}
    dx = conv_dgrad(g, weight, x.shape, **geometry) if need_dx else None
    dw = conv_wgrad(x, g, weight.shape, **geometry) if need_dw else None
    return dx, dw, g.sum(dim=(0, 2, 3), dtype=acc_dtype(dz.dtype)), g if has_residual else None
