"""Models by name, as the CLI takes them: torchvision's ImageNet names, `cifar_resnet<depth>`,
`plain_cifar<depth>` (the paper's CIFAR plain nets) and `plain<depth>` (ImageNet plain nets)."""

from __future__ import annotations

import copy
import re

from torch import nn

from fused_resnet.backend import check_backend_name
from fused_resnet.models.cifar import CIFAR_DEPTHS, cifar_resnet, plain_net
from fused_resnet.models.pretrained import resolve_weights
from fused_resnet.models.resnet import (
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

IMAGENET_ARCHS = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
    "wide_resnet50_2": wide_resnet50_2,
    "resnext50_32x4d": resnext50_32x4d,
    "wide_resnet101_2": wide_resnet101_2,
    "resnext101_32x8d": resnext101_32x8d,
    "resnext101_64x4d": resnext101_64x4d,
}

ARCH_HELP = (
    f"{', '.join(IMAGENET_ARCHS)}, cifar_resnet<depth> (depth 6n+2: "
    f"{', '.join(map(str, CIFAR_DEPTHS))}), plain_cifar<depth>, plain<18|34|50|101|152>"
)


def is_cifar(arch: str) -> bool:
    """Whether `arch` is a CIFAR net (32x32 input, 10 classes by default)."""
    return arch.startswith(("cifar_resnet", "plain_cifar"))


def build_model(arch: str, **kwargs) -> nn.Module:
    """The model named `arch` (see ARCH_HELP), built with `kwargs` (backend, num_classes, ...;
    `weights` / `progress` as torchvision's, for the ImageNet names)."""
    if arch in IMAGENET_ARCHS:
        return IMAGENET_ARCHS[arch](**kwargs)
    check_weights(arch, kwargs.pop("weights", None))
    kwargs.pop("progress", None)
    match = re.fullmatch(r"(cifar_resnet|plain_cifar|plain)(\d+)", arch)
    if match is None:
        raise ValueError(f"arch must be one of {ARCH_HELP}; got {arch!r}")
    family, depth = match.group(1), int(match.group(2))
    if family == "cifar_resnet":
        return cifar_resnet(depth, **kwargs)
    return plain_net(depth, dataset="cifar" if family == "plain_cifar" else "imagenet", **kwargs)


def check_weights(arch: str, weights) -> None:
    """Raises ValueError naming `weights` where they are not None and not torchvision's
    weights of `arch` (a name or an enum member: `models.pretrained.resolve_weights`)."""
    if weights is None:
        return
    if arch not in IMAGENET_ARCHS:
        raise ValueError(f"weights: torchvision has pretrained weights for "
                         f"{', '.join(IMAGENET_ARCHS)}, not {arch!r}")
    resolve_weights(arch, weights)


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Points every block of `model` (each module with a `backend` attribute) at `backend`."""
    check_backend_name(backend)
    for module in model.modules():
        if hasattr(module, "backend"):
            module.backend = backend
    return model


def reference_twin(arch: str, model: nn.Module, variant: str = "v1.5") -> tuple[nn.Module, str]:
    """A pure-PyTorch model computing what `model` computes, with a copy of its weights:
    torchvision's model of that name where there is one, else a copy on the reference
    backend. Returns the model and a description."""
    if arch in IMAGENET_ARCHS and variant == "v1.5":
        try:
            import torchvision
        except ImportError:
            pass
        else:
            twin = getattr(torchvision.models, arch)(weights=None)
            twin.load_state_dict(model.state_dict())
            return twin, f"torchvision.models.{arch}"
    return set_backend(copy.deepcopy(model), "reference"), "fused_resnet reference backend"
