"""The ResNet stem in training on the Triton kernels, conv -> BN -> ReLU -> max-pool, as one
custom op (`fused_resnet::stem_train` and its backward op), and the functional
`conv_bn_relu_max_pool` that picks it or the two ops it replaces.

Unfused, a ResNet-50 step at batch 256 in bf16 writes the stem's activation a = relu(bn(y))
(64 x 112 x 112 per image: 411 MB) for the pool to read and keeps it for the ReLU's backward;
the pool's backward writes da (411 MB) for the BN backward's two passes to read beside a and
y. Here the pool applies relu(y * scale + shift) to each y it loads, and its backward goes on
through the ReLU and the BN (`triton.pool.max_pool_bn_bwd_sums`, then `max_pool_bn_bwd`
writing dy for the conv's weight gradient): a and da are never written, and autograd keeps
x, y, the pool's int8 window positions and the per-channel rows, not a.
    forward:  y = conv(x, w) (+ batch statistics), out, arg = max_pool(relu(y * scale + shift))
    backward: g = max_pool'(dout, arg) * [y * scale + shift > 0], (sum g, sum g * yhat),
              dy = a g + b y + d, dw = wgrad(x, dy) (if w needs it), dx = dgrad(dy) (if x
              needs it)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fused_resnet import backend as _backend
from fused_resnet.ops import conv_ops
from fused_resnet.ops.conv_bn_act import (
    autocast_inputs,
    check_conv_bn_act_args,
    check_momentum,
    checked_conv_bn_act,
    select_kernels,
    update_running_stats,
)
from fused_resnet.ops.first_order import first_order
from fused_resnet.ops.grad_needs import used_by_pass
from fused_resnet.ops.layout import (
    bn_params,
    check_flags,
    conv_output_shape,
    output_memory_format,
    stat_dtype,
)
from fused_resnet.ops.max_pool import check_window, max_pool2d


@torch.library.custom_op("fused_resnet::stem_train", mutates_args=())
def stem_train(
    x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor, stride: int, padding: int,
    eps: float, pool_kernel: int, pool_stride: int, pool_padding: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out in x's memory format, the pool's window positions (int8), y, batch mean, biased
    var, (rstd, scale, shift) as a (3, C) tensor)."""
    from fused_resnet.ops.triton_kernels import conv_batch_stats
    from fused_resnet.triton.pool import max_pool_fwd

    y, mean, var, affine = conv_batch_stats(x, weight, gamma, beta, eps, stride=stride,
                                            padding=padding)
    out, arg = max_pool_fwd(y, pool_kernel, pool_stride, pool_padding, write_arg=True,
                            scale=affine[1], shift=affine[2])
    return out.contiguous(memory_format=output_memory_format(x)), arg, y, mean, var, affine


@stem_train.register_fake
def _(x, weight, gamma, beta, stride, padding, eps, pool_kernel, pool_stride, pool_padding):
    from fused_resnet.triton.pool import pool_output_size

    y_shape = conv_output_shape(x, weight, stride, padding)
    n, c, h, w = y_shape
    shape = (n, c, *(pool_output_size(v, pool_kernel, pool_stride, pool_padding)
                     for v in (h, w)))
    cl = torch.channels_last
    stat = torch.empty(c, device=x.device, dtype=stat_dtype(x.dtype))
    return (torch.empty(shape, device=x.device, dtype=x.dtype,
                        memory_format=output_memory_format(x)),
            torch.empty(shape, device=x.device, dtype=torch.int8, memory_format=cl),
            torch.empty(y_shape, device=x.device, dtype=x.dtype, memory_format=cl),
            stat, torch.empty_like(stat), stat.new_empty((3, c)))


@torch.library.custom_op("fused_resnet::stem_train_backward", mutates_args=())
def stem_train_backward(
    dout: Tensor, x: Tensor, weight: Tensor, gamma: Tensor, y: Tensor, arg: Tensor,
    mean: Tensor, affine: Tensor, stride: int, padding: int, pool_kernel: int,
    pool_stride: int, pool_padding: int, need_dx: bool, need_dw: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx (empty without need_dx), dw (empty without need_dw), d gamma, d beta)."""
    from fused_resnet.triton.conv import to_nhwc
    from fused_resnet.triton.conv_bwd import conv_dgrad, conv_wgrad
    from fused_resnet.triton.eltwise import BnBackward, bn_bwd_coefficient_rows
    from fused_resnet.triton.pool import max_pool_bn_bwd, max_pool_bn_bwd_sums

    rstd, scale, shift = affine.unbind(0)
    dout = to_nhwc(dout)
    pool = (pool_kernel, pool_stride, pool_padding)
    sum_g, sum_gy = max_pool_bn_bwd_sums(dout, arg, y, scale, shift, mean, rstd, *pool)
    dx = dw = None
    if need_dx or need_dw:  # else only the BN's gradients: no dy
        coef = bn_bwd_coefficient_rows(BnBackward(gamma, mean, rstd, sum_g, sum_gy,
                                                  y.numel() // y.shape[1]))
        dy = max_pool_bn_bwd(dout, arg, y, scale, shift, coef, *pool)
        if need_dw:
            dw = conv_wgrad(x, dy, weight.shape, stride=stride, padding=padding)
        if need_dx:
            dx = conv_dgrad(dy, weight, x.shape, stride=stride, padding=padding)
    return (conv_ops._as_input_grad(dx, x), conv_ops._as_weight(dw, weight),
            sum_gy.to(gamma.dtype), sum_g.to(gamma.dtype))


@stem_train_backward.register_fake
def _(dout, x, weight, gamma, y, arg, mean, affine, stride, padding, pool_kernel,
      pool_stride, pool_padding, need_dx, need_dw=True):
    return (conv_ops._dx_fake(x, need_dx), conv_ops._dw_fake(weight, need_dw),
            torch.empty_like(gamma), torch.empty_like(gamma))


def _setup(ctx, inputs, output):
    x, weight, gamma, _beta, stride, padding, _eps, *pool = inputs
    _out, arg, y, mean, _var, affine = output
    ctx.save_for_backward(x, weight, gamma, y, arg, mean, affine)
    ctx.args = (stride, padding, *pool)
    ctx.set_materialize_grads(False)  # no zero gradients for the statistics' outputs


@first_order("fused_resnet::stem_train")
def _backward(ctx, dout, *_):
    if dout is None:  # the stem's output did not reach the loss
        return (None,) * 10
    need_dx, need_dw = used_by_pass(ctx, ctx.needs_input_grad[:2])
    dx, dw, dgamma, dbeta = stem_train_backward(dout, *ctx.saved_tensors, *ctx.args, need_dx,
                                                need_dw)
    return (dx if need_dx else None, dw if need_dw else None, dgamma, dbeta) + (None,) * 6


stem_train.register_autograd(_backward, setup_context=_setup)


def conv_bn_relu_max_pool(
    x: Tensor, weight: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor], running_var: Optional[Tensor], *, stride: int = 2,
    padding: int = 3, training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
    pool_kernel: int = 3, pool_stride: int = 2, pool_padding: int = 1, backend: str = "auto",
) -> Tensor:
    """max_pool2d(relu(BN(conv(x, weight))), pool_kernel, pool_stride, pool_padding): the
    ResNet stem (defaults: torchvision's 7x7/2 conv padded 3 and 3x3/2 pool padded 1, the
    weight's kernel whatever it is). In training on Triton one op (`stem_train`); otherwise,
    and in inference, `conv_bn_act` (past the checks made here) then `max_pool2d` on the
    same backend. Running stats are updated as `conv_bn_act` updates them; a call that
    raises changes none."""
    check_flags(training=training)
    x, weight, _ = autocast_inputs(x, weight, None)
    check_conv_bn_act_args(x, weight, bn_weight, bn_bias, running_mean, running_var,
                           stride=stride, padding=padding, groups=1, training=training,
                           residual=None, eps=eps)
    if training:
        check_momentum(momentum)
    check_window(conv_output_shape(x, weight, stride, padding)[2:], pool_kernel, pool_stride,
                 pool_padding, names=("pool_kernel", "pool_stride", "pool_padding"),
                 what="the conv's output size")
    kernels = select_kernels(backend, "conv_bn_act", x)
    if not (training and kernels == "triton"
            and _backend.resolve(backend, "max_pool", x.device) == "triton"):
        a = checked_conv_bn_act(x, weight, bn_weight, bn_bias, running_mean, running_var,
                                stride=stride, padding=padding, groups=1, training=training,
                                momentum=momentum, eps=eps, residual=None, relu=True,
                                kernels=kernels)
        return max_pool2d(a, pool_kernel, pool_stride, pool_padding, backend=backend)
    c = weight.shape[0]
    gamma, beta = bn_params(bn_weight, bn_bias, c, x)
    out, _arg, y, mean, var, _affine = stem_train(x, weight, gamma, beta, stride, padding,
                                                  eps, pool_kernel, pool_stride, pool_padding)
    if running_mean is not None:
        update_running_stats(running_mean, running_var, mean, var, y.numel() // c, momentum)
    return out
