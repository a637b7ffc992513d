"""`residual_block_eval` prepared for the calls that repeat it with the same input signature and
the same folded weights: a block of a model serving a few input sizes (a block keeps a plan
per signature, up to `nn.blocks.PLANS_PER_BLOCK`).

`plan_block_eval(...)` (after a call of `residual_block_eval` with the same arguments has
checked them) returns a `BlockEvalPlan` holding each conv prepared: on Triton a
`PreparedConvFwd` (output shape, GEMM view of the weight, launch arguments and config worked
out once), on the `_C` kernels a `NativeConv` (ATen's conv and `bn_add_relu` with its unit
scale made once, not a `ones_like` launch a conv); or None where the call would not run as a
plan (the reference ops, x not channels_last on Triton, a cast or autograd in the way).
`plan.matches(x, weights, biases, **arguments)` says whether it computes
`residual_block_eval(x, weights, biases, **arguments)` for this call: x's shape, strides,
dtype and device as planned, the very weight and bias tensors (a refold makes new ones), the
same conv strides, paddings and shortcut, the same kernels resolved, no autocast cast of x,
no autograd; then `plan(x)` equals that call's output. A ResNet-50 bf16 inference
call at batch 1 spends ~2.1 ms of host time in our Python without plans and ~1.1 ms with them
(Triton's launches stubbed: `benchmarks/bench_host.py`, 2-core VM).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fused_resnet import backend as _backend
from fused_resnet import reference
from fused_resnet.ops import native_kernels
from fused_resnet.ops.layout import conv_output_size, output_memory_format
from fused_resnet.triton.config import input_precision

PLANNED_KERNELS = ("triton", "cuda", "cpu")


class NativeConv:
    """`native_kernels.conv_bias_act` as `conv_ops` runs it for one conv of a block:
    relu?(conv(x, weight) + bias (+ residual)) in x's memory format, the unit scale of its
    `bn_add_relu` made once."""

    def __init__(self, x_shape: tuple, weight: Tensor, bias: Tensor, *, stride: int,
                 padding: int, has_residual: bool, relu: bool) -> None:
        self.out_shape = conv_output_size(x_shape, weight.shape, stride, padding)
        self.weight, self.bias, self.ones = weight, bias, torch.ones_like(bias)
        self.stride, self.padding = stride, padding
        self.has_residual, self.relu = has_residual, relu

    def __call__(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        z = native_kernels.conv_bias_act(
            x, self.weight, self.bias, residual if self.has_residual else None, self.stride,
            self.padding, 1, self.relu, ones=self.ones)
        return z.contiguous(memory_format=output_memory_format(x))  # as conv_ops returns it


class BlockEvalPlan:
    """The convs of one inference block (`residual_block_eval`'s chain) prepared for x of one
    signature: main path a_i = relu(conv(a_{i-1}, w_i) + b_i), the last with the shortcut
    added before its ReLU, the shortcut x, zero_pad(x), conv(x, w_d) + b_d or nothing."""

    def __init__(self, x: Tensor, weights: list[Tensor], biases: list[Tensor],
                 strides: list[int], paddings: list[int], shortcut: str, shortcut_stride: int,
                 backend: str, kernels: str) -> None:
        if kernels == "triton":
            from fused_resnet.triton.conv_prepared import PreparedConvFwd

            def prepared(shape, weight, bias, **kwargs):
                return PreparedConvFwd(shape, x.dtype, weight, bias, **kwargs)
        else:
            prepared = NativeConv
        self.signature = (x.shape, x.stride(), x.dtype, x.device)
        self.weights, self.biases = tuple(weights), tuple(biases)
        self.backend, self.kernels = backend, kernels
        self.precision = input_precision(x.dtype)
        self.strides, self.paddings = list(strides), list(paddings)
        self.shortcut, self.shortcut_stride = shortcut, shortcut_stride
        main = len(weights) - (shortcut == "projection")
        self.pad_channels = weights[main - 1].shape[0]  # option A pads x to the block's width
        self.main = []
        shape = tuple(x.shape)
        for i in range(main):
            self.main.append(prepared(
                shape, weights[i], biases[i], stride=strides[i], padding=paddings[i],
                has_residual=i == main - 1 and shortcut != "none", relu=True))
            shape = self.main[-1].out_shape
        self.projection = None
        if shortcut == "projection":
            self.projection = prepared(
                tuple(x.shape), weights[main], biases[main], stride=shortcut_stride, padding=0,
                has_residual=False, relu=False)

    def matches(self, x: Tensor, weights: list[Tensor], biases: list[Tensor], *,
                strides: list[int], paddings: list[int], shortcut: str, shortcut_stride: int = 1,
                backend: str = "auto") -> bool:
        """Whether `self(x)` computes residual_block_eval(x, weights, biases, ...) with these
        arguments (module doc)."""
        if (x.shape, x.stride(), x.dtype, x.device) != self.signature or backend != self.backend:
            return False
        if (strides, paddings, shortcut, shortcut_stride) != (
                self.strides, self.paddings, self.shortcut, self.shortcut_stride):
            return False
        if not self.folded_from(weights, biases):
            return False
        if not _plannable_call(x) or input_precision(x.dtype) != self.precision:
            return False
        return _backend.resolve(backend, "residual_block", x.device) == self.kernels

    def folded_from(self, weights: list[Tensor], biases: list[Tensor]) -> bool:
        """Whether the plan holds these very folded weight and bias tensors."""
        return (len(weights) == len(self.weights) and len(biases) == len(self.biases)
                and all(a is b for a, b in zip(weights, self.weights))
                and all(a is b for a, b in zip(biases, self.biases)))

    def __call__(self, x: Tensor) -> Tensor:
        residual = None
        if self.shortcut == "identity":
            residual = x
        elif self.shortcut == "zero_pad":
            residual = reference.zero_pad_shortcut(x, self.pad_channels, self.shortcut_stride)
            if self.kernels == "triton":  # the conv kernel reads it as the output is laid out
                residual = residual.contiguous(memory_format=torch.channels_last)
        elif self.shortcut == "projection":
            residual = self.projection(x)
        out = x
        last = len(self.main) - 1
        for i, conv in enumerate(self.main):
            out = conv(out, residual if i == last else None)
        return out


def _plannable_call(x: Tensor) -> bool:
    """Whether residual_block_eval would run x as it is, outside autograd and tracing: no
    autocast cast of x first, no input gradient for autograd to record, no torch.compile."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != x.dtype:
        return False
    return not (torch.is_grad_enabled() and x.requires_grad) and not torch.compiler.is_compiling()


def plan_block_eval(x: Tensor, weights: list[Tensor], biases: list[Tensor], *,
                    strides: list[int], paddings: list[int], shortcut: str,
                    shortcut_stride: int = 1, backend: str = "auto") -> Optional[BlockEvalPlan]:
    """A plan of `residual_block_eval(x, weights, biases, ...)` with these arguments, which a
    call has checked, or None where it would not run as one: the reference ops, on Triton x
    not stored channels_last (the chain's outputs then take x's layout), a weight not in x's
    dtype or a bias not contiguous, or a call no plan may take (`_plannable_call`)."""
    if x.dim() != 4 or not _plannable_call(x):
        return None
    kernels = _backend.resolve(backend, "residual_block", x.device)
    if kernels not in PLANNED_KERNELS:
        return None
    if kernels == "triton" and (not x.is_contiguous(memory_format=torch.channels_last)
                                or x.is_contiguous()):
        return None
    if any(w.dtype != x.dtype for w in weights) or not all(b.is_contiguous() for b in biases):
        return None
    return BlockEvalPlan(x, weights, biases, strides, paddings, shortcut, shortcut_stride,
                         backend, kernels)
