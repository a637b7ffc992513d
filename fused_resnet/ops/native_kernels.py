"""Bodies of the `conv_ops` custom ops on the compiled `_C` kernels around ATen's convolution
(`kernels="native"`: cuDNN on CUDA, oneDNN on CPU), and the fake kernels of the `_C` ops
whose schemas csrc/fused_resnet.cpp declares.

Training forward, three passes over the conv output y (x's memory format throughout):
    y = conv(x, w);  (mean, var) = bn_stats(y);
    z = bn_add_relu(y, gamma * rstd, beta - mean * gamma * rstd, residual, relu).
Backward: bn_act_backward (a reduction pass and an elementwise pass over dz, z, y) gives dy,
d gamma, d beta and d residual; `aten.convolution_backward` gives dx and dw.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fused_resnet.backend import load_extension
from fused_resnet.ops.layout import output_memory_format, stat_dtype
from fused_resnet.reference import batch_norm_affine, strided_1x1_on_cpu

if load_extension() is not None:

    @torch.library.register_fake("fused_resnet::bn_add_relu")
    def _bn_add_relu_fake(y, scale, shift, residual, relu):
        return torch.empty_like(y, memory_format=output_memory_format(y))

    def _channel_stat(y):
        return y.new_empty(y.shape[1], dtype=stat_dtype(y.dtype))

    @torch.library.register_fake("fused_resnet::bn_stats")
    def _bn_stats_fake(y):
        return _channel_stat(y), _channel_stat(y)

    @torch.library.register_fake("fused_resnet::bn_act_backward")
    def _bn_act_backward_fake(dz, z, y, mean, rstd, gamma, write_dr):
        fmt = output_memory_format(y)
        dy = torch.empty_like(y, memory_format=fmt)
        dr = torch.empty_like(y, memory_format=fmt) if write_dr else y.new_empty(0)
        return dy, _channel_stat(y), _channel_stat(y), dr


def activation_format(x: Tensor) -> torch.memory_format:
    """The memory format of the saved conv output y and of d residual: x's."""
    return output_memory_format(x)


def conv(x: Tensor, weight: Tensor, stride: int, padding: int, dilation: int,
         groups: int) -> Tensor:
    y = torch.ops.aten.convolution(x, weight, None, [stride, stride], [padding, padding],
                                   [dilation, dilation], False, [0, 0], groups)
    # ATen picks channels_last when x or the weight is; the saved y follows x alone.
    return y.contiguous(memory_format=output_memory_format(x))


def conv_backward(dy: Tensor, x: Tensor, weight: Tensor, stride: int, padding: int,
                  dilation: int, groups: int, need_dx: bool = True,
                  need_dw: bool = True) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(dx, or None without need_dx, dw, or None without need_dw: ATen skips what its mask
    leaves out). A strided 1x1 conv on CPU (`reference.strided_1x1_on_cpu`: oneDNN's weight
    gradient of it can be wrong) takes dw from the stride-1 conv of x[:, :, ::s, ::s], dx
    from ATen as usual."""
    if not (need_dx or need_dw):
        return None, None
    if strided_1x1_on_cpu(x, weight, stride, padding):
        dx = (torch.ops.aten.convolution_backward(
            dy, x, weight, None, [stride, stride], [0, 0], [1, 1], False, [0, 0], groups,
            [True, False, False])[0] if need_dx else None)
        dw = (torch.ops.aten.convolution_backward(
            dy, x[:, :, ::stride, ::stride], weight, None, [1, 1], [0, 0], [1, 1], False,
            [0, 0], groups, [False, True, False])[1] if need_dw else None)
        return dx, dw
    dx, dw, _ = torch.ops.aten.convolution_backward(
        dy, x, weight, None, [stride, stride], [padding, padding], [dilation, dilation], False,
        [0, 0], groups, [need_dx, need_dw, False])
    return dx, dw


def conv_bn_train(
    x: Tensor, weight: Tensor, bn_weight: Tensor, bn_bias: Tensor, residual: Optional[Tensor],
    stride: int, padding: int, dilation: int, groups: int, eps: float, relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y = conv(x, weight, stride, padding, dilation, groups)
    mean, var = torch.ops.fused_resnet.bn_stats(y)
    _, scale, shift = batch_norm_affine(mean, var, bn_weight, bn_bias, eps)
    z = torch.ops.fused_resnet.bn_add_relu(y, scale, shift, residual, relu)
    return z, y, mean, var


def conv_bn_train_backward(
    dz: Tensor, x: Tensor, weight: Tensor, bn_weight: Tensor, y: Tensor, z: Tensor,
    mean: Tensor, var: Tensor, stride: int, padding: int, dilation: int, groups: int, eps: float,
    relu: bool,
    has_residual: bool, need_dx: bool = True, need_dw: bool = True,
) -> tuple[Optional[Tensor], Optional[Tensor], Tensor, Tensor, Optional[Tensor]]:
    rstd = torch.rsqrt(var + eps)
    dy, dgamma, dbeta, dr = torch.ops.fused_resnet.bn_act_backward(
        dz, z if relu else None, y, mean, rstd, bn_weight.to(rstd.dtype), has_residual)
    dx, dw = conv_backward(dy, x, weight, stride, padding, dilation, groups, need_dx, need_dw)
    return dx, dw, dgamma, dbeta, dr if has_residual else None


def conv_bias_act(
    x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor], stride: int,
    padding: int, dilation: int, groups: int, relu: bool, ones: Optional[Tensor] = None,
) -> Tensor:
    """act(conv(x, w) + bias + residual): the bias, residual and ReLU in one pass (`ones`:
    bn_add_relu's unit scale, ones_like(bias), made here unless a caller keeps one)."""
    y = conv(x, weight, stride, padding, dilation, groups)
    ones = torch.ones_like(bias) if ones is None else ones
    return torch.ops.fused_resnet.bn_add_relu(y, ones, bias, residual, relu)


def conv_bias_act_backward(
    dz: Tensor, x: Tensor, weight: Tensor, z: Tensor, stride: int, padding: int, dilation: int,
    groups: int,
    relu: bool, has_residual: bool, need_dx: bool = True, need_dw: bool = True,
) -> tuple[Optional[Tensor], Optional[Tensor], Tensor, Optional[Tensor]]:
    """(dx or None without need_dx, dw or None without need_dw, d bias, d residual or None);
    g = dz * [z > 0]."""
    g = torch.where(z <= 0, 0, dz) if relu else dz  # a NaN z passes dz, as torch does
    g = g.contiguous(memory_format=output_memory_format(x))
    dx, dw = conv_backward(g, x, weight, stride, padding, dilation, groups, need_dx, need_dw)
    dr = None
    if has_residual:  # an op output must not alias its input dz
        dr = g.clone() if g.data_ptr() == dz.data_ptr() else g
    return dx, dw, g.sum(dim=(0, 2, 3), dtype=stat_dtype(g.dtype)), dr
