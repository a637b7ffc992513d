"""A whole residual block in training as one custom op, `fused_resnet::block_train` (+ its
backward op): one schema, fake kernel and autograd formula, whatever kernels run it.

For main-path convs w_1..w_L (L = 2 basic, 3 bottleneck; conv i with strides[i],
paddings[i], dilations[i]) and an optional projection w_d (1x1, shortcut_stride):
    y_1 = conv(x, w_1)                                  + batch statistics of y_1
    y_i = conv(relu(bn_{i-1}(y_{i-1})), w_i)
    z   = relu(bn_L(y_L) + shortcut)
          shortcut = x | zero_pad(x) | bn_d(conv(x, w_d)) | nothing (plain block)
Outputs: z (x's memory format), the kernels' encoding of its ReLU mask [z > 0] (Triton: bits,
16x fewer bytes for backward to read than a bf16 z; native: an empty tensor, the mask is read
from z), the raw conv outputs y_i (`activation_format(x)` of the kernels; an empty tensor for
those the kernels never write, `unwritten_ys`: on Triton a bottleneck's y_3), each BN's batch
mean and biased variance, from which the caller updates the running statistics, and each
BN's (rstd, scale, shift) as a (3, C) tensor, as the forward applied it. Autograd saves only
x, the mask (z where it is empty), the y_i, the means and those (3, C) rows: backward
recomputes relu(bn(y)) where it needs it, so no normalized or activated tensor is kept, and
it sees the forward's ReLU mask exactly (no rstd recomputed from the variance). Where the
kernels' backward does without a y_i (`unkept_ys`: on Triton a bottleneck's y_3 and a
projection's y_d), an empty tensor is saved in its place.
The backward op takes `need_dx`: where x needs no gradient (the first trainable block after
frozen layers) neither the first conv's nor the projection's data gradient is computed and
dx is an empty tensor; and `need_dw`, one flag per weight: a frozen weight's gradient (a
third of its conv's training FLOPs) is not computed and is an empty tensor. Both flags also
drop gradients the backward pass does not use (`ops.grad_needs`).
`kernels` picks the bodies: "triton" (`ops.triton_block`: BN + ReLU applied on load inside
the convs) or "native" (`ops.native_block`: ATen's convolution and the `_C` kernels).
"""

from __future__ import annotations

from types import ModuleType

# typing.List, not list, in custom-op signatures: torch < 2.6 evaluates their annotations in
# its own namespace, where typing.List[Tensor] / List[int] / List[float] are schema types.
from typing import List, Optional

import torch
from torch import Tensor

from fused_resnet.backend import ops_recorded
from fused_resnet.ops.conv_ops import (
    _as_input_grad,
    _as_weight,
    _dw_fake,
    _dx_fake,
    kernels_module,
)
from fused_resnet.ops.first_order import first_order
from fused_resnet.ops.grad_needs import used_by_pass
from fused_resnet.ops.layout import conv_output_shape, output_memory_format, stat_dtype

SHORTCUTS = ("identity", "zero_pad", "projection", "none")


def block_module(kernels: str) -> ModuleType:
    """`ops.triton_block` or `ops.native_block` (imported on first use: Triton is optional)."""
    return kernels_module(kernels, "block")


def _forward(x, weights, gammas, betas, strides, paddings, dilations, eps, shortcut,
             shortcut_stride, kernels):
    z, mask, ys, means, variances, affines = block_module(kernels).block_train(
        x, weights, gammas, betas, strides, paddings, dilations, eps, shortcut,
        shortcut_stride)
    return (z.contiguous(memory_format=output_memory_format(x)), mask, ys, means, variances,
            affines)


def _backward_bodies(dz, x, relu_mask, weights, gammas, betas, ys, means, affines, strides,
                     paddings, dilations, eps, shortcut, shortcut_stride, kernels, need_dx,
                     need_dw):
    dx, dws, dgammas, dbetas = block_module(kernels).block_train_backward(
        dz, x, relu_mask, weights, gammas, betas, ys, means, affines, strides, paddings,
        dilations, eps, shortcut, shortcut_stride, need_dx, need_dw)
    return (_as_input_grad(dx, x),
            [_as_weight(dw, w) for dw, w in zip(dws, weights)],
            [dg.to(g.dtype) for dg, g in zip(dgammas, gammas)],
            [db.to(b.dtype) for db, b in zip(dbetas, betas)])


@torch.library.custom_op("fused_resnet::block_train", mutates_args=())
def block_train(
    x: Tensor, weights: List[Tensor], gammas: List[Tensor], betas: List[Tensor],
    strides: List[int], paddings: List[int], dilations: List[int], eps: List[float],
    shortcut: str, shortcut_stride: int, kernels: str,
) -> tuple[Tensor, Tensor, List[Tensor], List[Tensor], List[Tensor], List[Tensor]]:
    return _forward(x, weights, gammas, betas, strides, paddings, dilations, eps, shortcut,
                    shortcut_stride, kernels)


@block_train.register_fake
def _(x, weights, gammas, betas, strides, paddings, dilations, eps, shortcut, shortcut_stride,
      kernels):
    main = len(weights) - (shortcut == "projection")
    shapes, inp = [], x
    for i in range(main):
        shapes.append(conv_output_shape(inp, weights[i], strides[i], paddings[i], dilations[i]))
        inp = torch.empty(shapes[-1], device="meta")
    if shortcut == "projection":
        shapes.append(conv_output_shape(x, weights[-1], shortcut_stride, 0))
    y_format = kernels_module(kernels).activation_format(x)
    z = torch.empty(shapes[main - 1], device=x.device, dtype=x.dtype,
                    memory_format=output_memory_format(x))
    unwritten = block_module(kernels).unwritten_ys(weights, strides, paddings, shortcut)
    ys = [torch.empty(0 if i in unwritten else s, device=x.device, dtype=x.dtype,
                      memory_format=torch.contiguous_format if i in unwritten else y_format)
          for i, s in enumerate(shapes)]
    stats = [torch.empty(s[1], device=x.device, dtype=stat_dtype(x.dtype)) for s in shapes]
    affines = [torch.empty((3, s[1]), device=x.device, dtype=stat_dtype(x.dtype))
               for s in shapes]
    return (z, block_module(kernels).relu_mask_like(z), ys, stats,
            [torch.empty_like(s) for s in stats], affines)


@torch.library.custom_op("fused_resnet::block_train_backward", mutates_args=())
def block_train_backward(
    dz: Tensor, x: Tensor, relu_mask: Tensor, weights: List[Tensor], gammas: List[Tensor],
    betas: List[Tensor], ys: List[Tensor], means: List[Tensor], affines: List[Tensor],
    strides: List[int], paddings: List[int], dilations: List[int], eps: List[float],
    shortcut: str, shortcut_stride: int, kernels: str, need_dx: bool,
    need_dw: Optional[List[bool]] = None,
) -> tuple[Tensor, List[Tensor], List[Tensor], List[Tensor]]:
    """(dx (empty without need_dx), d weights (each empty where need_dw says so; None: all
    computed), d gammas, d betas), lists in the order of the inputs; relu_mask: block_train's,
    or z where that is empty. need_dw has a default (`ops.conv_ops`: arguments added
    later)."""
    need_dw = [True] * len(weights) if need_dw is None else need_dw
    return _backward_bodies(dz, x, relu_mask, weights, gammas, betas, ys, means, affines, strides,
                            paddings, dilations, eps, shortcut, shortcut_stride, kernels, need_dx,
                            need_dw)


@block_train_backward.register_fake
def _(dz, x, relu_mask, weights, gammas, betas, ys, means, affines, strides, paddings,
      dilations, eps, shortcut, shortcut_stride, kernels, need_dx, need_dw=None):
    need_dw = [True] * len(weights) if need_dw is None else need_dw
    return (_dx_fake(x, need_dx), [_dw_fake(w, need) for w, need in zip(weights, need_dw)],
            [torch.empty_like(g) for g in gammas], [torch.empty_like(b) for b in betas])


def _setup(ctx, inputs, output):
    (x, weights, gammas, betas, strides, paddings, dilations, eps, shortcut, shortcut_stride,
     kernels) = inputs
    z, mask, ys, means, _variances, affines = output
    unkept = block_module(kernels).unkept_ys(weights, strides, paddings, shortcut)
    ys = [y.new_empty(0) if i in unkept else y for i, y in enumerate(ys)]  # empty in their place
    ctx.save_for_backward(x, mask if mask.numel() else z, *weights, *gammas, *betas, *ys,
                          *means, *affines)
    ctx.args = (len(weights), strides, paddings, dilations, eps, shortcut, shortcut_stride,
                kernels)
    ctx.set_materialize_grads(False)  # no zero gradients for the ys and statistics


def _per_weight(needs, k: int) -> List[bool]:
    """The custom op's `needs_input_grad` entry for its weights list as k flags (torch gives a
    list for a list input; one flag stands for all)."""
    return [bool(n) for n in needs] if isinstance(needs, (list, tuple)) else [bool(needs)] * k


@first_order("fused_resnet::block_train")
def _backward(ctx, dz, _dmask, _dys, _dmeans, _dvars, _daffines, backward=None,
              need_dx=None, need_dw=None):
    if dz is None:  # z did not reach the loss
        return (None,) * 11
    k, *args = ctx.args
    if need_dx is None:  # the custom op's autograd: x, then the weights, are its inputs
        need_dx = ctx.needs_input_grad[0]
        need_dw = _per_weight(ctx.needs_input_grad[1], k)
    # where they require grad and this backward pass uses the gradient (x, then the weights,
    # lead the tensor inputs of both the op and its twin)
    need_dx, *need_dw = used_by_pass(ctx, [need_dx, *need_dw])
    x, mask, *rest = ctx.saved_tensors
    lists = [list(rest[i * k:(i + 1) * k]) for i in range(6)]
    dx, dw, dg, db = (backward or block_train_backward)(dz, x, mask, *lists, *args, need_dx,
                                                        need_dw)
    dw = [d if need else None for d, need in zip(dw, need_dw)]
    return dx if need_dx else None, dw, dg, db, *(None,) * 7


block_train.register_autograd(_backward, setup_context=_setup)


class _BlockTrainFunction(torch.autograd.Function):
    """The eager twin of `fused_resnet::block_train`: the same bodies, saved tensors and
    backward without the custom-op dispatch. Lists of tensors are flattened into the
    arguments (autograd.Function differentiates only direct tensor arguments)."""

    @staticmethod
    def forward(ctx, k, strides, paddings, dilations, eps, shortcut, shortcut_stride, kernels, x,
                *flat):
        weights, gammas, betas = (list(flat[i * k:(i + 1) * k]) for i in range(3))
        inputs = (x, weights, gammas, betas, strides, paddings, dilations, eps, shortcut,
                  shortcut_stride, kernels)
        z, mask, ys, means, variances, affines = _forward(*inputs)
        _setup(ctx, inputs, (z, mask, ys, means, variances, affines))
        ctx.mark_non_differentiable(mask, *ys, *means, *variances, *affines)
        return z, mask, *ys, *means, *variances, *affines

    @staticmethod
    def backward(ctx, dz, *_):
        if dz is None:
            return (None,) * (9 + 3 * ctx.args[0])
        k = ctx.args[0]  # x after 8 non-tensors, then the k weights
        dx, dw, dg, db, *_ = _backward(ctx, dz, None, None, None, None, None,
                                       backward=_backward_bodies,
                                       need_dx=ctx.needs_input_grad[8],
                                       need_dw=list(ctx.needs_input_grad[9:9 + k]))
        return (None,) * 8 + (dx, *dw, *dg, *db)


def block_train_call(x, weights, gammas, betas, strides, paddings, dilations, eps, shortcut,
                     shortcut_stride, kernels):
    """block_train's (z, ys, means, variances, affines) (its ReLU mask is for backward): the
    custom op while torch.compile traces or FlopCounterMode counts (`ops_recorded`), its
    eager twin otherwise."""
    if ops_recorded():
        z, _mask, *rest = block_train(x, weights, gammas, betas, strides, paddings, dilations,
                                      eps, shortcut, shortcut_stride, kernels)
        return z, *rest
    k = len(weights)
    z, _mask, *rest = _BlockTrainFunction.apply(k, strides, paddings, dilations, eps, shortcut,
                                                shortcut_stride, kernels, x, *weights, *gammas,
                                                *betas)
    return z, rest[:k], rest[k:2 * k], rest[2 * k:3 * k], rest[3 * k:]
