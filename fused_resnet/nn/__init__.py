"""Modules: residual blocks and shortcuts that keep torchvision's state-dict layout."""

from fused_resnet.nn.blocks import FusedBasicBlock, FusedBottleneck
from fused_resnet.nn.conv_bn import FusedConvBNAct, conv_bn_act
from fused_resnet.nn.fold_cache import clear_fold_cache
from fused_resnet.nn.pool import FusedMaxPool2d, conv_bn_relu_pool
from fused_resnet.nn.shortcut import ZeroPadShortcut, make_shortcut
from fused_resnet.nn.sync_bn import FusedSyncBatchNorm, convert_sync_bn

__all__ = [
    "FusedBasicBlock",
    "FusedBottleneck",
    "FusedConvBNAct",
    "FusedMaxPool2d",
    "FusedSyncBatchNorm",
    "ZeroPadShortcut",
    "clear_fold_cache",
    "conv_bn_act",
    "conv_bn_relu_pool",
    "convert_sync_bn",
    "make_shortcut",
]
