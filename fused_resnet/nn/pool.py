"""`FusedMaxPool2d`: the ResNet stem's max-pool as a module, on this package's kernels; and
`conv_bn_relu_pool`, the whole stem (conv -> BN -> ReLU -> that pool) from its modules."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fused_resnet import ops
from fused_resnet.backend import check_backend_name, ops_recorded
from fused_resnet.nn.conv_bn import (
    _batchnorm_args,
    _count,
    adopt_frozen_bns,
    fused_conv_bn_act,
)
from fused_resnet.nn.fold_cache import cached_fold
from fused_resnet.nn.module_calls import (
    module_call_reason,
    tracing_layers,
    transform_reason,
    warn_module_calls,
)
from fused_resnet.nn.sync_bn import sync_group
from fused_resnet.ops.eval_plan import PlanCache, plan_stem_eval

# The inference stem's plans (`_stem_eval`), per conv module: one per input signature.
_STEM_PLANS = PlanCache()


class FusedMaxPool2d(nn.Module):
    """nn.MaxPool2d(kernel_size, stride, padding) (square, dilation 1, floor mode) through
    `ops.max_pool2d`: on Triton no int64 indices (none in inference, an int8 window position
    saved for backward), on the other backends ATen's pool. No parameters or buffers, like
    torchvision's `maxpool`."""

    def __init__(self, kernel_size: int = 3, stride: int = 2, padding: int = 1,
                 backend: str = "auto") -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.backend = check_backend_name(backend)

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles only this branch
            return self._torch_pool(x)
        # torch's pool in a traced graph or under a torch.func transform (the same values)
        if tracing_layers() or transform_reason() is not None:
            return self._torch_pool(x)
        return ops.max_pool2d(x, self.kernel_size, self.stride, self.padding,
                              backend=self.backend)

    def _torch_pool(self, x: Tensor) -> Tensor:
        return torch.nn.functional.max_pool2d(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, backend={self.backend!r}")


def conv_bn_relu_pool(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d,
                      pool: Optional[nn.Module], *, backend: str = "auto",
                      relu: Optional[nn.Module] = None) -> Tensor:
    """pool(relu(bn(conv(x)))) with the parameters and buffers of `conv` and `bn` (the
    ResNet stem; pool=None: no pool, the CIFAR nets' stem, `conv_bn_act`). `relu`: the
    stem's ReLU module (torchvision's `model.relu`), called as itself, with the others, where
    it is not a plain nn.ReLU or has hooks; None is torch.relu. In training, where `pool` is
    a FusedMaxPool2d on the same backend and the BN normalizes with this process's batch
    statistics, `ops.conv_bn_relu_max_pool` (on Triton one op that never writes
    relu(bn(y))); otherwise `conv_bn_act` then `pool`, in inference with BN folded into the
    conv and, called again alike, as a plan (`ops.eval_plan.StemEvalPlan`). A dilated conv
    takes the second way."""
    tracing = tracing_layers()
    others = () if pool is None else (pool,)
    # (a stem conv swapped in that fused ops cannot take, as nn.Conv2d's default bias=True for
    # grayscale input, is one reason: torch's computation, not an error)
    reason = None if tracing else module_call_reason([(conv, bn)], others, relu)
    if reason is not None:
        warn_module_calls("the stem", reason)
    if tracing or reason is not None:  # the modules called, as torchvision's stem does
        out = (torch.relu if relu is None else relu)(bn(conv(x)))
        return out if pool is None else pool(out)
    adopt_frozen_bns([(conv, bn)])
    if pool is None:
        return fused_conv_bn_act(x, conv, bn, backend=backend)
    if (not isinstance(pool, FusedMaxPool2d) or pool.backend != backend or conv.groups != 1
            or conv.dilation != (1, 1) or sync_group(bn) is not None):
        return pool(fused_conv_bn_act(x, conv, bn, backend=backend))
    if not bn.training:
        return _stem_eval(x, conv, bn, pool, backend)
    bn_args, counting = _batchnorm_args(bn)
    out = ops.conv_bn_relu_max_pool(
        x, conv.weight, bn.weight, bn.bias, bn_args["running_mean"], bn_args["running_var"],
        stride=conv.stride[0], padding=conv.padding[0], training=bn_args["training"],
        momentum=bn_args["momentum"], eps=bn.eps, pool_kernel=pool.kernel_size,
        pool_stride=pool.stride, pool_padding=pool.padding, backend=backend)
    _count(bn, counting)
    return out


def _stem_eval(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, pool: FusedMaxPool2d,
               backend: str) -> Tensor:
    """pool(conv_bn_act(x, conv, bn)) in inference; where BN folds into the conv, a plan of
    an earlier such call that matches this one (the same input signature and compute dtype,
    the same folded tensors: a refold after a weight or buffer changed makes new ones).
    `conv` is one the fused ops take (`conv_bn_relu_pool` asked `module_call_reason`)."""
    folded = cached_fold(x, conv, bn, backend)
    if folded is None:
        return pool(fused_conv_bn_act(x, conv, bn, backend=backend))
    weight, bias = folded
    args = dict(stride=conv.stride[0], padding=conv.padding[0],
                pool=(pool.kernel_size, pool.stride, pool.padding), backend=backend)
    traced = ops_recorded()  # a graph, or FlopCounterMode counting the ops
    plan = None if traced else _STEM_PLANS.find(conv, x, weight, bias, **args)
    if plan is not None:
        return plan(x)
    out = pool(ops.conv_bias_act(x, weight, bias, stride=args["stride"],
                                 padding=args["padding"], relu=True, backend=backend))
    if not traced:  # the calls above checked the arguments
        _STEM_PLANS.store(conv, plan_stem_eval(x, weight, bias, **args), [weight], [bias])
    return out
