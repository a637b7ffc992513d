"""`FusedMaxPool2d`: the ResNet stem's max-pool as a module, on this package's kernels."""

from __future__ import annotations

from torch import Tensor, nn

from fused_resnet import ops
from fused_resnet.backend import check_backend_name


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
