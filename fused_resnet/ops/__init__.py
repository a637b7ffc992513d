"""Functional fused ops (the layer between modules and kernels).

Importing this package registers the Triton custom ops (`torch.ops.fused_resnet.*`) when
Triton is installed; TRITON_INTERPRET=1 must be set before that import to run them on CPU.
"""

from fused_resnet.ops.block import bottleneck_eval, residual_block_train
from fused_resnet.ops.bn_add_relu import bn_add_relu
from fused_resnet.ops.conv_bn_act import conv_bias_act, conv_bn_act

try:  # registers the custom ops
    from fused_resnet.ops import triton_block, triton_ops  # noqa: F401
except ImportError:  # Triton not installed: the "triton" backend reports itself unavailable
    triton_block = triton_ops = None

__all__ = [
    "bn_add_relu",
    "bottleneck_eval",
    "conv_bias_act",
    "conv_bn_act",
    "residual_block_train",
]
