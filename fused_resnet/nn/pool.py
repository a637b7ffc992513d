"""`FusedMaxPool2d`: the ResNet stem's max-pool as a module, on this package's kernels; and
`conv_bn_relu_pool`, the whole stem (conv -> BN -> ReLU -> that pool) from its modules."""

from __future__ import annotations

from torch import Tensor, nn

from fused_resnet import ops
from fused_resnet.backend import check_backend_name
from fused_resnet.nn.conv_bn import (
    _batchnorm_args,
    _count,
    check_conv,
    conv_bn_act,
)
from fused_resnet.nn.sync_bn import sync_group


class FusedMaxPool2d(nn.Module):
    """nn.MaxPool2d(kernel_size, stride, padding) (square, dilation 1, floor mode) through
    `ops.max_pool2d`: on Triton no int64 indices (none in inference, an int8 window position
    saved for backward), on the other backends ATen's pool. No parameters or buffers, like
    torchvision's `maxpool`."""

    def __init__(self, kernel_size: int = 3, stride: int = 2, padding: int = 1,
                 backend: str = "auto") -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.backend = check_backend_name(backend)

    def forward(self, x: Tensor) -> Tensor:
        return ops.max_pool2d(x, self.kernel_size, self.stride, self.padding,
                              backend=self.backend)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, backend={self.backend!r}")


def conv_bn_relu_pool(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, pool: nn.Module, *,
                      backend: str = "auto") -> Tensor:
    """pool(relu(bn(conv(x)))) with the parameters and buffers of `conv` and `bn` (the
    ResNet stem). In training, where `pool` is a FusedMaxPool2d on the same backend and the
    BN normalizes with this process's batch statistics, `ops.conv_bn_relu_max_pool` (on
    Triton one op that never writes relu(bn(y))); otherwise, inference included (BN folded
    into the conv), `conv_bn_act` then `pool`."""
    if (not bn.training or not isinstance(pool, FusedMaxPool2d) or pool.backend != backend
            or conv.groups != 1 or sync_group(bn) is not None):
        return pool(conv_bn_act(x, conv, bn, backend=backend))
    check_conv(conv)
    bn_args, counting = _batchnorm_args(bn)
    out = ops.conv_bn_relu_max_pool(
        x, conv.weight, bn.weight, bn.bias, bn_args["running_mean"], bn_args["running_var"],
        stride=conv.stride[0], padding=conv.padding[0], training=bn_args["training"],
        momentum=bn_args["momentum"], eps=bn.eps, pool_kernel=pool.kernel_size,
        pool_stride=pool.stride, pool_padding=pool.padding, backend=backend)
    _count(bn, counting)
    return out
