"""The paper's CIFAR-10 nets (He et al., 2015, section 4.2) and the plain baselines.

Depth 6n+2: a 3x3 conv (16) + BN + ReLU, three stages of n basic blocks with 16, 32, 64
filters on 32x32, 16x16, 8x8 maps (stride 2 at the first block of stages 2 and 3), global
average pool and a 10-way fc. The paper's CIFAR nets use shortcut option A.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fused_resnet.backend import check_backend_name
from fused_resnet.models.resnet import init_weights, resnet
from fused_resnet.nn import FusedBasicBlock
from fused_resnet.nn.batch_check import check_image_batch
from fused_resnet.nn.fold_cache import FoldingModule
from fused_resnet.nn.pool import conv_bn_relu_pool
from fused_resnet.nn.shortcut import check_shortcut

CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)  # the depths of the paper's Table 6


def blocks_per_stage(depth: int) -> int:
    """n for depth = 6n + 2 (n >= 1)."""
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"depth must be 6n+2 with n >= 1 (e.g. {CIFAR_DEPTHS}), got {depth!r}")
    return (depth - 2) // 6


def _stage(inplanes: int, planes: int, stride: int, blocks: int, args: dict) -> nn.Sequential:
    """`blocks` basic blocks; the first maps inplanes -> planes with `stride`."""
    return nn.Sequential(FusedBasicBlock(inplanes, planes, stride, **args),
                         *[FusedBasicBlock(planes, planes, 1, **args) for _ in range(blocks - 1)])


class CifarResNet(FoldingModule):
    """The 6n+2-layer CIFAR net; `shortcut=None` gives the plain counterpart."""

    def __init__(
        self,
        depth: int = 56,
        num_classes: int = 10,
        *,
        shortcut: Optional[str] = "A",
        zero_init_residual: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        n = blocks_per_stage(depth)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        check_shortcut(shortcut)
        self.backend = check_backend_name(backend)
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)  # no state, as the ImageNet nets' relu / avgpool
        args = {"shortcut": shortcut, "backend": backend}
        self.layer1 = _stage(16, 16, 1, n, args)
        self.layer2 = _stage(16, 32, 2, n, args)
        self.layer3 = _stage(32, 64, 2, n, args)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        init_weights(self, zero_init_residual)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, 3, H, W) (32x32 in the paper) -> logits (N, num_classes)."""
        if torch.jit.is_scripting():  # TorchScript compiles only this branch: torch's layers
            x = self.relu(self.bn1(self.conv1(x)))
        else:
            check_image_batch(self, x)
            x = conv_bn_relu_pool(x, self.conv1, self.bn1, None, backend=self.backend,
                                  relu=self.relu)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet(depth: int = 56, shortcut: Optional[str] = "A", **kwargs) -> CifarResNet:
    """The paper's CIFAR ResNet of depth 6n+2 (20, 32, 44, 56, 110, 1202, ...)."""
    return CifarResNet(depth, shortcut=shortcut, **kwargs)


def plain_net(depth: int = 56, dataset: str = "cifar", **kwargs) -> nn.Module:
    """The paper's plain baseline: the same net as the ResNet of this depth with no shortcuts.

    dataset="cifar": depth 6n+2 (the paper's plain-20/32/44/56/110); dataset="imagenet":
    depth 18, 34, 50, 101 or 152 (the paper's plain-18/34 and their bottleneck analogues).
    """
    if "shortcut" in kwargs:
        raise ValueError("plain_net has no shortcuts; do not pass shortcut")
    if dataset == "cifar":
        return CifarResNet(depth, shortcut=None, **kwargs)
    if dataset == "imagenet":
        return resnet(depth, shortcut=None, **kwargs)
    raise ValueError(f"dataset must be 'cifar' or 'imagenet', got {dataset!r}")
