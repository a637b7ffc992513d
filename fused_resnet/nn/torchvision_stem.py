"""torchvision's ResNet with its stem fused: what `fr.convert` makes of a
`torchvision.models.ResNet` (that class exactly) besides swapping its blocks.

torchvision's forward runs the stem as four modules, conv1 -> bn1 -> relu -> maxpool, so in
training relu(bn1(conv1(x))) is written and kept for backward, and ATen's max-pool writes and
keeps an int64 index per output (on Triton `fr.ops.conv_bn_relu_max_pool` keeps neither; in
inference BN folds into the conv). `convert` swaps the object's class for
`TorchvisionResNetFusedStem` below, whose `_forward_impl` (the method torchvision's `forward`
calls) runs the stem as `fr.nn.conv_bn_relu_pool`, and `maxpool` for a `FusedMaxPool2d` of the
same window (neither holds a tensor): the same object, parameters, buffers and state-dict
keys. This module imports torchvision; `convert` imports it only where torchvision is
installed.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torchvision
from torch import Tensor, nn

from fused_resnet.nn.conv_bn import FoldingModule
from fused_resnet.nn.frozen_bn import BN_TYPES, adopt
from fused_resnet.nn.pool import FusedMaxPool2d, conv_bn_relu_pool


class TorchvisionResNetFusedStem(FoldingModule, torchvision.models.ResNet):
    """A `torchvision.models.ResNet` whose stem runs as `conv_bn_relu_pool` on
    `stem_backend`; the rest is torchvision's forward. Made by `fr.convert` (a class swap of
    an existing model), not constructed. Entering training mode drops the cached inference
    folds of every BN in it, bn1 included (`FoldingModule`)."""

    stem_backend: str

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = conv_bn_relu_pool(x, self.conv1, self.bn1, self.maxpool, backend=self.stem_backend)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _square(value) -> Optional[int]:
    """An int for an int or a pair of equal ints, else None."""
    if isinstance(value, int):
        return value
    if isinstance(value, tuple) and len(value) == 2 and value[0] == value[1]:
        return value[0]
    return None


def _pool_window(pool: nn.MaxPool2d) -> Optional[tuple[int, int, int]]:
    """(kernel, stride, padding) of a square max-pool window with dilation 1, floor mode and
    no indices (what FusedMaxPool2d runs), else None."""
    window = tuple(_square(getattr(pool, k)) for k in ("kernel_size", "stride", "padding"))
    if None in window or _square(pool.dilation) != 1 or pool.ceil_mode or pool.return_indices:
        return None
    return window


def _unfusable_reason(model: torchvision.models.ResNet, conv_reason) -> Optional[str]:
    """Why the stem of `model` cannot run as `conv_bn_relu_pool`, or None. `conv_reason`
    (name, conv) -> reason or None is convert's check of a conv."""
    conv, bn, relu, pool = model.conv1, model.bn1, model.relu, model.maxpool
    if type(conv) is not nn.Conv2d or type(bn) not in BN_TYPES:  # subclasses may compute otherwise
        return (f"conv1 / bn1 are {type(conv).__name__} / {type(bn).__name__}, not a plain "
                "Conv2d and BatchNorm2d")
    reason = conv_reason("conv1", conv)
    if reason is not None:
        return reason
    if conv.groups != 1:
        return f"conv1 has groups={conv.groups}"
    if type(relu) is not nn.ReLU:
        return f"relu is {type(relu).__name__}, not nn.ReLU"
    if type(pool) is not nn.MaxPool2d:
        return f"maxpool is {type(pool).__name__}, not nn.MaxPool2d"
    if _pool_window(pool) is None:
        return (f"maxpool is not a square window with dilation 1, floor mode and no indices "
                f"({pool})")
    return None


def fuse_stem(model: nn.Module, backend: str, conv_reason) -> None:
    """Points a converted model's stem at `backend`, or converts `model` where its class is
    exactly torchvision's ResNet and its stem can run fused (else warns why not); anything
    else is left alone."""
    if isinstance(model, TorchvisionResNetFusedStem):
        model.stem_backend = model.maxpool.backend = backend
        return
    if type(model) is not torchvision.models.ResNet:
        return
    reason = _unfusable_reason(model, conv_reason)
    if reason is not None:
        warnings.warn(f"convert: left the stem of {type(model).__name__} unfused: {reason}",
                      RuntimeWarning, stacklevel=4)
        return
    fused_pool = FusedMaxPool2d(*_pool_window(model.maxpool), backend=backend)
    fused_pool.train(model.maxpool.training)
    model.maxpool = fused_pool
    adopt(model.bn1)
    model.stem_backend = backend
    model.__class__ = TorchvisionResNetFusedStem
