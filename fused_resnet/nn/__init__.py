"""Modules: residual blocks and shortcuts that keep torchvision's state-dict layout."""

from fused_resnet.nn.blocks import FusedBasicBlock, FusedBottleneck
from fused_resnet.nn.conv_bn import FusedConvBNAct, conv_bn_act
from fused_resnet.nn.shortcut import ZeroPadShortcut, make_shortcut

__all__ = [
    "FusedBasicBlock",
    "FusedBottleneck",
    "FusedConvBNAct",
    "ZeroPadShortcut",
    "conv_bn_act",
    "make_shortcut",
]
