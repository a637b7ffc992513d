"""A whole residual block as one custom op, `fused_resnet::block_train`, on the Triton kernels.

Training chain (DESIGN.md, "Bottleneck chain"), for main-path convs w_1..w_L (L = 2 basic,
3 bottleneck) and an optional projection w_d:
    y_1 = conv(x, w_1)                                  + batch statistics of y_1
    y_i = conv(relu(bn_{i-1}(y_{i-1})), w_i)            BN + ReLU applied on load
    z   = relu(bn_L(y_L) + shortcut)                    one elementwise kernel, where
          shortcut = x | zero_pad(x) | bn_d(conv(x, w_d)) | nothing (plain block)
Only x, the raw conv outputs y_i and the per-channel mean / var are saved; backward
recomputes relu(bn(y)) on load (wgrad prologue) and the ReLU masks from y * scale + shift,
takes each inner BN's backward sums from the epilogue of the dgrad that produces its
gradient, and applies the BN backward on load in the next dgrad / wgrad (1x1 convs).
Outputs: z (x's memory format), the y_i (channels_last), and each BN's batch mean and biased
var, from which the caller updates the running statistics.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fused_resnet import reference
from fused_resnet.ops.layout import conv_output_shape, output_memory_format
from fused_resnet.triton.bn import bn_bwd_reduce, bn_finalize
from fused_resnet.triton.bottleneck_eval import bottleneck_eval
from fused_resnet.triton.config import acc_dtype
from fused_resnet.triton.conv import STAT_ROWS, conv_fwd, to_nhwc
from fused_resnet.triton.conv_bwd import BnGrad, BnReduce, conv_dgrad, conv_wgrad
from fused_resnet.triton.eltwise import bn_act_bwd, bn_act_fwd, bn_backward_coefficients

SHORTCUTS = ("identity", "zero_pad", "projection", "none")


def _affine(gamma: Tensor, beta: Tensor, mean: Tensor, var: Tensor, eps: float):
    """(rstd, scale, shift) with BN(y) = y * scale + shift for batch stats (mean, var)."""
    rstd = torch.rsqrt(var + eps)
    scale = gamma.to(rstd.dtype) * rstd
    return rstd, scale, beta.to(rstd.dtype) - mean * scale


def _shortcut_input(x: Tensor, shortcut: str, out_channels: int, stride: int):
    if shortcut == "identity":
        return to_nhwc(x)
    if shortcut == "zero_pad":
        return to_nhwc(reference.zero_pad_shortcut(x, out_channels, stride))
    return None


@torch.library.custom_op("fused_resnet::block_train", mutates_args=())
def block_train(
    x: Tensor, weights: list[Tensor], gammas: list[Tensor], betas: list[Tensor],
    strides: list[int], paddings: list[int], eps: list[float], shortcut: str,
    shortcut_stride: int,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    main = len(weights) - (shortcut == "projection")
    ys, means, variances, affines = [], [], [], []
    inp, prologue = x, {}
    for i in range(main):
        y, parts = conv_fwd(inp, weights[i], stride=strides[i], padding=paddings[i],
                            stats=True, **prologue)
        mean, var, scale, shift = bn_finalize(*parts, STAT_ROWS, y.numel() // y.shape[1],
                                              gammas[i], betas[i], eps[i])
        ys.append(y)
        means.append(mean)
        variances.append(var)
        affines.append((scale, shift))
        inp, prologue = y, {"in_scale": scale, "in_shift": shift, "in_relu": True}
    bn2 = {}
    if shortcut == "projection":
        yd, parts = conv_fwd(x, weights[-1], stride=shortcut_stride, padding=0, stats=True)
        mean, var, scale, shift = bn_finalize(*parts, STAT_ROWS, yd.numel() // yd.shape[1],
                                              gammas[-1], betas[-1], eps[-1])
        ys.append(yd)
        means.append(mean)
        variances.append(var)
        bn2 = {"y2": yd, "scale2": scale, "shift2": shift}
    residual = _shortcut_input(x, shortcut, ys[main - 1].shape[1], shortcut_stride)
    z = bn_act_fwd(ys[main - 1], *affines[-1], residual=residual, relu=True, **bn2)
    return z.contiguous(memory_format=output_memory_format(x)), ys, means, variances


@block_train.register_fake
def _(x, weights, gammas, betas, strides, paddings, eps, shortcut, shortcut_stride):
    main = len(weights) - (shortcut == "projection")
    shapes, inp_shape = [], x.shape
    for i in range(main):
        shape = conv_output_shape(torch.empty(inp_shape, device="meta"), weights[i], strides[i],
                                  paddings[i])
        shapes.append(shape)
        inp_shape = shape
    if shortcut == "projection":
        shapes.append(conv_output_shape(x, weights[-1], shortcut_stride, 0))
    acc = acc_dtype(x.dtype)
    z = torch.empty(shapes[main - 1], device=x.device, dtype=x.dtype,
                    memory_format=output_memory_format(x))
    ys = [torch.empty(s, device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
          for s in shapes]
    stats = [torch.empty(s[1], device=x.device, dtype=acc) for s in shapes]
    return z, ys, stats, [torch.empty_like(s) for s in stats]


def _dy(dz: Tensor, mask, y: Tensor, coeffs, kernel_size: int):
    """dy of a BN (+ ReLU): a BnGrad applied on load for 1x1 convs, else a written tensor."""
    if kernel_size == 1:
        return BnGrad(dz, mask, y, *coeffs)
    return bn_act_bwd(dz, mask, y, coeffs)[0]


@torch.library.custom_op("fused_resnet::block_train_backward", mutates_args=())
def block_train_backward(
    dz: Tensor, x: Tensor, z: Tensor, weights: list[Tensor], gammas: list[Tensor],
    betas: list[Tensor], ys: list[Tensor], means: list[Tensor], variances: list[Tensor],
    strides: list[int], paddings: list[int], eps: list[float], shortcut: str,
    shortcut_stride: int,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """(dx, d weights, d gammas, d betas), lists in the order of the inputs."""
    main = len(weights) - (shortcut == "projection")
    affine = [_affine(gammas[i], betas[i], means[i], variances[i], eps[i])
              for i in range(len(weights))]
    dz, z = to_nhwc(dz), to_nhwc(z)
    n = [y.numel() // y.shape[1] for y in ys]
    last = main - 1
    proj = shortcut == "projection"
    sum_g, sum_gy, sum_gyd = bn_bwd_reduce(
        dz, z, ys[last], means[last], affine[last][0],
        *((ys[-1], means[-1], affine[-1][0]) if proj else ()))
    dweights, dgammas, dbetas = [None] * len(weights), [None] * len(weights), [None] * len(weights)
    dgammas[last], dbetas[last] = sum_gy, sum_g
    coeffs = bn_backward_coefficients(gammas[last], means[last], affine[last][0], sum_g, sum_gy,
                                      n[last])
    g = None
    if shortcut in ("identity", "zero_pad"):  # the shortcut's gradient is g = dz * [z > 0]
        g = bn_act_bwd(dz, z, ys[last], coeffs, write_dy=False, write_dr=True)[2]
    dy = _dy(g if g is not None else dz, None if g is not None else z, ys[last], coeffs,
             weights[last].shape[2] * weights[last].shape[3])
    for i in range(last, -1, -1):
        prologue = {} if i == 0 else {"in_scale": affine[i - 1][1], "in_shift": affine[i - 1][2],
                                      "in_relu": True}
        inp = x if i == 0 else ys[i - 1]
        dweights[i] = conv_wgrad(inp, dy, weights[i].shape, stride=strides[i],
                                 padding=paddings[i], **prologue)
        if i == 0:
            dx = conv_dgrad(dy, weights[0], x.shape, stride=strides[0], padding=paddings[0])
            break
        # The gradient at relu(bn_{i-1}(y_{i-1})), with that BN's backward sums from the
        # dgrad epilogue; relu(bn(y)) > 0  <=>  y * scale + shift > 0.
        rstd, scale, shift = affine[i - 1]
        d_inp, (s_g, s_gy) = conv_dgrad(
            dy, weights[i], inp.shape, stride=strides[i], padding=paddings[i],
            reduce=BnReduce(ys[i - 1], scale, shift, means[i - 1], rstd))
        mask = (scale, shift)
        dgammas[i - 1], dbetas[i - 1] = s_gy, s_g
        c = bn_backward_coefficients(gammas[i - 1], means[i - 1], affine[i - 1][0], s_g, s_gy,
                                     n[i - 1])
        dy = _dy(d_inp, mask, ys[i - 1], c, weights[i - 1].shape[2] * weights[i - 1].shape[3])
    if shortcut == "identity":
        dx = dx + g
    elif shortcut == "zero_pad":
        s = shortcut_stride
        dx[:, :, ::s, ::s] += g[:, : x.shape[1]]
    elif proj:
        dgammas[-1], dbetas[-1] = sum_gyd, sum_g.clone()  # both BNs feed the same sum
        cd = bn_backward_coefficients(gammas[-1], means[-1], affine[-1][0], sum_g, sum_gyd, n[-1])
        dyd = BnGrad(dz, z, ys[-1], *cd)
        dweights[-1] = conv_wgrad(x, dyd, weights[-1].shape, stride=shortcut_stride, padding=0)
        dx = dx + conv_dgrad(dyd, weights[-1], x.shape, stride=shortcut_stride, padding=0)
    return (dx.contiguous(memory_format=output_memory_format(x)),
            [dw.to(w.dtype).contiguous() for dw, w in zip(dweights, weights)],
            [dg.to(gm.dtype) for dg, gm in zip(dgammas, gammas)],
            [db.to(bt.dtype) for db, bt in zip(dbetas, betas)])


@block_train_backward.register_fake
def _(dz, x, z, weights, gammas, betas, ys, means, variances, strides, paddings, eps, shortcut,
      shortcut_stride):
    return (torch.empty(x.shape, device=x.device, dtype=x.dtype,
                        memory_format=output_memory_format(x)),
            [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights],
            [torch.empty_like(g) for g in gammas], [torch.empty_like(b) for b in betas])


def _setup(ctx, inputs, output):
    x, weights, gammas, betas, strides, paddings, eps, shortcut, shortcut_stride = inputs
    z, ys, means, variances = output
    k = len(weights)
    ctx.save_for_backward(x, z, *weights, *gammas, *betas, *ys, *means, *variances)
    ctx.args = (k, strides, paddings, eps, shortcut, shortcut_stride)
    ctx.set_materialize_grads(False)  # no zero gradients for the ys, means and variances


def _backward(ctx, dz, _dys, _dmeans, _dvars):
    if dz is None:  # z did not reach the loss
        return (None,) * 9
    k, strides, paddings, eps, shortcut, shortcut_stride = ctx.args
    x, z, *rest = ctx.saved_tensors
    lists = [rest[i * k:(i + 1) * k] for i in range(6)]
    dx, dw, dg, db = block_train_backward(dz, x, z, *lists, strides, paddings, eps, shortcut,
                                          shortcut_stride)
    return dx, dw, dg, db, None, None, None, None, None


block_train.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("fused_resnet::bottleneck_eval", mutates_args=())
def bottleneck_eval_op(x: Tensor, weights: list[Tensor], biases: list[Tensor]) -> Tensor:
    """Inference bottleneck (identity shortcut, stride 1, BN folded) in one launch."""
    return bottleneck_eval(x, weights, biases).contiguous(memory_format=output_memory_format(x))


@bottleneck_eval_op.register_fake
def _(x, weights, biases):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype,
                       memory_format=output_memory_format(x))
