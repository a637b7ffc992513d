"""Functional fused ops (the layer between modules and kernels).

Importing this package registers the custom ops `torch.ops.fused_resnet.*`: those of
`conv_ops` and `block_ops` always, the fake kernels of the `_C` ops when `_C` is built, and
the single-launch Triton inference bottleneck when Triton is installed (TRITON_INTERPRET=1
must be set before that import to run Triton on CPU tensors).
"""

from fused_resnet.ops import (  # noqa: F401  (registers the ops)
    block_ops,
    conv_ops,
    flop_formulas,
    max_pool,
    native_kernels,
    stem,
)
from fused_resnet.ops.block import bottleneck_eval, residual_block_eval, residual_block_train
from fused_resnet.ops.bn_add_relu import bn_add_relu
from fused_resnet.ops.conv_bn_act import conv_bias_act, conv_bn_act
from fused_resnet.ops.max_pool import max_pool2d
from fused_resnet.ops.stem import conv_bn_relu_max_pool
from fused_resnet.ops.sync_bn import sync_batch_norm, sync_conv_bn_act

try:
    from fused_resnet.ops import triton_block  # noqa: F401
except ImportError:  # Triton not installed: the "triton" backend reports itself unavailable
    triton_block = None

flop_formulas.register()  # torch's FlopCounterMode counts the convs inside the ops above

__all__ = [
    "bn_add_relu",
    "bottleneck_eval",
    "conv_bias_act",
    "conv_bn_act",
    "conv_bn_relu_max_pool",
    "max_pool2d",
    "residual_block_eval",
    "residual_block_train",
    "sync_batch_norm",
    "sync_conv_bn_act",
]
