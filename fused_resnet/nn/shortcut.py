"""The paper's shortcut options for a residual block whose shape may change.

- "A": identity; where the shape changes, subsample by the stride and append zero channels
  (no parameters).
- "B": identity; where the shape changes, a projection 1x1 conv (stride s) + BN (torchvision's
  `downsample`, the default).
- "C": a projection 1x1 conv + BN on every block.
- None: no shortcut at all (the paper's "plain" baseline nets).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

from torch import Tensor, nn

from fused_resnet import reference

SHORTCUTS = ("A", "B", "C", None)


def check_shortcut(shortcut: Optional[str]) -> Optional[str]:
    if shortcut not in SHORTCUTS:
        raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
    return shortcut


class ZeroPadShortcut(nn.Module):
    """Option A: x[:, :, ::stride, ::stride] with channels [C_in, out_channels) set to zero."""

    def __init__(self, out_channels: int, stride: int):
        super().__init__()
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        return reference.zero_pad_shortcut(x, self.out_channels, self.stride)

    def extra_repr(self) -> str:
        return f"out_channels={self.out_channels}, stride={self.stride}"


def make_shortcut(
    shortcut: Optional[str], in_channels: int, out_channels: int, stride: int,
    norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
) -> Union[nn.Sequential, ZeroPadShortcut, None]:
    """The block's `downsample` module for an option, or None for identity / no shortcut.

    A projection is `Sequential(Conv2d 1x1 stride s, norm_layer)` so its state-dict keys are
    torchvision's `downsample.0.weight`, `downsample.1.running_mean`, ...
    """
    check_shortcut(shortcut)
    reshapes = stride != 1 or in_channels != out_channels
    if shortcut == "C" or (shortcut == "B" and reshapes):
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
            norm_layer(out_channels),
        )
    if shortcut == "A" and reshapes:
        return ZeroPadShortcut(out_channels, stride)
    return None


def given_projection(downsample: nn.Module, shortcut: Optional[str], in_channels: int,
                     out_channels: int, stride: int) -> nn.Sequential:
    """A `downsample` passed to a block as torchvision's blocks take it (ResNet._make_layer
    makes `Sequential(conv1x1(in, out, stride), norm_layer(out))`), or ResNet-D's
    `Sequential(pool, conv1x1(in, out), norm_layer(out))` (an average pool, or any module,
    called as itself, then a 1x1 conv whose stride with the pool's makes the block's), checked
    to be such a projection: the block keeps the very module."""
    if shortcut not in ("B", "C"):
        raise ValueError(f"downsample is a projection, which needs shortcut 'B' or 'C', got "
                         f"shortcut={shortcut!r}")
    if not (isinstance(downsample, nn.Sequential) and len(downsample) in (2, 3)
            and isinstance(downsample[-2], nn.Conv2d)):
        raise ValueError("downsample must be None, Sequential(Conv2d 1x1, norm layer) as "
                         "torchvision's ResNet makes it, or Sequential(pool, Conv2d 1x1, norm "
                         f"layer) as ResNet-D's; got {downsample!r}")
    conv, pooled = downsample[-2], len(downsample) == 3
    if (conv.kernel_size, conv.padding, conv.dilation, conv.groups, conv.in_channels,
            conv.out_channels, conv.bias is None) != ((1, 1), (0, 0), (1, 1), 1, in_channels,
                                                      out_channels, True) or (
            not pooled and conv.stride != (stride, stride)):
        strided = "" if pooled else f", stride={stride}"
        raise ValueError(f"downsample's conv must be Conv2d({in_channels}, {out_channels}, "
                         f"kernel_size=1{strided}, bias=False), got {conv}")
    return downsample
