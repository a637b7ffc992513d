"""`residual_block_eval` prepared for the calls that repeat it with the same input signature and
the same folded weights: a block of a model serving a few input sizes (a block keeps a plan
per signature, up to `PLANS_PER_MODULE`, in a `PlanCache`); likewise the inference stem
(`StemEvalPlan`: conv + folded BN + ReLU, then the max-pool).

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

import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fused_resnet import backend as _backend
from fused_resnet import reference
from fused_resnet.ops import native_kernels
from fused_resnet.ops.conv_bn_act import autocast_dtype, compute_dtype
from fused_resnet.ops.layout import conv_dilations, conv_output_size, output_memory_format
from fused_resnet.triton.config import input_precision

PLANNED_KERNELS = ("triton", "cuda", "cpu")
PLANS_PER_MODULE = 4  # a server's few batch sizes, a loader's short last batch


class PlanCache:
    """Inference plans per module, beside the module rather than on it (weakly keyed), so that
    copying, pickling or scripting a model never meets one: one per input signature of the
    module's current folded weights, most recently used first, at most `limit`."""

    def __init__(self, limit: int = PLANS_PER_MODULE) -> None:
        self.limit = limit
        self._plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def find(self, owner, *args, **kwargs):
        """The plan of `owner` whose `matches(*args, **kwargs)`, moved to the front, or None."""
        plans = self._plans.get(owner)
        for i, plan in enumerate(plans or ()):
            if plan.matches(*args, **kwargs):
                if i:
                    plans.insert(0, plans.pop(i))
                return plan
        return None

    def store(self, owner, plan, weights: list[Tensor], biases: list[Tensor]) -> None:
        """Keeps `plan` (None: none to add) first, and of the others those made from these
        folded tensors (older folds' plans would keep their tensors alive)."""
        kept = [p for p in self._plans.get(owner, ()) if p.folded_from(weights, biases)]
        if plan is not None:
            kept = [plan, *kept[:self.limit - 1]]
        if kept:
            self._plans[owner] = kept
        else:
            self._plans.pop(owner, None)

    def __contains__(self, owner) -> bool:
        return owner in self._plans

    def __getitem__(self, owner) -> list:
        return self._plans[owner]

    def clear(self) -> None:
        self._plans.clear()


class NativeConv:
    """`native_kernels.conv_bias_act` as `conv_ops` runs it for one conv of a block:
    relu?(conv(x, weight) + bias (+ residual)) in x's memory format, the unit scale of its
    `bn_add_relu` made once."""

    def __init__(self, x_shape: tuple, weight: Tensor, bias: Tensor, *, stride: int,
                 padding: int, has_residual: bool, relu: bool, dilation: int = 1) -> None:
        self.out_shape = conv_output_size(x_shape, weight.shape, stride, padding, dilation)
        self.weight, self.bias, self.ones = weight, bias, torch.ones_like(bias)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.has_residual, self.relu = has_residual, relu

    def __call__(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        z = native_kernels.conv_bias_act(
            x, self.weight, self.bias, residual if self.has_residual else None, self.stride,
            self.padding, self.dilation, 1, self.relu, ones=self.ones)
        return z.contiguous(memory_format=output_memory_format(x))  # as conv_ops returns it


class BlockEvalPlan:
    """The convs of one inference block (`residual_block_eval`'s chain) prepared for x of one
    signature: main path a_i = relu(conv(a_{i-1}, w_i) + b_i), the last with the shortcut
    added before its ReLU, the shortcut x, zero_pad(x), conv(x, w_d) + b_d or nothing."""

    def __init__(self, x: Tensor, weights: list[Tensor], biases: list[Tensor],
                 strides: list[int], paddings: list[int], dilations: list[int], shortcut: str,
                 shortcut_stride: int, backend: str, kernels: str) -> None:
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
        self.strides, self.paddings, self.dilations = (list(strides), list(paddings),
                                                       list(dilations))
        self.shortcut, self.shortcut_stride = shortcut, shortcut_stride
        main = len(weights) - (shortcut == "projection")
        self.pad_channels = weights[main - 1].shape[0]  # option A pads x to the block's width
        self.main = []
        shape = tuple(x.shape)
        for i in range(main):
            self.main.append(prepared(
                shape, weights[i], biases[i], stride=strides[i], padding=paddings[i],
                dilation=dilations[i], has_residual=i == main - 1 and shortcut != "none",
                relu=True))
            shape = self.main[-1].out_shape
        self.projection = None
        if shortcut == "projection":
            self.projection = prepared(
                tuple(x.shape), weights[main], biases[main], stride=shortcut_stride, padding=0,
                has_residual=False, relu=False)

    def matches(self, x: Tensor, weights: list[Tensor], biases: list[Tensor], *,
                strides: list[int], paddings: list[int], shortcut: str, shortcut_stride: int = 1,
                backend: str = "auto", dilations: Optional[list[int]] = None) -> bool:
        """Whether `self(x)` computes residual_block_eval(x, weights, biases, ...) with these
        arguments (module doc)."""
        if (x.shape, x.stride(), x.dtype, x.device) != self.signature or backend != self.backend:
            return False
        dilations = conv_dilations(dilations, len(weights))
        if (strides, paddings, dilations, shortcut, shortcut_stride) != (
                self.strides, self.paddings, self.dilations, self.shortcut, self.shortcut_stride):
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
    autocast cast of x first, no input gradient for autograd to record, no torch.compile
    or FlopCounterMode to see the ops (`backend.ops_recorded`)."""
    if autocast_dtype(x.device.type) not in (None, x.dtype):
        return False
    return not (torch.is_grad_enabled() and x.requires_grad) and not _backend.ops_recorded()


def plan_block_eval(x: Tensor, weights: list[Tensor], biases: list[Tensor], *,
                    strides: list[int], paddings: list[int], shortcut: str,
                    shortcut_stride: int = 1, backend: str = "auto",
                    dilations: Optional[list[int]] = None) -> Optional[BlockEvalPlan]:
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
    return BlockEvalPlan(x, weights, biases, strides, paddings,
                         conv_dilations(dilations, len(weights)), shortcut, shortcut_stride,
                         backend, kernels)


class StemEvalPlan:
    """max_pool2d(conv_bias_act(x, weight, bias, relu=True), *pool), the ResNet stem in
    inference (BN folded into the conv) as `nn.conv_bn_relu_pool` runs it unplanned, for x of
    one signature and compute dtype: x cast as autocast casts it, the conv prepared as a
    block's (Triton: `PreparedConvFwd`, x read channels_last; `_C`: `NativeConv`), the pool
    launched with its arguments worked out (`triton.pool.PreparedMaxPoolFwd`; ATen's pool
    beside the `_C` conv, as `ops.max_pool2d` runs it there), the output in the unplanned
    call's layout."""

    def __init__(self, x: Tensor, dtype: torch.dtype, weight: Tensor, bias: Tensor, *,
                 stride: int, padding: int, pool: tuple, backend: str, triton: bool) -> None:
        self.signature = (x.shape, x.stride(), x.dtype, x.device, dtype)
        self.dtype, self.triton = dtype, triton
        self.weight, self.bias = weight, bias
        self.arguments = (stride, padding, tuple(pool), backend)
        self.precision = input_precision(dtype)
        self.backends = _stem_backends(backend, x.device)
        k, s, p = pool
        if triton:
            from fused_resnet.triton.conv_prepared import PreparedConvFwd
            from fused_resnet.triton.pool import PreparedMaxPoolFwd

            self.conv = PreparedConvFwd(tuple(x.shape), dtype, weight, bias, stride=stride,
                                        padding=padding, has_residual=False, relu=True)
            self.pool = PreparedMaxPoolFwd(self.conv.out_shape, dtype, k, s, p)
        else:
            self.conv = NativeConv(tuple(x.shape), weight, bias, stride=stride,
                                   padding=padding, has_residual=False, relu=True)
            self.pool = lambda a: F.max_pool2d(a, k, s, p)
        # unplanned, the conv's output takes the cast x's layout and the pool's output its
        # input's (meta tensors: the layouts without data)
        cast = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta").to(dtype)
        conv_out = torch.empty(self.conv.out_shape, device="meta",
                               memory_format=output_memory_format(cast))
        self.out_format = output_memory_format(conv_out)

    def matches(self, x: Tensor, weight: Tensor, bias: Tensor, *, stride: int, padding: int,
                pool: tuple, backend: str) -> bool:
        """Whether `self(x)` computes the stem's unplanned call with these arguments."""
        if (x.shape, x.stride(), x.dtype, x.device, compute_dtype(x)) != self.signature:
            return False
        if weight is not self.weight or bias is not self.bias:
            return False
        if (stride, padding, tuple(pool), backend) != self.arguments:
            return False
        if (torch.is_grad_enabled() and x.requires_grad) or _backend.ops_recorded():
            return False
        if input_precision(self.dtype) != self.precision:
            return False
        # select_kernels' choice given the resolved backends depends on the dtype alone
        return _stem_backends(backend, x.device) == self.backends

    def folded_from(self, weights: list[Tensor], biases: list[Tensor]) -> bool:
        return weights[0] is self.weight and biases[0] is self.bias

    def __call__(self, x: Tensor) -> Tensor:
        if self.triton:
            x = x.to(dtype=self.dtype, memory_format=torch.channels_last)
        elif x.dtype != self.dtype:
            x = x.to(self.dtype)
        return self.pool(self.conv(x)).contiguous(memory_format=self.out_format)


def _stem_backends(backend: str, device: torch.device) -> tuple[str, str]:
    """The backends `backend` resolves to for the stem's conv and pool on `device`."""
    return (_backend.resolve(backend, "conv_bn_act", device),
            _backend.resolve(backend, "max_pool", device))


def plan_stem_eval(x: Tensor, weight: Tensor, bias: Tensor, *, stride: int, padding: int,
                   pool: tuple, backend: str = "auto") -> Optional[StemEvalPlan]:
    """A plan of the inference stem with these arguments, which a call has checked, or None
    where it would not run as one: the reference ops, a pool on other kernels than the
    conv's (Triton with Triton, ATen's beside `_C`), a weight not in the compute dtype or
    a bias not contiguous, autograd or tracing."""
    if (torch.is_grad_enabled() and x.requires_grad) or _backend.ops_recorded():
        return None
    from fused_resnet.ops.conv_bn_act import select_kernels

    dtype = compute_dtype(x)
    probe = torch.empty(0, dtype=dtype, device=x.device)  # the cast x, as the conv sees it
    kernels = (select_kernels(backend, "conv_bn_act", probe),
               _backend.resolve(backend, "max_pool", x.device))
    if kernels[0] == "reference" or (kernels[0] == "triton") != (kernels[1] == "triton"):
        return None
    if weight.dtype != dtype or not bias.is_contiguous():
        return None
    return StemEvalPlan(x, dtype, weight, bias, stride=stride, padding=padding, pool=pool,
                        backend=backend, triton=kernels[0] == "triton")
