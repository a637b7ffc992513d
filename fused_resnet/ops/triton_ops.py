"""Custom ops under `fused_resnet::` that run the Triton kernels, with fake kernels and autograd.

- conv_bn_train(x, w, gamma, beta, residual?, stride, padding, eps, relu) -> (z, y, mean, var):
  y = conv(x, w) with batch statistics from the conv epilogue, then
  z = relu?(BN(y) + residual). Functional: the caller updates running stats from mean / var.
- conv_bias_act(x, w, bias, residual?, stride, padding, relu) -> z = relu?(conv(x, w) + bias
  + residual): inference with BN folded into (w, bias), differentiable too.
Each has a `*_backward` op; autograd saves x, w, y / z and the per-channel stats only.
Tensors are (N, C, H, W); kernels work on channels_last copies and the output z takes x's
memory format; y and the gradients of activations are channels_last.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fused_resnet.ops.layout import conv_output_shape, output_memory_format
from fused_resnet.triton.bn import bn_bwd_reduce, bn_finalize
from fused_resnet.triton.config import acc_dtype
from fused_resnet.triton.conv import STAT_ROWS, conv_fwd, to_nhwc
from fused_resnet.triton.conv_bwd import BnGrad, conv_dgrad, conv_wgrad
from fused_resnet.triton.eltwise import bn_act_bwd, bn_act_fwd, bn_backward_coefficients


def _empty(shape, like: Tensor, fmt=torch.contiguous_format, dtype=None) -> Tensor:
    return torch.empty(shape, device=like.device, dtype=dtype or like.dtype, memory_format=fmt)


@torch.library.custom_op("fused_resnet::conv_bn_train", mutates_args=())
def conv_bn_train(
    x: Tensor, weight: Tensor, bn_weight: Tensor, bn_bias: Tensor, residual: Optional[Tensor],
    stride: int, padding: int, eps: float, relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y, parts = conv_fwd(x, weight, stride=stride, padding=padding, stats=True)
    m = y.numel() // y.shape[1]
    mean, var, scale, shift = bn_finalize(*parts, STAT_ROWS, m, bn_weight, bn_bias, eps)
    r = to_nhwc(residual) if residual is not None else None
    z = bn_act_fwd(y, scale, shift, residual=r, relu=relu)
    return z.contiguous(memory_format=output_memory_format(x)), y, mean, var


@conv_bn_train.register_fake
def _(x, weight, bn_weight, bn_bias, residual, stride, padding, eps, relu):
    shape = conv_output_shape(x, weight, stride, padding)
    stat = _empty((shape[1],), x, dtype=acc_dtype(x.dtype))
    return (_empty(shape, x, output_memory_format(x)), _empty(shape, x, torch.channels_last),
            stat, torch.empty_like(stat))


@torch.library.custom_op("fused_resnet::conv_bn_train_backward", mutates_args=())
def conv_bn_train_backward(
    dz: Tensor, x: Tensor, weight: Tensor, bn_weight: Tensor, y: Tensor, z: Tensor,
    mean: Tensor, var: Tensor, stride: int, padding: int, eps: float, relu: bool,
    has_residual: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw, d gamma, d beta, d residual (empty without a residual))."""
    dz = to_nhwc(dz)
    z = to_nhwc(z) if relu else None
    rstd = torch.rsqrt(var + eps)
    sum_g, sum_gy, _ = bn_bwd_reduce(dz, z, y, mean, rstd)
    coeffs = bn_backward_coefficients(bn_weight, mean, rstd, sum_g, sum_gy, y.numel() // y.shape[1])
    # 1x1 convs read each dy element once: apply the BN backward on load, never write dy.
    on_load = weight.shape[2] * weight.shape[3] == 1
    dy, _, dr = bn_act_bwd(dz, z, y, coeffs, write_dr=has_residual, write_dy=not on_load)
    if on_load:  # from g itself when it was written for the residual, else from (dz, z)
        dy = BnGrad(dr, None, y, *coeffs) if dr is not None else BnGrad(dz, z, y, *coeffs)
    dx = conv_dgrad(dy, weight, x.shape, stride=stride, padding=padding)
    dw = conv_wgrad(x, dy, weight.shape, stride=stride, padding=padding)
    return (dx.contiguous(memory_format=output_memory_format(x)), dw.to(weight.dtype).contiguous(),
            sum_gy.to(bn_weight.dtype), sum_g.to(bn_weight.dtype),
            dr if dr is not None else dz.new_empty(0))


@conv_bn_train_backward.register_fake
def _(dz, x, weight, bn_weight, y, z, mean, var, stride, padding, eps, relu, has_residual):
    c = weight.shape[0]
    return (_empty(x.shape, x, output_memory_format(x)), _empty(weight.shape, weight),
            _empty((c,), bn_weight), _empty((c,), bn_weight),
            _empty(y.shape, dz, torch.channels_last) if has_residual else dz.new_empty(0))


def _setup_train(ctx, inputs, output):
    x, weight, bn_weight, _, residual, stride, padding, eps, relu = inputs
    z, y, mean, var = output
    ctx.save_for_backward(x, weight, bn_weight, y, z, mean, var)
    ctx.args = (stride, padding, eps, relu, residual is not None)


def _backward_train(ctx, dz, _dy, _dmean, _dvar):
    x, weight, bn_weight, y, z, mean, var = ctx.saved_tensors
    stride, padding, eps, relu, has_residual = ctx.args
    dx, dw, dgamma, dbeta, dr = conv_bn_train_backward(
        dz, x, weight, bn_weight, y, z, mean, var, stride, padding, eps, relu, has_residual)
    return dx, dw, dgamma, dbeta, dr if has_residual else None, None, None, None, None


conv_bn_train.register_autograd(_backward_train, setup_context=_setup_train)


@torch.library.custom_op("fused_resnet::conv_bias_act", mutates_args=())
def conv_bias_act(
    x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor], stride: int,
    padding: int, relu: bool,
) -> Tensor:
    z, _ = conv_fwd(x, weight, stride=stride, padding=padding, bias=bias, residual=residual,
                    relu=relu)
    return z.contiguous(memory_format=output_memory_format(x))


@conv_bias_act.register_fake
def _(x, weight, bias, residual, stride, padding, relu):
    return _empty(conv_output_shape(x, weight, stride, padding), x, output_memory_format(x))


@torch.library.custom_op("fused_resnet::conv_bias_act_backward", mutates_args=())
def conv_bias_act_backward(
    dz: Tensor, x: Tensor, weight: Tensor, z: Tensor, bias: Tensor, stride: int, padding: int,
    relu: bool, has_residual: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw, d bias, d residual (empty without a residual)); g = dz * [z > 0]."""
    dz = to_nhwc(dz)
    c = weight.shape[0]
    identity = (torch.ones(c, device=dz.device, dtype=acc_dtype(dz.dtype)),
                torch.zeros(c, device=dz.device, dtype=acc_dtype(dz.dtype)),
                torch.zeros(c, device=dz.device, dtype=acc_dtype(dz.dtype)))
    g, _, dr = bn_act_bwd(dz, to_nhwc(z) if relu else None, dz, identity, write_dr=has_residual)
    dx = conv_dgrad(g, weight, x.shape, stride=stride, padding=padding)
    dw = conv_wgrad(x, g, weight.shape, stride=stride, padding=padding)
    dbias = g.sum(dim=(0, 2, 3), dtype=acc_dtype(g.dtype)).to(bias.dtype)
    return (dx.contiguous(memory_format=output_memory_format(x)), dw.to(weight.dtype).contiguous(),
            dbias, dr if dr is not None else dz.new_empty(0))


@conv_bias_act_backward.register_fake
def _(dz, x, weight, z, bias, stride, padding, relu, has_residual):
    return (_empty(x.shape, x, output_memory_format(x)), _empty(weight.shape, weight),
            _empty(bias.shape, bias),
            _empty(z.shape, dz, torch.channels_last) if has_residual else dz.new_empty(0))


def _setup_bias(ctx, inputs, output):
    x, weight, bias, residual, stride, padding, relu = inputs
    ctx.save_for_backward(x, weight, output, bias)
    ctx.args = (stride, padding, relu, residual is not None)


def _backward_bias(ctx, dz):
    x, weight, z, bias = ctx.saved_tensors
    stride, padding, relu, has_residual = ctx.args
    dx, dw, dbias, dr = conv_bias_act_backward(dz, x, weight, z, bias, stride, padding, relu,
                                               has_residual)
    return dx, dw, dbias, dr if has_residual else None, None, None, None


conv_bias_act.register_autograd(_backward_bias, setup_context=_setup_bias)
