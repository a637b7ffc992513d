"""The paper's shortcut options for a residual block whose shape may change.

- "A": identity; where the shape changes, subsample by the stride and append zero channels
  (no parameters).
- "B": identity; where the shape changes, a projection 1x1 conv (stride s) + BN (torchvision's
  `downsample`, the default).
- "C": a projection 1x1 conv + BN on every block.
- None: no shortcut at all (the paper's "plain" baseline nets).
"""

from __future__ import annotations

from typing import Optional, Union

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
    shortcut: Optional[str], in_channels: int, out_channels: int, stride: int
) -> Union[nn.Sequential, ZeroPadShortcut, None]:
    """The block's `downsample` module for an option, or None for identity / no shortcut.

    A projection is `Sequential(Conv2d 1x1 stride s, BatchNorm2d)` so its state-dict keys are
    torchvision's `downsample.0.weight`, `downsample.1.running_mean`, ...
    """
    check_shortcut(shortcut)
    reshapes = stride != 1 or in_channels != out_channels
    if shortcut == "C" or (shortcut == "B" and reshapes):
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
            nn.BatchNorm2d(out_channels),
        )
    if shortcut == "A" and reshapes:
        return ZeroPadShortcut(out_channels, stride)
    return None
