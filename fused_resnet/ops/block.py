"""Functional residual block (training): one fused op, `fused_resnet::block_train`, on the
Triton or the `_C` kernels; a chain of reference conv + BN (+ shortcut) + ReLU ops otherwise.

    z = relu(bn_L(conv_L(... relu(bn_1(conv_1(x))) ...)) + shortcut(x))
with shortcut "identity", "zero_pad" (option A), "projection" (conv_d + bn_d, the last of
the lists) or "none" (plain block). BN uses batch statistics; running stats given as tensors
are updated in place with each BN's factor in `momenta`. A call that raises changes nothing.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fused_resnet import reference
from fused_resnet.ops import conv_ops
from fused_resnet.ops.block_ops import block_train_call
from fused_resnet.ops.conv_bn_act import (
    autocast_inputs,
    autocasting,
    check_conv_bn_act_args,
    select_kernels,
    update_block_running_stats,
)
from fused_resnet.ops.layout import conv_dilations, conv_output_shape
from fused_resnet.triton.config import BOTTLENECK_EVAL_MAX_MID


def _geometry(i: int, main: int, strides, paddings, dilations, shortcut_stride) -> tuple:
    """(stride, padding, dilation) of conv i of a block: the main path's, or the projection's
    (i == main: 1x1 at the shortcut's stride)."""
    return (shortcut_stride, 0, 1) if i == main else (strides[i], paddings[i], dilations[i])


def _check_lists(weights, strides, paddings, dilations) -> list[int]:
    """`dilations` (default: all 1); raises where a per-conv list does not have one entry
    per weight."""
    dilations = conv_dilations(dilations, len(weights))
    for name, values in (("strides", strides), ("paddings", paddings),
                         ("dilations", dilations)):
        if len(values) != len(weights):
            raise ValueError(f"{name} must have one entry per weight ({len(weights)}), got "
                             f"{len(values)}")
    return dilations


def _check(x, weights, bn_weights, bn_biases, running_means, running_vars, strides, paddings,
           dilations, eps, shortcut, shortcut_stride) -> None:
    main = len(weights) - (shortcut == "projection")
    inp = x
    for i, w in enumerate(weights):
        source = x if i == main else inp
        stride, padding, dilation = _geometry(i, main, strides, paddings, dilations,
                                              shortcut_stride)
        check_conv_bn_act_args(source, w, bn_weights[i], bn_biases[i], running_means[i],
                               running_vars[i], stride=stride, padding=padding, groups=1,
                               training=True, residual=None, eps=eps[i], dilation=dilation)
        if i < main:
            inp = x.new_empty(1).expand(conv_output_shape(inp, w, stride, padding, dilation))


def residual_block_train(
    x: Tensor,
    weights: list[Tensor],
    bn_weights: list[Tensor],
    bn_biases: list[Tensor],
    running_means: list[Optional[Tensor]],
    running_vars: list[Optional[Tensor]],
    *,
    strides: list[int],
    paddings: list[int],
    momenta: list[float],
    eps: list[float],
    shortcut: str,
    shortcut_stride: int = 1,
    backend: str = "auto",
    dilations: Optional[list[int]] = None,
) -> Tensor:
    """Training forward of a block whose convs are `weights` (main path, then the projection).
    strides / paddings / dilations (default 1): one per weight, the projection's ignored (a
    1x1 conv at `shortcut_stride`).

    x: (N, C, H, W), either memory format (kept by the output). Weights in another dtype
    than x (fp32 under autocast; outside autocast an error, as in torch's conv) run in x's:
    the Triton kernels cast them in the copy that lays them out as their GEMM operand, and
    return their gradients in the weights' own dtype (no cast node, no bf16 rounding of dw);
    the other kernels take a cast copy.
    """
    if x.is_floating_point() and autocasting(x) is None:
        for i, w in enumerate(weights):  # only autocast casts weights, as in torch's conv
            if w.dtype != x.dtype:
                raise ValueError(f"weights[{i}] dtype {w.dtype} differs from x's dtype "
                                 f"{x.dtype} (outside autocast they must match)")
    x, _, _ = autocast_inputs(x, None, None)
    # Checked as if cast (the same shape and device, x's dtype), without casting them here.
    as_cast = [w if w.dtype == x.dtype else w.new_empty(1, dtype=x.dtype).expand(w.shape)
               for w in weights]
    dilations = _check_lists(weights, strides, paddings, dilations)
    _check(x, as_cast, bn_weights, bn_biases, running_means, running_vars, strides, paddings,
           dilations, eps, shortcut, shortcut_stride)
    kernels = select_kernels(backend, "residual_block", x)
    if kernels != "triton":
        weights = [w if w.dtype == x.dtype else w.to(x.dtype) for w in weights]
    if kernels != "reference":
        z, ys, means, variances, _ = block_train_call(
            x, weights, bn_weights, bn_biases, list(strides), list(paddings), dilations, eps,
            shortcut, shortcut_stride, kernels)
        update_block_running_stats(running_means, running_vars, means, variances,
                                   [y.numel() // y.shape[1] for y in ys], momenta)
        return z

    def conv_bn(i: int, inp: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
        stride, padding, dilation = _geometry(i, main, strides, paddings, dilations,
                                              shortcut_stride)
        return reference.conv_bn_act(
            inp, weights[i], bn_weights[i], bn_biases[i], running_means[i], running_vars[i],
            stride=stride, padding=padding, training=True, momentum=momenta[i], eps=eps[i],
            residual=residual, relu=relu, dilation=dilation)

    main = len(weights) - (shortcut == "projection")
    shortcut_out = None  # added to the last BN's output before its ReLU
    if shortcut == "identity":
        shortcut_out = x
    elif shortcut == "zero_pad":
        shortcut_out = reference.zero_pad_shortcut(x, weights[main - 1].shape[0], shortcut_stride)
    elif shortcut == "projection":
        shortcut_out = conv_bn(main, x, None, relu=False)
    out = x
    for i in range(main):
        last = i == main - 1
        out = conv_bn(i, out, shortcut_out if last else None, relu=True)
    return out


def bottleneck_eval(x: Tensor, weights: list[Tensor], biases: list[Tensor], *,
                    backend: str = "auto") -> Tensor:
    """Inference bottleneck with identity shortcut and stride 1, BN folded into the convs:
    z = relu(conv3(relu(conv2(relu(conv1(x) + b1)) + b2)) + b3 + x), one launch on Triton
    (`triton.bottleneck_eval`), three convs (each with its bias, residual and ReLU fused
    into one pass) on the `_C` kernels, three convs on the reference. weights: 1x1, 3x3,
    1x1 in the (autocast) dtype of x; biases fp32."""
    x, _, _ = autocast_inputs(x, None, None)
    weights = [w.to(x.dtype) for w in weights]
    w1, w2, w3 = weights
    check_conv_bn_act_args(x, w1, None, biases[0], None, None, stride=1, padding=0, groups=1,
                           training=False, residual=None, running_ok=True)
    expected = [(w1.shape[0], w1.shape[0], 3, 3), (x.shape[1], w1.shape[0], 1, 1)]
    for name, w, b, shape in (("weights[1]", w2, biases[1], expected[0]),
                              ("weights[2]", w3, biases[2], expected[1])):
        if tuple(w.shape) != shape or b.shape != (shape[0],):
            raise ValueError(f"{name} must have shape {shape} (bias ({shape[0]},)) for a "
                             f"stride-1 identity bottleneck, got {tuple(w.shape)}, "
                             f"{tuple(b.shape)}")
    too_wide = (f"the single-launch kernel takes at most {BOTTLENECK_EVAL_MAX_MID} mid "
                f"channels, got {w1.shape[0]}" if w1.shape[0] > BOTTLENECK_EVAL_MAX_MID else None)
    kernels = select_kernels(backend, "residual_block", x, reason=too_wide)
    if kernels == "triton":
        return torch.ops.fused_resnet.bottleneck_eval(x, weights, biases)
    return _eval_chain(x, weights, biases, [1, 1, 1], [0, 1, 0], [1, 1, 1], "identity", 1,
                       kernels)


# Signatures (shapes, dtypes, devices of x and of every weight and bias, strides, paddings,
# dilations, shortcut) whose block check passed: what the check reads, so an inference block called
# with the same ones again (every call of a model at one input size) skips it. The check is
# ~8 us of host time a conv, a signature ~1 us a tensor; at most _EVAL_CHECKED_MAX kept.
_EVAL_CHECKED: dict[tuple, None] = {}
_EVAL_CHECKED_MAX = 4096


def residual_block_eval(x: Tensor, weights: list[Tensor], biases: list[Tensor], *,
                        strides: list[int], paddings: list[int], shortcut: str,
                        shortcut_stride: int = 1, backend: str = "auto",
                        dilations: Optional[list[int]] = None) -> Tensor:
    """Inference block with each BN folded into its conv as (weights[i], biases[i]), e.g. by
    `reference.fold_bn` (main path, then the projection):
        a_i = relu(conv(a_{i-1}, w_i) + b_i),  a_0 = x,
        z   = relu(conv(a_{L-1}, w_L) + b_L + shortcut(x)),
    shortcut = x | zero_pad(x) | conv(x, w_d) + b_d | nothing; one fused conv + bias
    (+ residual) + ReLU per conv; strides / paddings / dilations as `residual_block_train`'s.
    x is checked against the whole block before anything runs,
    and the kernels are chosen once for the block. Biases fp32 (fp64 for fp64 x)."""
    x, _, _ = autocast_inputs(x, None, None)
    weights = [w if w.dtype == x.dtype else w.to(x.dtype) for w in weights]
    main = len(weights) - (shortcut == "projection")
    dilations = conv_dilations(dilations, len(weights))
    signature = (x.shape, x.dtype, x.device, shortcut, shortcut_stride, tuple(strides),
                 tuple(paddings), tuple(dilations),
                 *[(t.shape, t.dtype, t.device) for t in (*weights, *biases)])
    if signature not in _EVAL_CHECKED:
        _check_lists(weights, strides, paddings, dilations)
        inp = x
        for i, (w, b) in enumerate(zip(weights, biases)):
            source = x if i == main else inp
            stride, padding, dilation = _geometry(i, main, strides, paddings, dilations,
                                                  shortcut_stride)
            check_conv_bn_act_args(source, w, None, b, None, None, stride=stride,
                                   padding=padding, groups=1, training=False, residual=None,
                                   running_ok=True, dilation=dilation)
            if i < main:
                inp = x.new_empty(1).expand(conv_output_shape(inp, w, stride, padding,
                                                              dilation))
        if len(_EVAL_CHECKED) >= _EVAL_CHECKED_MAX:
            _EVAL_CHECKED.clear()
        _EVAL_CHECKED[signature] = None
    kernels = select_kernels(backend, "residual_block", x)
    return _eval_chain(x, weights, biases, strides, paddings, dilations, shortcut,
                       shortcut_stride, kernels)


def _eval_chain(x, weights, biases, strides, paddings, dilations, shortcut, shortcut_stride,
                kernels) -> Tensor:
    main = len(weights) - (shortcut == "projection")

    def conv_bias_act(inp, i, residual, relu):
        w, b = weights[i], biases[i]
        stride, padding, dilation = _geometry(i, main, strides, paddings, dilations,
                                              shortcut_stride)
        if kernels != "reference":
            return conv_ops.conv_bias_act_call(inp, w, b, residual, stride, padding, dilation,
                                               1, relu, kernels)
        out = reference.conv2d(inp, w, b.to(inp.dtype), stride, padding, 1, dilation)
        out = out if residual is None else out + residual
        return torch.relu(out) if relu else out

    residual = None
    if shortcut == "identity":
        residual = x
    elif shortcut == "zero_pad":
        residual = reference.zero_pad_shortcut(x, weights[main - 1].shape[0], shortcut_stride)
    elif shortcut == "projection":
        residual = conv_bias_act(x, main, None, relu=False)
    out = x
    for i in range(main):
        last = i == main - 1
        out = conv_bias_act(out, i, residual if last else None, True)
    return out
