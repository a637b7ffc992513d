"""Runs an `nn.Conv2d` + `nn.BatchNorm2d` pair through the functional op, keeping the pair's
state-dict layout (the modules only hold the parameters and buffers), and the module
`FusedConvBNAct` built on it.

BatchNorm bookkeeping is exactly `nn.BatchNorm2d`'s: in training with running stats the
update factor is `momentum`, or 1 / num_batches_tracked when `momentum is None` (cumulative
average), and `num_batches_tracked` increments; without running stats (or in training) the
batch statistics normalize. Unlike `nn.BatchNorm2d`, the counter only moves once the op has
succeeded, so a call that raises changes no state.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import Tensor, nn

from fused_resnet import ops
from fused_resnet.backend import check_backend_name
from fused_resnet.nn.fold_cache import FoldingModule, cached_fold
from fused_resnet.nn.module_calls import (
    module_call_reason,
    tracing_layers,
    warn_module_calls,
)
from fused_resnet.nn.sync_bn import convert_sync_bn, sync_group
from fused_resnet.ops.conv_bn_act import (
    autocasting,
    check_conv_bn_act_args,
    compute_dtype,
    select_kernels,
)
from fused_resnet.ops.layout import check_flags, conv_output_shape


def adopt_frozen_bns(pairs: list[tuple[nn.Conv2d, nn.Module]]) -> None:
    """torchvision FrozenBatchNorm2d modules among `pairs`' BNs (put into a fused module by
    hand, as a "freeze every BN" helper does) become FusedFrozenBatchNorm2d in place
    (`nn.frozen_bn.adopt`: the same object and buffers), which answers the BatchNorm2d
    attributes the fused code reads. Nothing to do unless torchvision's module is loaded."""
    frozen = getattr(sys.modules.get("torchvision.ops.misc"), "FrozenBatchNorm2d", None)
    if frozen is None:
        return
    for _, bn in pairs:
        if type(bn) is frozen:
            from fused_resnet.nn.frozen_bn import adopt

            adopt(bn)


def conv_bn_act(
    x: Tensor,
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d,
    *,
    residual: Optional[Tensor] = None,
    relu: bool = True,
    backend: str = "auto",
) -> Tensor:
    """act(bn(conv(x)) + residual) with the parameters and buffers of `conv` and `bn`; the
    modules themselves called where `module_call_reason` gives a reason (warned), or while
    torch.fx traces (call_module nodes named as in torchvision)."""
    tracing = tracing_layers()
    reason = None if tracing else module_call_reason([(conv, bn)])
    if reason is not None:
        warn_module_calls(f"{type(conv).__name__} + {type(bn).__name__}", reason)
    if tracing or reason is not None:
        out = bn(conv(x))
        out = out if residual is None else out + residual
        return torch.relu(out) if relu else out
    return fused_conv_bn_act(x, conv, bn, residual=residual, relu=relu, backend=backend)


def fused_conv_bn_act(
    x: Tensor,
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d,
    *,
    residual: Optional[Tensor] = None,
    relu: bool = True,
    backend: str = "auto",
) -> Tensor:
    """`conv_bn_act` through the fused ops, without its question whether the modules must be
    called instead (`module_call_reason`, which also asks whether the fused ops take the conv):
    for a block or stem that has asked it of all its modules this call."""
    adopt_frozen_bns([(conv, bn)])
    bn_args, counting = _batchnorm_args(bn)
    group = sync_group(bn)
    if group is not None:
        out = ops.sync_conv_bn_act(
            x, conv.weight, bn.weight, bn.bias, bn_args["running_mean"], bn_args["running_var"],
            stride=conv.stride[0], padding=conv.padding[0], groups=conv.groups,
            momentum=bn_args["momentum"], eps=bn.eps, residual=residual, relu=relu, group=group,
            dilation=conv.dilation[0])
        _count(bn, counting)
        return out
    folded = cached_fold(x, conv, bn, backend)
    if folded is not None:
        return ops.conv_bias_act(x, *folded, stride=conv.stride[0], padding=conv.padding[0],
                                 residual=residual, relu=relu, backend=backend,
                                 dilation=conv.dilation[0])
    out = ops.conv_bn_act(
        x, conv.weight, bn.weight, bn.bias, bn_args["running_mean"], bn_args["running_var"],
        stride=conv.stride[0], padding=conv.padding[0], groups=conv.groups,
        training=bn_args["training"], momentum=bn_args["momentum"], eps=bn.eps,
        residual=residual, relu=relu, backend=backend, dilation=conv.dilation[0],
    )
    _count(bn, counting)
    return out


def check_chain(x: Tensor, pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]], backend: str,
                residual_shape: Optional[tuple[int, ...]] = None) -> None:
    """Raises what `conv_bn_act` would raise for any pair of a chain run one pair after the
    other (each conv taking the last one's output; the last adding a residual of
    `residual_shape`), before any of them runs, so that no failure can follow an earlier
    BN's running-stat update: each pair's argument check on shape-only stand-ins of its
    input (x's compute dtype, nothing allocated) and the backend's choice of kernels. A pair
    whose BN is synchronized is left to its own op (its batch is the group's). The convs are
    ones the fused ops take (the caller asked `module_call_reason`)."""
    dtype = compute_dtype(x)
    # under autocast the weights run in its dtype, whatever x's (a block's input is already
    # in it after the stem: comparing x's dtype with the compute dtype would miss that)
    autocast = autocasting(x) is not None

    def stand_in(like: Tensor, shape) -> Tensor:  # shape only: one element, expanded
        return like.new_empty(1, dtype=dtype).expand(shape)

    shape = tuple(x.shape)
    for i, (conv, bn) in enumerate(pairs):
        source = stand_in(x, shape)
        last = i == len(pairs) - 1
        if sync_group(bn) is None:
            args, _ = _batchnorm_args(bn)
            weight = stand_in(conv.weight, conv.weight.shape) if autocast else conv.weight
            residual = stand_in(x, residual_shape) if last and residual_shape else None
            check_conv_bn_act_args(
                source, weight, bn.weight, bn.bias, args["running_mean"], args["running_var"],
                stride=conv.stride[0], padding=conv.padding[0], groups=conv.groups,
                training=args["training"], residual=residual, eps=bn.eps,
                dilation=conv.dilation[0])
            select_kernels(backend, "conv_bn_act", source, groups=conv.groups)
        shape = conv_output_shape(source, conv.weight, conv.stride[0], conv.padding[0],
                                  conv.dilation[0])


def _batchnorm_args(bn: nn.BatchNorm2d) -> tuple[dict, bool]:
    """Mirrors nn.BatchNorm2d.forward: which stats normalize (training = batch stats), which
    running stats get updated and by what factor; and whether num_batches_tracked counts."""
    counting = bn.training and bn.track_running_stats and bn.num_batches_tracked is not None
    factor = 0.0 if bn.momentum is None else bn.momentum
    if counting and bn.momentum is None:
        factor = 1.0 / (int(bn.num_batches_tracked) + 1)
    pass_stats = not bn.training or bn.track_running_stats
    return {
        "running_mean": bn.running_mean if pass_stats else None,
        "running_var": bn.running_var if pass_stats else None,
        "training": bn.training or (bn.running_mean is None and bn.running_var is None),
        "momentum": factor,
    }, counting


def _count(bn: nn.BatchNorm2d, counting: bool) -> None:
    """num_batches_tracked += 1 after a successful training call (never before: a call that
    raises must leave it as it was)."""
    _count_all([bn] if counting else [])


def _count_all(bns: list[nn.BatchNorm2d]) -> None:
    """_count for several BNs of one call, in one multi-tensor op."""
    if bns:  # (integer buffers: no autograd, and no grad-mode switch for torch.export)
        torch._foreach_add_([bn.num_batches_tracked for bn in bns], 1)


def fusable_block(pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]]) -> bool:
    """Whether conv + BN pairs can run as one block op: every BN normalizes with batch
    statistics of this process only and is affine, every conv is ungrouped (and one the fused
    ops take: the caller asked `module_call_reason`)."""
    for conv, bn in pairs:
        if not (bn.training and bn.affine) or conv.groups != 1:
            return False
        if sync_group(bn) is not None:
            return False
    return True


def residual_block(
    x: Tensor, pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]], shortcut: str,
    shortcut_stride: int, backend: str,
) -> Tensor:
    """Training forward of a block of conv + BN pairs (main path, then a projection when
    shortcut == "projection") as one op, with nn.BatchNorm2d's bookkeeping for every BN."""
    args = [_batchnorm_args(bn) for _, bn in pairs]
    out = ops.residual_block_train(
        x, [c.weight for c, _ in pairs], [bn.weight for _, bn in pairs],
        [bn.bias for _, bn in pairs], [a["running_mean"] for a, _ in args],
        [a["running_var"] for a, _ in args], strides=[c.stride[0] for c, _ in pairs],
        paddings=[c.padding[0] for c, _ in pairs], momenta=[a["momentum"] for a, _ in args],
        eps=[bn.eps for _, bn in pairs], shortcut=shortcut, shortcut_stride=shortcut_stride,
        backend=backend, dilations=[c.dilation[0] for c, _ in pairs])
    _count_all([bn for (_, bn), (_, counting) in zip(pairs, args) if counting])
    return out


class FusedConvBNAct(FoldingModule):
    """`relu?(BatchNorm2d(Conv2d(x)) + residual)` as one fused op.

    State-dict keys are those of an `nn.Conv2d` named `conv` (bias-free) and an
    `nn.BatchNorm2d` named `bn`: `conv.weight`, `bn.weight`, `bn.bias`, `bn.running_mean`,
    `bn.running_var`, `bn.num_batches_tracked`. BN keeps all of nn.BatchNorm2d's options
    (momentum=None, affine=False, track_running_stats=False). `sync_bn=True` (or a
    `process_group`) makes `bn` a FusedSyncBatchNorm: batch statistics over the group.
    padding=None pads by dilation * (kernel_size - 1) // 2: "same" size at stride 1 for an odd
    kernel, dilated or not.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
        padding: Optional[int] = None, *, groups: int = 1, relu: bool = True,
        eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
        track_running_stats: bool = True, backend: str = "auto", sync_bn: bool = False,
        process_group=None, dilation: int = 1,
    ):
        super().__init__()
        if dilation < 1:
            raise ValueError(f"dilation must be >= 1, got {dilation}")
        check_flags(relu=relu)
        padding = dilation * (kernel_size - 1) // 2 if padding is None else padding
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                              dilation=dilation, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, affine=affine,
                                 track_running_stats=track_running_stats)
        self.relu = relu
        self.backend = check_backend_name(backend)
        if sync_bn or process_group is not None:
            self.bn = convert_sync_bn(self.bn, process_group)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """x: (N, C_in, H, W); residual: (N, C_out, H_out, W_out) or None."""
        if torch.jit.is_scripting():  # TorchScript compiles only this branch: torch's layers
            y = self.bn(self.conv(x))
            y = y if residual is None else y + residual
            return torch.relu(y) if self.relu else y
        return conv_bn_act(x, self.conv, self.bn, residual=residual, relu=self.relu,
                           backend=self.backend)

    def extra_repr(self) -> str:
        return f"relu={self.relu}, backend={self.backend!r}"
