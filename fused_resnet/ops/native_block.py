"""Bodies of the `block_ops` custom ops on the `_C` kernels around ATen's convolution
(`kernels="native"`: cuDNN on CUDA, oneDNN on CPU).

ATen's convolution cannot apply a BN on load, so the forward writes each inner activation
a_i = relu(y_i * scale_i + shift_i) (one `bn_add_relu` pass) for the next conv and frees it
after that conv; only x, z, the raw y_i and the batch statistics are saved. Backward walks the
convs in reverse and recomputes the one a_{i-1} it needs at a time (the input of conv i's
weight gradient, whose ReLU mask a_{i-1} > 0 also gates the gradient reaching bn_{i-1}):
    dy_L, d gamma_L, d beta_L, g = bn_act_backward(dz, z, y_L)   g = dz * [z > 0]
    d a_{i-1}, dw_i = convolution_backward(dy_i, a_{i-1}, w_i)
    dy_{i-1}, d gamma_{i-1}, d beta_{i-1} = bn_act_backward(d a_{i-1}, a_{i-1}, y_{i-1})
    dx = dx_main + shortcut'(g)     (g itself, its zero-pad slice, or the projection's dx)
Without `need_dx` (x needs no gradient) the data gradients of conv 1 and of the projection
are not computed (ATen's mask) and g only where the projection's BN needs it.
Per bottleneck that keeps y1, y2, y3 where the per-conv chain (and eager PyTorch) keeps
y1, a1, y2, a2, y3, at the price of two extra elementwise passes in backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fused_resnet import reference
from fused_resnet.ops.native_kernels import conv, conv_backward
from fused_resnet.reference import batch_norm_affine

_C_OPS = torch.ops.fused_resnet


def _shortcut(x: Tensor, shortcut: str, out_channels: int, stride: int, projection):
    """The term added before the block's last ReLU; `projection` is (y_d, scale_d, shift_d)."""
    if shortcut == "identity":
        return x
    if shortcut == "zero_pad":
        return reference.zero_pad_shortcut(x, out_channels, stride)
    if shortcut == "projection":
        return _C_OPS.bn_add_relu(*projection, None, False)
    return None


def unkept_ys(weights: list[Tensor], strides: list[int], paddings: list[int],
              shortcut: str) -> list[int]:
    """The conv outputs `block_train_backward` does without: none here (it reads them all)."""
    return []


def unwritten_ys(weights: list[Tensor], strides: list[int], paddings: list[int],
                 shortcut: str) -> list[int]:
    """The conv outputs `block_train` does not write: none here."""
    return []


def block_train(
    x: Tensor, weights: list[Tensor], gammas: list[Tensor], betas: list[Tensor],
    strides: list[int], paddings: list[int], dilations: list[int], eps: list[float],
    shortcut: str, shortcut_stride: int,
) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """(z, relu_mask, ys, means, variances, affines): relu_mask empty (backward reads the
    ReLU mask from z), affines[i] (3, C) the rstd, scale, shift rows of BN i as the forward
    applied it."""
    ys, means, variances, affines = [], [], [], []

    def conv_bn_stats(inp: Tensor, i: int, stride: int, padding: int, dilation: int = 1):
        y = conv(inp, weights[i], stride, padding, dilation, 1)
        mean, var = _C_OPS.bn_stats(y)
        ys.append(y)
        means.append(mean)
        variances.append(var)
        affines.append(torch.stack(batch_norm_affine(mean, var, gammas[i], betas[i], eps[i])))
        return affines[-1][1], affines[-1][2]

    main = len(weights) - (shortcut == "projection")
    inp = x
    for i in range(main):
        scale, shift = conv_bn_stats(inp, i, strides[i], paddings[i], dilations[i])
        if i < main - 1:
            inp = _C_OPS.bn_add_relu(ys[-1], scale, shift, None, True)
    projection = None
    if shortcut == "projection":
        scale_d, shift_d = conv_bn_stats(x, main, shortcut_stride, 0)
        projection = (ys[-1], scale_d, shift_d)
    residual = _shortcut(x, shortcut, ys[main - 1].shape[1], shortcut_stride, projection)
    z = _C_OPS.bn_add_relu(ys[main - 1], scale, shift, residual, True)
    return z, relu_mask_like(z), ys, means, variances, affines


def relu_mask_like(z: Tensor) -> Tensor:
    """`block_train`'s relu_mask for the block output z: empty (the mask is read from z)."""
    return z.new_empty(0)


def block_train_backward(
    dz: Tensor, x: Tensor, z: Tensor, weights: list[Tensor], gammas: list[Tensor],
    betas: list[Tensor], ys: list[Tensor], means: list[Tensor], affines: list[Tensor],
    strides: list[int], paddings: list[int], dilations: list[int], eps: list[float],
    shortcut: str, shortcut_stride: int, need_dx: bool = True,
    need_dw: list[bool] | None = None,
) -> tuple[Tensor | None, list[Tensor | None], list[Tensor], list[Tensor]]:
    """(dx or None without need_dx, d weights (None where need_dw says so), d gammas,
    d betas), lists in the order of the inputs; affines: the forward's (rstd, scale, shift)
    rows per BN."""
    k = len(weights)
    need_dw = [True] * k if need_dw is None else need_dw
    main = k - (shortcut == "projection")
    affine = [a.unbind(0) for a in affines]
    dweights, dgammas, dbetas = [None] * k, [None] * k, [None] * k

    def bn_backward(i: int, d_out: Tensor, mask: Tensor | None, write_dr: bool):
        rstd = affine[i][0]
        dy, dgammas[i], dbetas[i], dr = _C_OPS.bn_act_backward(
            d_out, mask, ys[i], means[i], rstd, gammas[i].to(rstd.dtype), write_dr)
        return dy, dr

    last = main - 1
    # g = dz * [z > 0] reaches x through the shortcut and feeds the projection's BN.
    needs_g = shortcut == "projection" or (need_dx and shortcut != "none")
    dy, g = bn_backward(last, dz, z, needs_g)
    for i in range(last, 0, -1):
        _, scale, shift = affine[i - 1]
        a = _C_OPS.bn_add_relu(ys[i - 1], scale, shift, None, True)  # conv i's input again
        d_a, dweights[i] = conv_backward(dy, a, weights[i], strides[i], paddings[i],
                                         dilations[i], 1, True, need_dw[i])
        dy, _ = bn_backward(i - 1, d_a, a, False)
    dx, dweights[0] = conv_backward(dy, x, weights[0], strides[0], paddings[0], dilations[0],
                                    1, need_dx, need_dw[0])
    if shortcut == "projection":
        dyd, _ = bn_backward(main, g, None, False)
        dxd, dweights[main] = conv_backward(dyd, x, weights[main], shortcut_stride, 0, 1, 1,
                                            need_dx, need_dw[main])
    if not need_dx:
        return None, dweights, dgammas, dbetas
    if shortcut == "identity":
        dx = dx + g
    elif shortcut == "zero_pad":
        s = shortcut_stride
        dx[:, :, ::s, ::s] += g[:, : x.shape[1]]
    elif shortcut == "projection":
        dx = dx + dxd
    return dx, dweights, dgammas, dbetas
