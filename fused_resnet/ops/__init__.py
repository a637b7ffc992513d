"""Functional fused ops (the layer between modules and kernels)."""

from fused_resnet.ops.bn_add_relu import bn_add_relu
from fused_resnet.ops.conv_bn_act import conv_bn_act

__all__ = ["bn_add_relu", "conv_bn_act"]
