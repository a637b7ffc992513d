"""The ImageNet ResNet family (He et al., 2015, Table 1) with torchvision's state-dict layout.

stem: 7x7/2 conv (64) + BN + ReLU, 3x3/2 max-pool; four stages of residual blocks with
64/128/256/512 planes (the first block of stages 2-4 has stride 2); global average pool; fc.
`replace_stride_with_dilation` (torchvision's, bottlenecks only) trades the stride of stages
2-4 for dilated 3x3 convs: the segmentation backbones' output stride 16 or 8.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from fused_resnet.backend import check_backend_name
from fused_resnet.models.pretrained import load_pretrained, pretrained_kwargs, resolve_weights
from fused_resnet.nn import FusedBasicBlock, FusedBottleneck, FusedMaxPool2d
from fused_resnet.nn.batch_check import check_image_batch
from fused_resnet.nn.blocks import VARIANTS
from fused_resnet.nn.fold_cache import FoldingModule
from fused_resnet.nn.pool import conv_bn_relu_pool
from fused_resnet.nn.shortcut import check_shortcut

Block = Union[type[FusedBasicBlock], type[FusedBottleneck]]

# Blocks per stage for each depth of the paper's Table 1.
STAGES: dict[int, tuple[Block, tuple[int, int, int, int]]] = {
    18: (FusedBasicBlock, (2, 2, 2, 2)),
    34: (FusedBasicBlock, (3, 4, 6, 3)),
    50: (FusedBottleneck, (3, 4, 6, 3)),
    101: (FusedBottleneck, (3, 4, 23, 3)),
    152: (FusedBottleneck, (3, 8, 36, 3)),
}


def init_weights(model: nn.Module, zero_init_residual: bool) -> None:
    """torchvision's initialization: Kaiming-normal (fan_out, ReLU) convs, BN gamma=1 beta=0;
    with `zero_init_residual` the last BN of each residual block starts at gamma=0 so every
    block begins as the identity."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, (FusedBottleneck, FusedBasicBlock)):
                m.zero_init_last()


class ResNet(FoldingModule):
    """ImageNet ResNet. `shortcut` picks the paper's option (A/B/C, None for the plain net);
    `groups` / `width_per_group` give ResNeXt and Wide ResNet; `variant` places the stride
    of a bottleneck on its 3x3 ("v1.5", torchvision) or its first 1x1 ("v1", the paper);
    `replace_stride_with_dilation` (three bools, stages 2-4) as torchvision's: such a stage
    keeps stride 1 and multiplies the dilation of the 3x3 convs by 2 from its second block on
    (its first block takes the dilation before it)."""

    def __init__(
        self,
        block: Block,
        layers: tuple[int, ...],
        num_classes: int = 1000,
        *,
        shortcut: Optional[str] = "B",
        variant: str = "v1.5",
        groups: int = 1,
        width_per_group: int = 64,
        zero_init_residual: bool = False,
        replace_stride_with_dilation: Optional[list[bool]] = None,
        norm_layer: Optional[type] = None,
        backend: str = "auto",
    ):
        super().__init__()
        _check_arguments(num_classes=num_classes, groups=groups,
                         width_per_group=width_per_group, variant=variant)
        frozen = _frozen_norm_layer(norm_layer)
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be four positive block counts, got {layers}")
        dilate = [False] * 3 if replace_stride_with_dilation is None else list(
            replace_stride_with_dilation)
        if len(dilate) != 3:
            raise ValueError(f"replace_stride_with_dilation must be None or three bools "
                             f"(stages 2-4), got {replace_stride_with_dilation!r}")
        if any(dilate) and block is not FusedBottleneck:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock (as "
                                      "torchvision): replace_stride_with_dilation needs a "
                                      "bottleneck ResNet")
        self.backend = check_backend_name(backend)
        check_shortcut(shortcut)
        self.inplanes = 64
        self.dilation = 1
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        # relu and avgpool hold no state: torchvision's module tree, as tools that walk or
        # edit it (activation swaps, feature extractors) expect
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = FusedMaxPool2d(3, stride=2, padding=1, backend=backend)
        stage_args = {"shortcut": shortcut, "backend": backend}
        if block is FusedBottleneck:
            stage_args.update(groups=groups, base_width=width_per_group, variant=variant)
        elif groups != 1 or width_per_group != 64:
            raise ValueError("FusedBasicBlock supports only groups=1 and width_per_group=64")
        self.layer1 = self._make_stage(block, 64, layers[0], 1, stage_args)
        self.layer2 = self._make_stage(block, 128, layers[1], 2, stage_args, dilate[0])
        self.layer3 = self._make_stage(block, 256, layers[2], 2, stage_args, dilate[1])
        self.layer4 = self._make_stage(block, 512, layers[3], 2, stage_args, dilate[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        if frozen is not None:
            _freeze_batch_norms(self, frozen)
        init_weights(self, zero_init_residual)

    def _make_stage(self, block: Block, planes: int, blocks: int, stride: int, args: dict,
                    dilate: bool = False):
        first, previous = dict(args), self.dilation
        if dilate:  # torchvision's rule: the stride becomes dilation, from the second block
            self.dilation *= stride
            stride = 1
        if block is FusedBottleneck:
            first["dilation"], args = previous, {**args, "dilation": self.dilation}
        stage = [block(self.inplanes, planes, stride, **first)]
        self.inplanes = planes * block.expansion
        stage += [block(self.inplanes, planes, 1, **args) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, 3, H, W), NCHW or channels_last -> logits (N, num_classes)."""
        if torch.jit.is_scripting():  # TorchScript compiles only this branch: torch's layers
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        else:
            check_image_batch(self, x)
            x = conv_bn_relu_pool(x, self.conv1, self.bn1, self.maxpool, backend=self.backend,
                                  relu=self.relu)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _check_arguments(**named) -> None:
    """ResNet's argument values, each named: num_classes, groups and width_per_group
    positive ints, variant one of VARIANTS (for basic blocks too, where it places nothing)."""
    for name in ("num_classes", "groups", "width_per_group"):
        value = named[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if named["variant"] not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {named['variant']!r}")


def _frozen_norm_layer(norm_layer) -> Optional[type]:
    """torchvision's FrozenBatchNorm2d where `norm_layer` is it; None for None or
    nn.BatchNorm2d; anything else is refused (the fused blocks fuse a BatchNorm)."""
    if norm_layer is None or norm_layer is nn.BatchNorm2d:
        return None
    if (getattr(norm_layer, "__name__", None) == "FrozenBatchNorm2d"
            and getattr(norm_layer, "__module__", "").startswith("torchvision.")):
        return norm_layer
    raise ValueError(f"norm_layer must be None, nn.BatchNorm2d or torchvision's "
                     f"FrozenBatchNorm2d (the fused blocks fuse a BatchNorm), got {norm_layer!r}")


def _freeze_batch_norms(module: nn.Module, frozen: type) -> None:
    """Every BatchNorm2d inside `module` replaced by a `frozen` (FrozenBatchNorm2d) of its
    width, as torchvision builds a model with norm_layer=FrozenBatchNorm2d (its defaults:
    weight 1, bias 0, mean 0, var 1)."""
    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm2d:
            setattr(module, name, frozen(child.num_features))
        else:
            _freeze_batch_norms(child, frozen)


def resnet(depth: int, **kwargs) -> ResNet:
    """ResNet of the paper's Table 1 for depth 18, 34, 50, 101 or 152."""
    if depth not in STAGES:
        raise ValueError(f"depth must be one of {sorted(STAGES)}, got {depth}")
    block, layers = STAGES[depth]
    return ResNet(block, layers, **kwargs)


def _named(arch: str, depth: int, weights: Any, progress: bool, **kwargs) -> ResNet:
    """torchvision's `arch`: the ResNet of `depth` with `kwargs`, and where `weights` is
    given, those pretrained weights (models/pretrained.py says what is checked first).
    torchvision's legacy `pretrained=True` is its IMAGENET1K_V1 weights, with its warning."""
    if "pretrained" in kwargs:
        pretrained = kwargs.pop("pretrained")
        if weights is not None:
            raise ValueError("pass weights= or the deprecated pretrained=, not both")
        warnings.warn("pretrained= is deprecated (as in torchvision); use weights=",
                      UserWarning, stacklevel=3)
        weights = "IMAGENET1K_V1" if pretrained else None
    if weights is None:
        return resnet(depth, **kwargs)
    weights = resolve_weights(arch, weights)
    model = resnet(depth, **pretrained_kwargs(weights, kwargs, STAGES[depth][0] is FusedBottleneck))
    return load_pretrained(model, arch, weights, progress)


# The named models take torchvision's arguments: `weights` (None, a member of torchvision's
# enum for the model, e.g. ResNet50_Weights.IMAGENET1K_V2, or its name, "DEFAULT" among them)
# and `progress` (a progress bar while downloading), then ResNet's keyword arguments.
def resnet18(*, weights: Any = None, progress: bool = True, **kwargs) -> ResNet:
    return _named("resnet18", 18, weights, progress, **kwargs)


def resnet34(*, weights: Any = None, progress: bool = True, **kwargs) -> ResNet:
    return _named("resnet34", 34, weights, progress, **kwargs)


def resnet50(*, weights: Any = None, progress: bool = True, **kwargs) -> ResNet:
    return _named("resnet50", 50, weights, progress, **kwargs)


def resnet101(*, weights: Any = None, progress: bool = True, **kwargs) -> ResNet:
    return _named("resnet101", 101, weights, progress, **kwargs)


def resnet152(*, weights: Any = None, progress: bool = True, **kwargs) -> ResNet:
    return _named("resnet152", 152, weights, progress, **kwargs)


def wide_resnet50_2(*, weights: Any = None, progress: bool = True, **kwargs) -> ResNet:
    """ResNet-50 with bottlenecks twice as wide (width_per_group=128)."""
    return _named("wide_resnet50_2", 50, weights, progress,
                  **_fixed(kwargs, width_per_group=128))


def resnext50_32x4d(*, weights: Any = None, progress: bool = True, **kwargs) -> ResNet:
    """ResNeXt-50 with 32 groups of width 4 in each 3x3."""
    return _named("resnext50_32x4d", 50, weights, progress,
                  **_fixed(kwargs, groups=32, width_per_group=4))


def resnext101_32x8d(*, weights: Any = None, progress: bool = True, **kwargs) -> ResNet:
    """ResNeXt-101 with 32 groups of width 8 in each 3x3."""
    return _named("resnext101_32x8d", 101, weights, progress,
                  **_fixed(kwargs, groups=32, width_per_group=8))


def resnext101_64x4d(*, weights: Any = None, progress: bool = True, **kwargs) -> ResNet:
    """ResNeXt-101 with 64 groups of width 4 in each 3x3."""
    return _named("resnext101_64x4d", 101, weights, progress,
                  **_fixed(kwargs, groups=64, width_per_group=4))


def wide_resnet101_2(*, weights: Any = None, progress: bool = True, **kwargs) -> ResNet:
    """ResNet-101 with bottlenecks twice as wide (width_per_group=128)."""
    return _named("wide_resnet101_2", 101, weights, progress,
                  **_fixed(kwargs, width_per_group=128))


def _fixed(kwargs: dict, **fixed) -> dict:
    """`kwargs` with the named model's `fixed` values, which a caller may repeat but not
    change (torchvision's rule and message)."""
    for name, value in fixed.items():
        if name in kwargs and kwargs[name] != value:
            raise ValueError(f"The parameter '{name}' expected value {value} but got "
                             f"{kwargs[name]} instead.")
    return {**kwargs, **fixed}
