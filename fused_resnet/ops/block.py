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
    check_momentum,
    select_kernels,
    update_block_running_stats,
)
from fused_resnet.ops.layout import bn_params, check_int, conv_dilations, conv_output_shape
from fused_resnet.triton.config import BOTTLENECK_EVAL_MAX_MID


def _geometry(i: int, main: int, strides, paddings, dilations, shortcut_stride) -> tuple:
    """(stride, padding, dilation) of conv i of a block: the main path's, or the projection's
    (i == main: 1x1 at the shortcut's stride)."""
    return (shortcut_stride, 0, 1) if i == main else (strides[i], paddings[i], dilations[i])


SHORTCUTS = ("identity", "zero_pad", "projection", "none")


def _check_lists(weights, dilations, **lists) -> list[int]:
    """`dilations` (default: all 1); raises where `weights` is not a non-empty list or a
    per-conv list (`lists`, by name) does not have one entry per weight."""
    if not isinstance(weights, (list, tuple)) or not weights:
        raise ValueError(f"weights must be a non-empty list of conv weights, got {weights!r}")
    dilations = conv_dilations(dilations, len(weights))
    for name, values in (*lists.items(), ("dilations", dilations)):
        if not isinstance(values, (list, tuple)) or len(values) != len(weights):
            got = len(values) if isinstance(values, (list, tuple)) else repr(values)
            raise ValueError(f"{name} must be a list with one entry per weight "
                             f"({len(weights)}), got {got}")
    return dilations


def _check_weight_dtypes(x: Tensor, weights) -> None:
    """Weights are floating; outside autocast (which casts them, as in torch's conv) they
    must have x's dtype."""
    autocast = autocasting(x) is not None
    for i, w in enumerate(weights):
        if not isinstance(w, Tensor) or not w.is_floating_point():
            raise ValueError(f"weights[{i}] must be a floating-point tensor, got "
                             f"{getattr(w, 'dtype', type(w).__name__)}")
        if x.is_floating_point() and not autocast and w.dtype != x.dtype:
            raise ValueError(f"weights[{i}] dtype {w.dtype} differs from x's dtype {x.dtype} "
                             "(outside autocast they must match)")


def _as_cast(weights, dtype: torch.dtype) -> list[Tensor]:
    """The weights as the checks see them once cast to `dtype`: the same shape and device,
    shape-only stand-ins (one element, expanded) where the dtype differs, nothing cast."""
    return [w if w.dtype == dtype else w.new_empty(1, dtype=dtype).expand(w.shape)
            for w in weights]


def _check_block(x, weights, strides, paddings, dilations, shortcut, shortcut_stride,
                 check_conv) -> None:
    """The block's geometry: `check_conv(i, source, stride, padding, dilation)` checks conv
    i's own arguments on its input (a shape-only stand-in after the first); then the
    shortcut must give the main path's output shape (identity: x's; zero_pad: x subsampled
    by shortcut_stride, channels padded up; projection: its 1x1 conv at shortcut_stride)."""
    if shortcut not in SHORTCUTS:
        raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
    check_int("shortcut_stride", shortcut_stride, 1)
    main = len(weights) - (shortcut == "projection")
    if main < 1:
        raise ValueError("shortcut 'projection' takes the projection's weight last, after "
                         "the main path's: weights needs at least 2 entries")
    inp, shapes = x, []
    for i, w in enumerate(weights):
        source = x if i == main else inp
        stride, padding, dilation = _geometry(i, main, strides, paddings, dilations,
                                              shortcut_stride)
        check_conv(i, source, stride, padding, dilation)
        shapes.append(tuple(conv_output_shape(source, w, stride, padding, dilation)))
        if i < main:
            inp = x.new_empty(1).expand(shapes[-1])
    out, n, c, h, w = shapes[main - 1], *x.shape
    s = shortcut_stride
    expected = {"identity": (n, c, h, w), "zero_pad": (n, out[1], -(-h // s), -(-w // s)),
                "projection": shapes[-1], "none": out}[shortcut]
    if shortcut == "zero_pad" and out[1] < c:
        raise ValueError(f"shortcut 'zero_pad' pads x's {c} channels up to the main path's "
                         f"{out[1]}, which has fewer")
    if expected != out:
        stride_note = "" if shortcut == "identity" else f" at shortcut_stride {s}"
        raise ValueError(f"shortcut {shortcut!r}{stride_note} gives shape {expected}, but the "
                         f"main path's output (strides {list(strides[:main])}) has {out}")


def _check(x, weights, bn_weights, bn_biases, running_means, running_vars, strides, paddings,
           dilations, eps, momenta, shortcut, shortcut_stride) -> None:
    def check_conv(i, source, stride, padding, dilation):
        check_conv_bn_act_args(source, weights[i], bn_weights[i], bn_biases[i],
                               running_means[i], running_vars[i], stride=stride,
                               padding=padding, groups=1, training=True, residual=None,
                               eps=eps[i], dilation=dilation)
        if running_means[i] is not None:
            check_momentum(momenta[i], f"momenta[{i}]")

    _check_block(x, weights, strides, paddings, dilations, shortcut, shortcut_stride,
                 check_conv)


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
    dilations = _check_lists(weights, dilations, strides=strides, paddings=paddings,
                             bn_weights=bn_weights, bn_biases=bn_biases,
                             running_means=running_means, running_vars=running_vars,
                             momenta=momenta, eps=eps)
    _check_weight_dtypes(x, weights)  # only autocast casts weights, as in torch's conv
    x, _, _ = autocast_inputs(x, None, None)
    _check(x, _as_cast(weights, x.dtype), bn_weights, bn_biases, running_means, running_vars,
           strides, paddings, dilations, eps, momenta, shortcut, shortcut_stride)
    kernels = select_kernels(backend, "residual_block", x)
    if kernels != "triton":
        weights = [w if w.dtype == x.dtype else w.to(x.dtype) for w in weights]
    if kernels != "reference":
        # a BN without affine parameters: the identity's (ones, zeros), no gradient
        gammas, betas = zip(*(bn_params(g, b, w.shape[0], x)
                              for g, b, w in zip(bn_weights, bn_biases, weights)))
        z, ys, means, variances, _ = block_train_call(
            x, weights, list(gammas), list(betas), list(strides), list(paddings), dilations,
            eps, shortcut, shortcut_stride, kernels)
        # pixels per BN; an unwritten y (`unwritten_ys`: a bottleneck's y3) has z's
        pixels = [y.numel() // y.shape[1] if y.numel() else z.numel() // z.shape[1]
                  for y in ys]
        update_block_running_stats(running_means, running_vars, means, variances, pixels,
                                   momenta)
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
    1x1 in the (autocast) dtype of x; biases fp32. Where autograd needs a gradient, Triton
    runs the three fused convs (the single launch has no backward)."""
    _check_lists(weights, None, biases=biases)
    if len(weights) != 3:
        raise ValueError(f"weights must be the bottleneck's 3 convs (1x1, 3x3, 1x1), got "
                         f"{len(weights)}")
    _check_weight_dtypes(x, weights)
    x, _, _ = autocast_inputs(x, None, None)
    weights = [w if w.dtype == x.dtype else w.to(x.dtype) for w in weights]
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
    _check_eval_block(x, weights, biases, [1, 1, 1], [0, 1, 0], [1, 1, 1], "identity", 1)
    too_wide = (f"the single-launch kernel takes at most {BOTTLENECK_EVAL_MAX_MID} mid "
                f"channels, got {w1.shape[0]}" if w1.shape[0] > BOTTLENECK_EVAL_MAX_MID else None)
    kernels = select_kernels(backend, "residual_block", x, reason=too_wide)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights, *biases))
    if kernels == "triton" and not grad:
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
    signature = _eval_signature(x, weights, biases, strides, paddings, dilations, shortcut,
                                shortcut_stride)
    if signature is None or signature not in _EVAL_CHECKED:
        dilations = _check_lists(weights, dilations, strides=strides, paddings=paddings,
                                 biases=biases)
        _check_weight_dtypes(x, weights)
        for i, b in enumerate(biases):
            if not isinstance(b, Tensor):
                raise ValueError(f"biases[{i}] must be a (C_out,) tensor, got "
                                 f"{type(b).__name__}")
        cast_x, _, _ = autocast_inputs(x, None, None)
        _check_eval_block(cast_x, _as_cast(weights, cast_x.dtype), biases, strides, paddings,
                          dilations, shortcut, shortcut_stride)
        if len(_EVAL_CHECKED) >= _EVAL_CHECKED_MAX:
            _EVAL_CHECKED.clear()
        if signature is not None:
            _EVAL_CHECKED[signature] = None
    dilations = conv_dilations(dilations, len(weights))
    x, _, _ = autocast_inputs(x, None, None)
    weights = [w if w.dtype == x.dtype else w.to(x.dtype) for w in weights]
    kernels = select_kernels(backend, "residual_block", x)
    return _eval_chain(x, weights, biases, strides, paddings, dilations, shortcut,
                       shortcut_stride, kernels)


def _eval_signature(x, weights, biases, strides, paddings, dilations, shortcut,
                    shortcut_stride) -> Optional[tuple]:
    """What `residual_block_eval`'s check reads, or None where the arguments are not even
    lists of tensors (the check then says which): x's and every weight's and bias's shape,
    dtype and device, the autocast dtype, the lists' lengths and their exact values (True ==
    1 == 1.0 would otherwise let a refused stride share a checked signature)."""
    try:
        geometry = (len(weights), len(biases), len(strides), len(paddings),
                    None if dilations is None else len(dilations),
                    *[(type(v), v) for v in (*strides, *paddings, *(dilations or ()),
                                             shortcut_stride)])
        return (x.shape, x.dtype, x.device, shortcut, autocasting(x), geometry,
                *[(t.shape, t.dtype, t.device) for t in (*weights, *biases)])
    except (TypeError, AttributeError):
        return None


def _check_eval_block(x, weights, biases, strides, paddings, dilations, shortcut,
                      shortcut_stride) -> None:
    """`_check_block` of an inference block: each conv with its folded bias."""
    def check_conv(i, source, stride, padding, dilation):
        check_conv_bn_act_args(source, weights[i], None, biases[i], None, None, stride=stride,
                               padding=padding, groups=1, training=False, residual=None,
                               running_ok=True, dilation=dilation)

    _check_block(x, weights, strides, paddings, dilations, shortcut, shortcut_stride,
                 check_conv)


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
