"""Custom ops `fused_resnet::conv_bn_train` and `fused_resnet::conv_bias_act` (+ backward ops):
one schema, fake kernel and autograd formula each, whatever kernels run them.

- conv_bn_train(x, w, gamma, beta, residual?, stride, padding, dilation, groups, eps, relu, kernels)
  -> (z, y, mean, var): y = conv(x, w) with its batch statistics (mean, biased var), then
  z = relu?(BN(y) + residual). Functional: the caller updates running stats from mean / var.
- conv_bias_act(x, w, bias, residual?, stride, padding, dilation, groups, relu, kernels)
  -> z = relu?(conv(x, w) + bias + residual): inference with BN folded into (w, bias),
  differentiable too.
`kernels` picks the bodies: "triton" (`ops.triton_kernels`, NHWC implicit GEMM with fused
epilogues) or "native" (`ops.native_kernels`, the `_C` kernels around ATen's convolution).
Autograd saves x, w, y, z and the per-channel stats only. Tensors are (N, C, H, W); z and
dx take x's memory format, y and d residual the kernels' `activation_format(x)`. The backward
ops take `need_dx`: where x does not require grad (a stem's input image) the data gradient is
not computed and dx is an empty tensor, as ATen's convolution_backward does with its mask;
and `need_dw` likewise for a frozen weight (requires_grad=False: fine-tuning BN alone, or
gradients taken through a frozen network to its input), whose weight gradient, a third of a
conv's training FLOPs, is then not computed; nor are the gradients a backward pass does not
use (`torch.autograd.grad(loss, [x])`: `ops.grad_needs`).
An argument added to a backward op after a release takes a default that computes what the
op computed before (need_dw, here and in the block and stem ops): torch.compile's on-disk
cache (AOTAutogradCache) keys a graph on its forward, so a backward graph it saved before
the upgrade stays in use and calls the op without it.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from fused_resnet.backend import ops_recorded
from fused_resnet.ops.first_order import first_order
from fused_resnet.ops.grad_needs import used_by_pass
from fused_resnet.ops.layout import conv_output_shape, output_memory_format, stat_dtype

KERNELS = ("triton", "native")


_kernel_modules: dict[tuple[str, str], ModuleType] = {}


def kernels_module(kernels: str, part: str = "kernels") -> ModuleType:
    """`ops.<kernels>_<part>`: `ops.triton_kernels` / `ops.native_kernels` (the conv ops),
    `ops.triton_block` / `ops.native_block` (the block ops). Imported on first use (Triton is
    optional), then a dict lookup: import_module took a few us on every call of every conv."""
    module = _kernel_modules.get((kernels, part))
    if module is None:
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        module = _kernel_modules[kernels, part] = importlib.import_module(
            f"fused_resnet.ops.{kernels}_{part}")
    return module


def _empty(shape, like: Tensor, fmt=torch.contiguous_format, dtype=None) -> Tensor:
    return torch.empty(shape, device=like.device, dtype=dtype or like.dtype, memory_format=fmt)


def _as_weight(dw: Optional[Tensor], weight: Tensor) -> Tensor:
    """dw in weight's dtype and memory format (so that AccumulateGrad does not copy it into
    a channels_last parameter's layout); dw=None (not computed: a frozen weight) gives an
    empty tensor, as `_as_input_grad` does for dx."""
    if dw is None:
        return weight.new_empty(0)
    fmt = output_memory_format(weight)
    if dw.dtype != weight.dtype:  # one copy for the cast and the layout
        return dw.to(dtype=weight.dtype, memory_format=fmt)
    # Not `to(memory_format=)`: it copies a 1x1 dw that is contiguous but whose strides
    # suggest channels_last; `contiguous` returns it.
    return dw.contiguous(memory_format=fmt)


def _train_forward(x, weight, bn_weight, bn_bias, residual, stride, padding, dilation, groups, eps,
                   relu, kernels):
    z, y, mean, var = kernels_module(kernels).conv_bn_train(
        x, weight, bn_weight, bn_bias, residual, stride, padding, dilation, groups, eps, relu)
    return z.contiguous(memory_format=output_memory_format(x)), y, mean, var


def _as_input_grad(dx: Optional[Tensor], x: Tensor) -> Tensor:
    """dx in x's memory format, or an empty tensor where it was not asked for."""
    return dx.contiguous(memory_format=output_memory_format(x)) if dx is not None else \
        x.new_empty(0)


def _dx_fake(x: Tensor, need_dx: bool) -> Tensor:
    return _empty(x.shape, x, output_memory_format(x)) if need_dx else x.new_empty(0)


def _dw_fake(weight: Tensor, need_dw: bool) -> Tensor:
    return _empty(weight.shape, weight, output_memory_format(weight)) if need_dw else \
        weight.new_empty(0)


def _train_backward(dz, x, weight, bn_weight, y, z, mean, var, stride, padding, dilation, groups,
                    eps, relu, has_residual, kernels, need_dx, need_dw):
    dx, dw, dgamma, dbeta, dr = kernels_module(kernels).conv_bn_train_backward(
        dz, x, weight, bn_weight, y, z, mean, var, stride, padding, dilation, groups, eps, relu,
        has_residual, need_dx, need_dw)
    return (_as_input_grad(dx, x), _as_weight(dw, weight),
            dgamma.to(bn_weight.dtype), dbeta.to(bn_weight.dtype),
            dr if dr is not None else dz.new_empty(0))


@torch.library.custom_op("fused_resnet::conv_bn_train", mutates_args=())
def conv_bn_train(
    x: Tensor, weight: Tensor, bn_weight: Tensor, bn_bias: Tensor, residual: Optional[Tensor],
    stride: int, padding: int, dilation: int, groups: int, eps: float, relu: bool, kernels: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _train_forward(x, weight, bn_weight, bn_bias, residual, stride, padding, dilation,
                          groups, eps, relu, kernels)


@conv_bn_train.register_fake
def _(x, weight, bn_weight, bn_bias, residual, stride, padding, dilation, groups, eps, relu,
      kernels):
    shape = conv_output_shape(x, weight, stride, padding, dilation)
    stat = _empty((shape[1],), x, dtype=stat_dtype(x.dtype))
    y_format = kernels_module(kernels).activation_format(x)
    return (_empty(shape, x, output_memory_format(x)), _empty(shape, x, y_format), stat,
            torch.empty_like(stat))


@torch.library.custom_op("fused_resnet::conv_bn_train_backward", mutates_args=())
def conv_bn_train_backward(
    dz: Tensor, x: Tensor, weight: Tensor, bn_weight: Tensor, y: Tensor, z: Tensor,
    mean: Tensor, var: Tensor, stride: int, padding: int, dilation: int, groups: int, eps: float,
    relu: bool,
    has_residual: bool, kernels: str, need_dx: bool, need_dw: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx (empty without need_dx), dw (empty without need_dw), d gamma, d beta, d residual
    (empty without a residual))."""
    return _train_backward(dz, x, weight, bn_weight, y, z, mean, var, stride, padding, dilation,
                           groups, eps, relu, has_residual, kernels, need_dx, need_dw)


@conv_bn_train_backward.register_fake
def _(dz, x, weight, bn_weight, y, z, mean, var, stride, padding, dilation, groups, eps, relu,
      has_residual, kernels, need_dx, need_dw=True):
    c = weight.shape[0]
    dr_format = kernels_module(kernels).activation_format(x)
    return (_dx_fake(x, need_dx), _dw_fake(weight, need_dw),
            _empty((c,), bn_weight), _empty((c,), bn_weight),
            _empty(y.shape, dz, dr_format) if has_residual else dz.new_empty(0))


def _setup_train(ctx, inputs, output):
    (x, weight, bn_weight, _, residual, stride, padding, dilation, groups, eps, relu,
     kernels) = inputs
    z, y, mean, var = output
    ctx.save_for_backward(x, weight, bn_weight, y, z, mean, var)
    ctx.args = (stride, padding, dilation, groups, eps, relu, residual is not None, kernels)
    # y, mean and var are outputs for the caller's bookkeeping, never differentiated: do not
    # let autograd fill a zero gradient the size of y for them.
    ctx.set_materialize_grads(False)


@first_order("fused_resnet::conv_bn_train")
def _backward_train(ctx, dz, _dy, _dmean, _dvar, backward=None):
    if dz is None:  # z did not reach the loss
        return (None,) * 12
    x, weight, bn_weight, y, z, mean, var = ctx.saved_tensors
    has_residual = ctx.args[6]
    # x's and w's gradients where they require one and this backward pass uses it
    need_dx, need_dw = used_by_pass(ctx, ctx.needs_input_grad[:2])
    dx, dw, dgamma, dbeta, dr = (backward or conv_bn_train_backward)(
        dz, x, weight, bn_weight, y, z, mean, var, *ctx.args, need_dx, need_dw)
    return (dx if need_dx else None, dw if need_dw else None, dgamma, dbeta,
            dr if has_residual else None, *(None,) * 7)


conv_bn_train.register_autograd(_backward_train, setup_context=_setup_train)


@torch.library.custom_op("fused_resnet::conv_bias_act", mutates_args=())
def conv_bias_act(
    x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor], stride: int,
    padding: int, dilation: int, groups: int, relu: bool, kernels: str,
) -> Tensor:
    return _bias_forward(x, weight, bias, residual, stride, padding, dilation, groups, relu,
                         kernels)


def _bias_forward(x, weight, bias, residual, stride, padding, dilation, groups, relu, kernels):
    z = kernels_module(kernels).conv_bias_act(x, weight, bias, residual, stride, padding, dilation,
                                              groups, relu)
    return z.contiguous(memory_format=output_memory_format(x))


@conv_bias_act.register_fake
def _(x, weight, bias, residual, stride, padding, dilation, groups, relu, kernels):
    return _empty(conv_output_shape(x, weight, stride, padding, dilation), x,
                  output_memory_format(x))


@torch.library.custom_op("fused_resnet::conv_bias_act_backward", mutates_args=())
def conv_bias_act_backward(
    dz: Tensor, x: Tensor, weight: Tensor, z: Tensor, bias: Tensor, stride: int, padding: int,
    dilation: int, groups: int, relu: bool, has_residual: bool, kernels: str, need_dx: bool,
    need_dw: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx (empty without need_dx), dw (empty without need_dw), d bias, d residual (empty
    without a residual))."""
    dx, dw, dbias, dr = kernels_module(kernels).conv_bias_act_backward(
        dz, x, weight, z, stride, padding, dilation, groups, relu, has_residual, need_dx,
        need_dw)
    return (_as_input_grad(dx, x), _as_weight(dw, weight),
            dbias.to(bias.dtype), dr if dr is not None else dz.new_empty(0))


@conv_bias_act_backward.register_fake
def _(dz, x, weight, z, bias, stride, padding, dilation, groups, relu, has_residual, kernels,
      need_dx, need_dw=True):
    dr_format = kernels_module(kernels).activation_format(x)
    return (_dx_fake(x, need_dx), _dw_fake(weight, need_dw),
            _empty(bias.shape, bias),
            _empty(z.shape, dz, dr_format) if has_residual else dz.new_empty(0))


def _setup_bias(ctx, inputs, output):
    x, weight, bias, residual, stride, padding, dilation, groups, relu, kernels = inputs
    ctx.save_for_backward(x, weight, output, bias)
    ctx.args = (stride, padding, dilation, groups, relu, residual is not None, kernels)


@first_order("fused_resnet::conv_bias_act")
def _backward_bias(ctx, dz):
    x, weight, z, bias = ctx.saved_tensors
    has_residual = ctx.args[5]
    need_dx, need_dw = used_by_pass(ctx, ctx.needs_input_grad[:2])
    dx, dw, dbias, dr = conv_bias_act_backward(dz, x, weight, z, bias, *ctx.args, need_dx,
                                               need_dw)
    return (dx if need_dx else None, dw if need_dw else None, dbias,
            dr if has_residual else None, *(None,) * 6)


conv_bias_act.register_autograd(_backward_bias, setup_context=_setup_bias)


class _ConvBnTrainFunction(torch.autograd.Function):
    """The eager twin of `fused_resnet::conv_bn_train`: the same bodies, saved tensors and
    backward, without the custom-op dispatch (about 0.15 ms a call on CPU, twice per conv and
    step). torch.compile sees the custom op instead (`conv_bn_train_call`)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _train_forward(*inputs)
        _setup_train(ctx, inputs, output)
        ctx.mark_non_differentiable(*output[1:])
        return output

    @staticmethod
    def backward(ctx, dz, dy, dmean, dvar):
        return _backward_train(ctx, dz, dy, dmean, dvar, backward=_train_backward)


def conv_bn_train_call(x, weight, bn_weight, bn_bias, residual, stride, padding, dilation, groups,
                       eps, relu, kernels):
    """conv_bn_train's (z, y, mean, var): the custom op while torch.compile traces or a
    FlopCounterMode counts (`ops_recorded`), its eager twin otherwise."""
    args = (x, weight, bn_weight, bn_bias, residual, stride, padding, dilation, groups, eps, relu,
            kernels)
    if ops_recorded():
        return conv_bn_train(*args)
    return _ConvBnTrainFunction.apply(*args)


def conv_bias_act_call(x, weight, bias, residual, stride, padding, dilation, groups, relu, kernels):
    """conv_bias_act's z: the custom op while tracing or counting (`ops_recorded`) or when
    autograd needs it, else its body called directly (inference under no_grad, the common
    case)."""
    args = (x, weight, bias, residual, stride, padding, dilation, groups, relu, kernels)
    tensors = (x, weight, bias, residual)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                 for t in tensors)
    if needs_grad or ops_recorded():
        return conv_bias_act(*args)
    return _bias_forward(*args)
