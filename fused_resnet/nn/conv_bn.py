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

from typing import Optional

import torch
from torch import Tensor, nn

from fused_resnet import ops
from fused_resnet.backend import check_backend_name


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


class FusedConvBNAct(nn.Module):
    """`relu?(BatchNorm2d(Conv2d(x)) + residual)` as one fused op.

    State-dict keys are those of an `nn.Conv2d` named `conv` (bias-free) and an
    `nn.BatchNorm2d` named `bn`: `conv.weight`, `bn.weight`, `bn.bias`, `bn.running_mean`,
    `bn.running_var`, `bn.num_batches_tracked`. BN keeps all of nn.BatchNorm2d's options
    (momentum=None, affine=False, track_running_stats=False).
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
        padding: Optional[int] = None, *, groups: int = 1, relu: bool = True,
        eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
        track_running_stats: bool = True, backend: str = "auto",
    ):
        super().__init__()
        padding = kernel_size // 2 if padding is None else padding
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                              groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, affine=affine,
                                 track_running_stats=track_running_stats)
        self.relu = relu
        self.backend = check_backend_name(backend)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """x: (N, C_in, H, W); residual: (N, C_out, H_out, W_out) or None."""
        return conv_bn_act(x, self.conv, self.bn, residual=residual, relu=self.relu,
                           backend=self.backend)

    def extra_repr(self) -> str:
        return f"relu={self.relu}, backend={self.backend!r}"
