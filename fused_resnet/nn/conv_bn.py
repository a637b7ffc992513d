"""Runs an `nn.Conv2d` + `nn.BatchNorm2d` pair through the functional op, keeping the pair's
state-dict layout (the modules only hold the parameters and buffers).

BatchNorm bookkeeping is exactly `nn.BatchNorm2d`'s: in training with running stats the
update factor is `momentum`, or 1 / num_batches_tracked when `momentum is None` (cumulative
average), and `num_batches_tracked` increments; without running stats (or in training) the
batch statistics normalize. Unlike `nn.BatchNorm2d`, the counter only moves once the op has
succeeded, so a call that raises changes no state.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fused_resnet import ops


def conv_bn_act(
    x: Tensor,
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d,
    *,
    residual: Optional[Tensor] = None,
    relu: bool = True,
    backend: str = "auto",
) -> Tensor:
    """act(bn(conv(x)) + residual) with the parameters and buffers of `conv` and `bn`."""
    if conv.bias is not None:
        raise ValueError("conv must have bias=False (the BatchNorm shift plays its role)")
    if conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        raise ValueError("conv must have dilation 1 and padding_mode='zeros'")
    if conv.stride[0] != conv.stride[1] or not isinstance(conv.padding, tuple) or (
        conv.padding[0] != conv.padding[1]
    ):
        raise ValueError(
            f"conv must have square stride and padding, got {conv.stride}, {conv.padding}"
        )
    # Mirrors nn.BatchNorm2d.forward: which stats normalize, which get updated, and by how much.
    counting = bn.training and bn.track_running_stats and bn.num_batches_tracked is not None
    factor = 0.0 if bn.momentum is None else bn.momentum
    if counting and bn.momentum is None:
        factor = 1.0 / (int(bn.num_batches_tracked) + 1)
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    pass_stats = not bn.training or bn.track_running_stats
    out = ops.conv_bn_act(
        x, conv.weight, bn.weight, bn.bias,
        bn.running_mean if pass_stats else None,
        bn.running_var if pass_stats else None,
        stride=conv.stride[0], padding=conv.padding[0], groups=conv.groups,
        training=use_batch_stats, momentum=factor, eps=bn.eps,
        residual=residual, relu=relu, backend=backend,
    )
    if counting:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
    return out
