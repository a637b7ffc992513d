"""Bodies of the `block_ops` custom ops on the Triton kernels (`kernels="triton"`), and the
single-launch inference bottleneck op `fused_resnet::bottleneck_eval`.

Training chain (DESIGN.md, "Bottleneck chain"): each conv after the first applies the previous
BN + ReLU on load (its prologue), so relu(bn(y)) is never written; one elementwise kernel ends
the block, or for a bottleneck whose conv 3 is 1x1 (`unwritten_ys`) conv 3's epilogue does:
conv 3 runs once for y3's statistics alone and once more writing z = relu(bn3(y3) + shortcut)
and its ReLU mask, so y3 is never written. Backward recomputes relu(bn(y)) on load (wgrad
prologue) and the ReLU masks from y * scale + shift, takes each inner BN's backward sums from
the epilogue of the dgrad that produces its gradient, and applies the BN backward on load in
the next dgrad / wgrad (1x1 convs). An identity shortcut's gradient g = dz * [z > 0] comes
from the pass that reduces the last BN's backward sums and is added to dx in conv 1's dgrad
epilogue (a projection's dgrad adds conv 1's dx the same way): no separate pass; with a
projection that pass writes g for the on-load convs of both BNs to read. A bottleneck does its
last BN's backward without y3, from y2 and w3 (`_last_bn_backward_without_y`), and a
projection its shortcut BN's without y_d, from x and w_d (`_shortcut_bn_backward_without_y`):
neither is kept (`unkept_ys`). The y_i are channels_last. Without `need_dx` (x needs no
gradient) the dgrads of conv 1 and of the projection are not launched; without `need_dw[i]` (a
frozen weight) conv i's weight gradient is not (nor, for conv 3 / the projection done without
their y, the Gram).

With `config.operands() == "written"` the transformed operands are written instead, by one
elementwise pass each, and every conv runs its plain loop: relu(bn(y)) before the next conv
(again in backward, for its weight gradient; never saved) and every BN's dy.
"""

from __future__ import annotations

# typing.List, not list, in custom-op signatures: torch < 2.6 evaluates their annotations in
# its own namespace, where typing.List[Tensor] / List[int] / List[float] are schema types.
from typing import List

import torch
from torch import Tensor

from fused_resnet import reference
from fused_resnet.ops.layout import output_memory_format
from fused_resnet.ops.triton_kernels import conv_batch_stats
from fused_resnet.triton.bn import bn_bwd_reduce
from fused_resnet.triton.bn_last import last_bn_coefficients
from fused_resnet.triton.bottleneck_eval import bottleneck_eval
from fused_resnet.triton.config import operands
from fused_resnet.triton.conv import block_end_bits_ok, conv_fwd, to_nhwc
from fused_resnet.triton.conv_bwd import (
    Activated,
    BnGrad,
    BnReduce,
    Subsampled,
    conv_dgrad,
    conv_wgrad,
)
from fused_resnet.triton.eltwise import (
    BITS_DTYPE,
    BnBackward,
    bn_act_bwd,
    bn_act_fwd,
    bn_act_fwd_bits,
    relu_bits_words,
)
from fused_resnet.triton.gemm_layout import gemm_ordered


def _shortcut_input(x: Tensor, shortcut: str, out_channels: int, stride: int):
    if shortcut == "identity":
        return to_nhwc(x)
    if shortcut == "zero_pad":
        return to_nhwc(reference.zero_pad_shortcut(x, out_channels, stride))
    return None


def block_train(
    x: Tensor, weights: list[Tensor], gammas: list[Tensor], betas: list[Tensor],
    strides: list[int], paddings: list[int], dilations: list[int], eps: list[float],
    shortcut: str, shortcut_stride: int,
) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """(z, relu_mask, ys, means, variances, affines): relu_mask is [z > 0] packed as bits
    (`eltwise.bn_act_fwd_bits`), which backward reads instead of z; affines[i] (3, C) holds
    BN i's rstd, scale, shift as its forward applied them."""
    main = len(weights) - (shortcut == "projection")
    ys, means, variances, affines = [], [], [], []

    def conv_bn(inp: Tensor, i: int, stride: int, padding: int, dilation: int = 1,
                **prologue) -> None:
        y, mean, var, affine = conv_batch_stats(inp, weights[i], gammas[i], betas[i], eps[i],
                                                stride=stride, padding=padding,
                                                dilation=dilation, **prologue)
        ys.append(y)
        means.append(mean)
        variances.append(var)
        affines.append(affine)

    written = operands() == "written"
    end_in_conv3 = 2 in unwritten_ys(weights, strides, paddings, shortcut)
    if end_in_conv3:  # w3 laid out (and cast) once for its two convs
        weights = [*weights[:2], gemm_ordered(weights[2], x.dtype), *weights[3:]]
    for i in range(main):
        geometry = (strides[i], paddings[i], dilations[i])
        if i == 0:
            conv_bn(x, i, *geometry)
        elif written:  # relu(bn(y)) written once, then the plain loop
            inp = bn_act_fwd(ys[-1], affines[-1][1], affines[-1][2], relu=True)
            conv_bn(inp, i, *geometry)
        else:  # conv 3 ending the block: its statistics alone here, y3 not written
            conv_bn(ys[-1], i, *geometry, in_scale=affines[-1][1], in_shift=affines[-1][2],
                    in_relu=True, store=not (end_in_conv3 and i == 2))
    bn2 = {}
    if shortcut == "projection":
        conv_bn(x, main, shortcut_stride, 0)
        bn2 = {"y2": ys[-1], "scale2": affines[-1][1], "shift2": affines[-1][2]}
    residual = _shortcut_input(x, shortcut, weights[main - 1].shape[0], shortcut_stride)
    if not end_in_conv3:
        z, bits = bn_act_fwd_bits(ys[main - 1], affines[main - 1][1], affines[main - 1][2],
                                  residual=residual, **bn2)
        return z, bits, ys, means, variances, affines
    # conv 3 again, z = relu(bn3(y3) + shortcut) and [z > 0] in its epilogue (`unwritten_ys`)
    if bn2:
        residual, residual_affine = bn2["y2"], affines[-1]
    else:
        residual_affine = None
    n, _, h, w = ys[1].shape  # z's pixels: conv 3 is 1x1, stride 1
    bits = torch.empty((n * h * w, relu_bits_words(weights[2].shape[0])), device=x.device,
                       dtype=BITS_DTYPE)
    z, _ = conv_fwd(ys[1], weights[2], stride=1, padding=0, in_scale=affines[1][1],
                    in_shift=affines[1][2], in_relu=True, out_affine=affines[2], relu=True,
                    residual=residual, residual_affine=residual_affine, bits=bits)
    return z, bits, ys, means, variances, affines


def unwritten_ys(weights: list[Tensor], strides: list[int], paddings: list[int],
                 shortcut: str) -> list[int]:
    """Indices of the conv outputs y_i that `block_train` never writes (an empty tensor in
    their place): with the operands on load, a bottleneck's y3 when conv 3 is 1x1 with stride
    1 and no padding. Its conv runs twice instead: once for y3's batch statistics alone,
    then again with bn3, the shortcut (x, or a projection's bn_d(y_d)), the add and the ReLU
    in its epilogue, which writes z and its packed ReLU mask. Against conv 3 writing y3 and
    one elementwise pass reading it back, that is y3 neither written nor read (2 x 2.8 GB a
    ResNet-50 bf16 training step at batch 256) for conv 3's forward MACs once more
    (`python -m fused_resnet traffic`). Backward does without y3 anyway (`unkept_ys`)."""
    if (operands() == "on_load" and len(weights) - (shortcut == "projection") == 3
            and strides[2] == 1 and paddings[2] == 0 and tuple(weights[2].shape[2:]) == (1, 1)
            and block_end_bits_ok(weights[2].shape[0])):
        return [2]
    return []


def unkept_ys(weights: list[Tensor], strides: list[int], paddings: list[int],
              shortcut: str) -> list[int]:
    """Indices of the conv outputs y_i that `block_train_backward` does without, which
    autograd then need not keep: with the operands on load, a bottleneck's y_3 when its last
    conv is 1x1 with stride 1 and no padding (`_last_bn_backward_without_y`; 4x the width of
    y_1 or y_2) and a projection's y_d (`_shortcut_bn_backward_without_y`)."""
    if operands() != "on_load":
        return []
    main = len(weights) - (shortcut == "projection")
    unkept = []
    if (main == 3 and strides[2] == 1 and paddings[2] == 0
            and tuple(weights[2].shape[2:]) == (1, 1)):
        unkept.append(2)
    if shortcut == "projection":
        unkept.append(main)
    return unkept


def _last_bn_backward_without_y(g, sum_g, weights, gammas, ys, means, affine, n3,
                                need_dw3=True):
    """BN 3's backward and conv 3's gradients of a bottleneck without y3, from g = dz * [z > 0]
    and sum g (the sums pass). With pixels as rows, y3 = a2 w3^T for a2 = relu(bn2(y2))
    (rounded to y2's dtype, as the prologue rounds it) and w3 (C, K); G = g^T a2,
    Gram = a2^T a2, s = sum_p a2:
        sum_p g * y3 = rowsum(w3 * G), so sum g * yhat3 = rstd3 (rowsum(w3 * G) - mean3 sum g)
        dy3 = A g + B y3 + D                           (reference.bn_backward_affine)
        dw3 = dy3^T a2 = A G + B (w3 Gram) + D s^T
        d a2 = dy3 w3 = (A g) w3 + a2 M + e,  M = w3^T diag(B) w3 (K x K), e = w3^T D
    a2 M + e is a 1x1 conv of a2 (t, K wide) added in the dgrad's epilogue, which also gives
    s and BN 2's sums. These passes read g twice (as the chain through y3 did), y2 five times
    (a quarter of y3's width) and never y3: 75.6 -> 70.1 GB a ResNet-50 bf16 step at batch
    256 (`python -m fused_resnet traffic`), for 3.4% more FLOPs, and y3 is not kept.
    G is needed for sum g * yhat3, the Gram and s for dw3 alone (not made without need_dw3).
    Returns (d a2, (BN 2's sum g, sum g * yhat), dw3 or None, dgamma3, dbeta3)."""
    y2 = ys[1]
    rstd2, scale2, shift2 = affine[1]
    c, k = weights[2].shape[:2]
    pro = {"in_scale": scale2, "in_shift": shift2, "in_relu": True}
    gg = conv_wgrad(y2, g, weights[2].shape, stride=1, padding=0, **pro)
    sum_gy, w3, aw, ag, bwd = last_bn_coefficients(weights[2], y2.dtype, gg, gammas[2],
                                                   means[2], affine[2][0], sum_g, n3)
    with torch.autocast(g.device.type, enabled=False):  # fp32 products, whatever the caller
        me = bwd.T @ w3  # (K + 1, K): M = w3^T diag(B) w3 (symmetric), then the row e = w3^T D
    t, _ = conv_fwd(y2, me[:k].view(k, k, 1, 1), stride=1, padding=0, bias=me[k], **pro)
    d_a2, (s_g, s_gy, *s_a) = conv_dgrad(
        g, aw.view(c, k, 1, 1), y2.shape, stride=1, padding=0, residual=t,
        reduce=BnReduce(y2, scale2, shift2, means[1], rstd2), reduce_act=need_dw3)
    if not need_dw3:
        return d_a2, (s_g, s_gy), None, sum_gy, sum_g
    gram = conv_wgrad(y2, Activated(y2, scale2, shift2), (k, k, 1, 1), stride=1, padding=0,
                      **pro).reshape(k, k)
    with torch.autocast(g.device.type, enabled=False):  # A G + B w3 Gram + D s^T
        dw3 = torch.addmm(ag, bwd[:, :k], gram).addr_(bwd[:, k], s_a[0])
    return d_a2, (s_g, s_gy), dw3.view(c, k, 1, 1), sum_gy, sum_g


def _shortcut_bn_backward_without_y(g, sum_g, x, weight, gamma, mean, rstd, n, stride,
                                    dx_main, need_dw=True):
    """A projection shortcut's BN backward and conv gradients without y_d, as
    `_last_bn_backward_without_y` does for y3, with x_s = x[:, :, ::stride, ::stride] in the
    place of a2: y_d = x_s w^T (w (C, K) rounded to x's dtype), G = g^T x_s,
    Gram = x_s^T x_s, s = sum_p x_s; dy_d = A g + B y_d + D, so
        dw = A G + B (w Gram) + D s^T,  dx_s = (A g) w + x_s M + e  (M = w^T diag(B) w,
        e = w^T D),
    and dx = dx_main + dx_s at the strided pixels: conv_dgrad's `residual` and
    `tap_residual` (t = x_s M + e, a 1x1 conv of x at the stride). x_s is never copied: G
    and t read x at the stride as the conv did, the Gram reads it on both sides so
    (`Subsampled`), s sums a strided view of it. Against the chain through y_d
    (3 reads of it: the sums pass, the wgrad and the dgrad applying the BN backward on load)
    these passes read x_s (K wide, C / K = 2 or 4) four times (G, the Gram, s, t) and t
    (as wide) once, and the two BN-backward loops become plain ones. Without dx_main (x
    needs no gradient) no dx; without need_dw no Gram, s or dw.
    Returns (dx or None, dw or None, d gamma, d beta)."""
    c, k = weight.shape[:2]
    x = to_nhwc(x)
    gg = conv_wgrad(x, g, weight.shape, stride=stride, padding=0)
    sum_gy, w, aw, ag, bwd = last_bn_coefficients(weight, x.dtype, gg, gamma, mean, rstd,
                                                  sum_g, n)
    dw = None
    if need_dw:
        gram = conv_wgrad(x, Subsampled(x), (k, k, 1, 1), stride=stride,
                          padding=0).reshape(k, k)
        with torch.autocast(g.device.type, enabled=False):  # fp32 products, whatever the caller
            s = x[:, :, ::stride, ::stride].sum((0, 2, 3), dtype=gram.dtype)
            dw = torch.addmm(ag, bwd[:, :k], gram).addr_(bwd[:, k], s).view(c, k, 1, 1)
    dx = None
    if dx_main is not None:
        with torch.autocast(g.device.type, enabled=False):
            me = bwd.T @ w  # (K + 1, K): M = w^T diag(B) w, then the row e = w^T D
        t, _ = conv_fwd(x, me[:k].view(k, k, 1, 1), stride=stride, padding=0, bias=me[k])
        dx = conv_dgrad(g, aw.view(c, k, 1, 1), x.shape, stride=stride, padding=0,
                        residual=dx_main, tap_residual=t)
    return dx, dw, sum_gy, sum_g.clone()  # both BNs feed the same sum g


def relu_mask_like(z: Tensor) -> Tensor:
    """An empty tensor shaped as `block_train`'s relu_mask for the block output z."""
    n, c, h, w = z.shape
    return torch.empty((n * h * w, relu_bits_words(c)), device=z.device, dtype=BITS_DTYPE)


def _dy(dz: Tensor, mask, y: Tensor, bn: BnBackward, kernel_size: int, written: bool):
    """dy of a BN (+ ReLU): a BnGrad applied on load for 1x1 convs (unless `written`), else
    a written tensor."""
    if kernel_size == 1 and not written:
        return BnGrad(dz, mask, y, bn)
    return bn_act_bwd(dz, mask, y, bn)[0]


def block_train_backward(
    dz: Tensor, x: Tensor, relu_mask: Tensor, weights: list[Tensor], gammas: list[Tensor],
    betas: list[Tensor], ys: list[Tensor], means: list[Tensor], affines: list[Tensor],
    strides: list[int], paddings: list[int], dilations: list[int], eps: list[float],
    shortcut: str, shortcut_stride: int, need_dx: bool = True,
    need_dw: list[bool] | None = None,
) -> tuple[Tensor | None, list[Tensor | None], list[Tensor], list[Tensor]]:
    """(dx or None without need_dx, d weights (None where need_dw says so), d gammas,
    d betas), lists in the order of the inputs; relu_mask: the forward's [z > 0] as bits
    (`block_train`), or z itself; affines: the forward's (rstd, scale, shift) rows per BN."""
    main = len(weights) - (shortcut == "projection")
    need_dw = [True] * len(weights) if need_dw is None else need_dw
    written = operands() == "written"
    affine = [a.unbind(0) for a in affines]  # (rstd, scale, shift) views
    dz = to_nhwc(dz)
    z = relu_mask if relu_mask.dtype == BITS_DTYPE else to_nhwc(relu_mask)
    n = [y.numel() // y.shape[1] if y.numel() else dz.numel() // dz.shape[1] for y in ys]
    last = main - 1
    proj = shortcut == "projection"
    proj_y = proj and ys[-1].numel() > 0  # y_d kept (`unkept_ys`): the chain through it
    dweights, dgammas, dbetas = [None] * len(weights), [None] * len(weights), [None] * len(weights)
    dyd = None
    if ys[last].numel() == 0:  # not kept (`unkept_ys`): conv 3 done without it
        # The sums pass writes g (read by conv 3's passes and the shortcut's) and, with a
        # projection's y_d kept, also reduces that BN's sums.
        sum_g, sum_gyd, _, g = bn_bwd_reduce(
            dz, z, *((ys[-1], means[-1], affine[-1][0]) if proj_y else (None, None, None)),
            write_g=True)
        d_inp, (s_g, s_gy), dweights[last], dgammas[last], dbetas[last] = \
            _last_bn_backward_without_y(g, sum_g, weights, gammas, ys, means, affine, n[last],
                                        need_dw[last])
        start = last - 1
        dgammas[start], dbetas[start] = s_gy, s_g
        bn = BnBackward(gammas[start], means[start], affine[start][0], s_g, s_gy, n[start])
        dy = _dy(d_inp, affine[start][1:], ys[start], bn,
                 weights[start].shape[2] * weights[start].shape[3], written)
    else:
        start = last
        # g = dz * [z > 0] is written by the pass that reduces the last BN's backward sums (it
        # reads dz and the mask anyway) where it is the shortcut's gradient (identity,
        # zero_pad), and where convs read the BN's backward on load: they read g instead of
        # dz and a mask (with a projection: 4 reads of dz and z -> one write, 4 reads of g;
        # the conv loops do not take the mask as bits).
        on_load = not written and (proj or weights[last].shape[2] * weights[last].shape[3] == 1)
        sum_g, sum_gy, sum_gyd, g = bn_bwd_reduce(
            dz, z, ys[last], means[last], affine[last][0],
            *((ys[-1], means[-1], affine[-1][0]) if proj_y else ()),
            write_g=(need_dx and shortcut in ("identity", "zero_pad")) or on_load)
        dgammas[last], dbetas[last] = sum_gy, sum_g
        bn = BnBackward(gammas[last], means[last], affine[last][0], sum_g, sum_gy, n[last])
        if written and proj:  # both BNs' dy in one pass over dz and z
            bnd = BnBackward(gammas[-1], means[-1], affine[-1][0], sum_g, sum_gyd, n[-1])
            dy, dyd, _ = bn_act_bwd(dz, z, ys[last], bn, y2=ys[-1], bn2=bnd)
        else:
            dy = _dy(g if g is not None else dz, None if g is not None else z, ys[last], bn,
                     weights[last].shape[2] * weights[last].shape[3], written)
    dx = None
    for i in range(start, -1, -1):
        geometry = {"stride": strides[i], "padding": paddings[i], "dilation": dilations[i]}
        if need_dw[i]:
            prologue = {}
            inp = x if i == 0 else ys[i - 1]
            if i and written:  # relu(bn(y)) recomputed, written, read by the plain wgrad loop
                inp = bn_act_fwd(ys[i - 1], affine[i - 1][1], affine[i - 1][2], relu=True)
            elif i:
                prologue = {"in_scale": affine[i - 1][1], "in_shift": affine[i - 1][2],
                            "in_relu": True}
            dweights[i] = conv_wgrad(inp, dy, weights[i].shape, **geometry, **prologue)
            del inp  # a written relu(bn(y)) is freed before the dgrad
        if i == 0:  # an identity shortcut's g added in the dgrad's epilogue
            dx = conv_dgrad(dy, weights[0], x.shape, **geometry,
                            residual=g if shortcut == "identity" else None) if need_dx else None
            break
        # The gradient at relu(bn_{i-1}(y_{i-1})), with that BN's backward sums from the
        # dgrad epilogue; relu(bn(y)) > 0  <=>  y * scale + shift > 0.
        rstd, scale, shift = affine[i - 1]
        d_inp, (s_g, s_gy) = conv_dgrad(
            dy, weights[i], ys[i - 1].shape, **geometry,
            reduce=BnReduce(ys[i - 1], scale, shift, means[i - 1], rstd))
        mask = (scale, shift)
        dgammas[i - 1], dbetas[i - 1] = s_gy, s_g
        if i == 1 and not (need_dx or need_dw[0]):
            break  # conv 1 needs no gradient: its dy is not made
        bn = BnBackward(gammas[i - 1], means[i - 1], affine[i - 1][0], s_g, s_gy, n[i - 1])
        dy = _dy(d_inp, mask, ys[i - 1], bn, weights[i - 1].shape[2] * weights[i - 1].shape[3],
                 written)
    if need_dx and shortcut == "zero_pad":
        s = shortcut_stride
        dx[:, :, ::s, ::s] += g[:, : x.shape[1]]
    elif proj and not proj_y:
        dx, dweights[-1], dgammas[-1], dbetas[-1] = _shortcut_bn_backward_without_y(
            g, sum_g, x, weights[-1], gammas[-1], means[-1], affine[-1][0], n[-1],
            shortcut_stride, dx, need_dw[-1])
    elif proj:
        dgammas[-1], dbetas[-1] = sum_gyd, sum_g.clone()  # both BNs feed the same sum
        if dyd is None:
            dyd = BnGrad(g, None, ys[-1], BnBackward(gammas[-1], means[-1], affine[-1][0],
                                                     sum_g, sum_gyd, n[-1]))
        if need_dw[-1]:
            dweights[-1] = conv_wgrad(x, dyd, weights[-1].shape, stride=shortcut_stride,
                                      padding=0)
        if need_dx:  # conv 1's dx added in the projection dgrad's epilogue
            dx = conv_dgrad(dyd, weights[-1], x.shape, stride=shortcut_stride, padding=0,
                            residual=dx)
    return dx, dweights, dgammas, dbetas


@torch.library.custom_op("fused_resnet::bottleneck_eval", mutates_args=())
def bottleneck_eval_op(x: Tensor, weights: List[Tensor], biases: List[Tensor]) -> Tensor:
    """Inference bottleneck (identity shortcut, stride 1, BN folded) in one launch."""
    return bottleneck_eval(x, weights, biases).contiguous(memory_format=output_memory_format(x))


@bottleneck_eval_op.register_fake
def _(x, weights, biases):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype,
                       memory_format=output_memory_format(x))
