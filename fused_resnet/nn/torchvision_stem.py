"""torchvision's ResNet with its stem fused: what `fr.convert` makes of a
`torchvision.models.ResNet` (that class exactly) besides swapping its blocks, and of the
`IntermediateLayerGetter` that holds a ResNet's children in torchvision's segmentation and
detection backbones (DeepLabV3, FCN, `resnet_fpn_backbone`).

torchvision's forward runs the stem as four modules, conv1 -> bn1 -> relu -> maxpool, so in
training relu(bn1(conv1(x))) is written and kept for backward, and ATen's max-pool writes and
keeps an int64 index per output (on Triton `fr.ops.conv_bn_relu_max_pool` keeps neither; in
inference BN folds into the conv). `convert` swaps the object's class for
`TorchvisionResNetFusedStem` below, whose `_forward_impl` (the method torchvision's `forward`
calls) runs the stem as `fr.nn.conv_bn_relu_pool`, and `maxpool` for a `FusedMaxPool2d` of the
same window (neither holds a tensor): the same object, parameters, buffers and state-dict
keys. An `IntermediateLayerGetter` (a ModuleDict run in order) likewise becomes
`GetterFusedStem`, which runs its first four modules (conv1, bn1, relu, maxpool) as one
stem where none of the first three is a returned layer. This module imports torchvision;
`convert` imports it only where torchvision is installed.
"""

from __future__ import annotations

import itertools
import warnings
from collections import OrderedDict
from typing import Optional

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter

from fused_resnet.nn.batch_check import check_image_batch
from fused_resnet.nn.fold_cache import FoldingModule
from fused_resnet.nn.frozen_bn import BN_TYPES, adopt
from fused_resnet.nn.module_calls import has_call_hooks
from fused_resnet.nn.pool import FusedMaxPool2d, conv_bn_relu_pool


class TorchvisionResNetFusedStem(FoldingModule, torchvision.models.ResNet):
    """A `torchvision.models.ResNet` whose stem runs as `conv_bn_relu_pool` on
    `stem_backend`; the rest is torchvision's forward. Made by `fr.convert` (a class swap of
    an existing model), not constructed. Entering training mode drops the cached inference
    folds of every BN in it, bn1 included (`FoldingModule`)."""

    # `stem_backend` (a str) is set by fr.convert: no annotation here (TorchScript would read it)

    def _forward_impl(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles only this branch: torch's layers
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        else:
            check_image_batch(self, x)  # before any layer: a failing batch moves no statistic
            x = conv_bn_relu_pool(x, self.conv1, self.bn1, self.maxpool,
                                  backend=self.stem_backend, relu=self.relu)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


STEM_NAMES = ("conv1", "bn1", "relu", "maxpool")


class GetterFusedStem(FoldingModule, IntermediateLayerGetter):
    """A torchvision `IntermediateLayerGetter` over a ResNet's children whose stem runs as
    `conv_bn_relu_pool` on `stem_backend`: what its forward computes, where its first four
    modules are still conv1, bn1, relu and maxpool and none of conv1 / bn1 / relu is a
    returned layer (checked per call: `return_layers` and the dict may be changed);
    otherwise the getter's own forward, module by module. Made by `fr.convert` (a class
    swap of an existing getter), not constructed."""

    # `stem_backend` (a str) is set by fr.convert: no annotation here (TorchScript would read it)

    def forward(self, x: Tensor):  # a dict of the returned layers (TorchScript infers it)
        if torch.jit.is_scripting():  # TorchScript compiles only this branch: torch's layers
            out = OrderedDict()
            for name, module in self.items():
                x = module(x)
                if name in self.return_layers:
                    out[self.return_layers[name]] = x
            return out
        if _getter_stem_reason(self) is not None:
            return super().forward(x)
        check_image_batch(self, x)  # before any layer: a failing batch moves no statistic
        out = OrderedDict()
        x = conv_bn_relu_pool(x, self.conv1, self.bn1, self.maxpool, backend=self.stem_backend,
                              relu=self.relu)
        for name, module in itertools.islice(self.items(), len(STEM_NAMES) - 1, None):
            if name != "maxpool":  # run by conv_bn_relu_pool above
                x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


def _getter_stem_reason(getter: IntermediateLayerGetter) -> Optional[str]:
    """Why `getter` cannot run its first four modules as one stem (they are not conv1, bn1,
    relu, maxpool, or it returns what one of the first three computes), or None."""
    if list(itertools.islice(getter.keys(), len(STEM_NAMES))) != list(STEM_NAMES):
        return f"its first modules are not {', '.join(STEM_NAMES)}"
    returned = [n for n in STEM_NAMES[:-1] if n in getter.return_layers]
    if returned:
        return f"it returns the output of {', '.join(returned)}"
    return None


def _square(value) -> Optional[int]:
    """An int for an int or a pair of equal ints, else None."""
    if isinstance(value, int):
        return value
    if isinstance(value, tuple) and len(value) == 2 and value[0] == value[1]:
        return value[0]
    return None


def pool_window(pool: nn.MaxPool2d) -> Optional[tuple[int, int, int]]:
    """(kernel, stride, padding) of a square max-pool window with dilation 1, floor mode and
    no indices (what FusedMaxPool2d runs), else None."""
    window = tuple(_square(getattr(pool, k)) for k in ("kernel_size", "stride", "padding"))
    if None in window or _square(pool.dilation) != 1 or pool.ceil_mode or pool.return_indices:
        return None
    return window


def stem_unfusable_reason(model: nn.Module, conv_reason) -> Optional[str]:
    """Why the stem of `model` (a ResNet or a getter that holds conv1 ... maxpool) cannot run
    as `conv_bn_relu_pool`, or None. `conv_reason` (name, conv) -> reason or None is
    convert's check of a conv."""
    return stem_modules_reason([getattr(model, n) for n in STEM_NAMES], STEM_NAMES,
                               conv_reason)


def stem_modules_reason(modules: list[nn.Module], names: tuple[str, ...],
                        conv_reason) -> Optional[str]:
    """`stem_unfusable_reason` of the conv, BN, ReLU and pool `modules`, called `names`."""
    conv, bn, relu, pool = modules
    if type(conv) is not nn.Conv2d or type(bn) not in BN_TYPES:  # subclasses may compute otherwise
        return (f"{names[0]} / {names[1]} are {type(conv).__name__} / {type(bn).__name__}, "
                "not a plain Conv2d and BatchNorm2d")
    reason = conv_reason(names[0], conv)
    if reason is not None:
        return reason
    if conv.groups != 1:
        return f"{names[0]} has groups={conv.groups}"
    if type(relu) is not nn.ReLU:
        return f"{names[2]} is {type(relu).__name__}, not nn.ReLU"
    if type(pool) is not nn.MaxPool2d:
        return f"{names[3]} is {type(pool).__name__}, not nn.MaxPool2d"
    if pool_window(pool) is None:
        return (f"{names[3]} is not a square window with dilation 1, floor mode and no "
                f"indices ({pool})")
    hooked = [n for n, m in zip(names, modules) if has_call_hooks(m)]
    if hooked:  # fused, their forward would not be called
        return f"hooks on {', '.join(hooked)} (the fused stem runs them as one op)"
    return None


def fuse_stem(model: nn.Module, backend: str, conv_reason) -> None:
    """Points a converted model's stem at `backend`, or converts `model` where its class is
    exactly torchvision's ResNet or IntermediateLayerGetter (holding conv1 ... maxpool first)
    and its stem can run fused (else warns why not); anything else is left alone."""
    if isinstance(model, (TorchvisionResNetFusedStem, GetterFusedStem)):
        model.stem_backend = model.maxpool.backend = backend
        return
    if type(model) is torchvision.models.ResNet:
        fused_class, reason = TorchvisionResNetFusedStem, None
    elif type(model) is IntermediateLayerGetter and "conv1" in model:
        fused_class, reason = GetterFusedStem, _getter_stem_reason(model)
    else:
        return
    reason = reason or stem_unfusable_reason(model, conv_reason)
    swap_stem(model, fused_class, backend, reason, type(model).__name__)


def swap_stem(model: nn.Module, fused_class: type, backend: str, reason: Optional[str],
              label: str, norms: tuple[nn.Module, ...] = ()) -> None:
    """convert's last step on a stem (`fuse_stem` here and in nn/timm_stem.py): where
    `reason` says why it cannot run fused, a warning naming `label`; otherwise `model`'s
    class becomes `fused_class` on `backend`, its maxpool a FusedMaxPool2d of the same
    window, its bn1 (and the modules `norms`: a deep stem's) adopted where frozen."""
    if reason is not None:
        warnings.warn(f"convert: left the stem of {label} unfused: {reason}",
                      RuntimeWarning, stacklevel=5)
        return
    fused_pool = FusedMaxPool2d(*pool_window(model.maxpool), backend=backend)
    fused_pool.train(model.maxpool.training)
    model.maxpool = fused_pool
    for module in (*norms, model.bn1):
        adopt(module)
    model.stem_backend = backend
    model.__class__ = fused_class
