"""The ResNet family: ImageNet nets (torchvision layout), the paper's CIFAR nets, plain nets."""

from fused_resnet.models.cifar import CIFAR_DEPTHS, CifarResNet, cifar_resnet, plain_net
from fused_resnet.models.pretrained import with_classes
from fused_resnet.models.registry import (
    ARCH_HELP,
    IMAGENET_ARCHS,
    build_model,
    is_cifar,
    reference_twin,
    set_backend,
)
from fused_resnet.models.resnet import (
    ResNet,
    resnet,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    resnext101_64x4d,
    wide_resnet50_2,
    wide_resnet101_2,
)

__all__ = [
    "ARCH_HELP",
    "build_model",
    "is_cifar",
    "reference_twin",
    "set_backend",
    "CIFAR_DEPTHS",
    "IMAGENET_ARCHS",
    "CifarResNet",
    "ResNet",
    "cifar_resnet",
    "plain_net",
    "resnet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "with_classes",
]
