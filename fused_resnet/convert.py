"""`fr.convert(model, backend)`: swap a torchvision-style ResNet's residual blocks for fused
ones, in place, sharing the very same parameter and buffer tensors.

A block is recognised by its shape, not its class: a module with `conv1, bn1, conv2, bn2`
(and `conv3, bn3` for a bottleneck) and a `downsample` that is None or
`Sequential(Conv2d, BatchNorm2d)` — torchvision's `BasicBlock` / `Bottleneck` and user blocks
built like them. Blocks that are already fused are pointed at `backend`, so
`convert(model, backend="reference")` turns a converted model back into the pure-PyTorch
computation. The state dict is unchanged either way. Blocks whose convs the fused ops do not
run (dilation, bias, padding modes, non-square stride or padding) are left as they are, with a
warning naming them. A torchvision ResNet's stem is fused too (`_fuse_stems`).
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Optional

from torch import nn

from fused_resnet.backend import check_backend_name
from fused_resnet.nn.blocks import FusedBasicBlock, FusedBottleneck, ResidualBlock
from fused_resnet.nn.sync_bn import convert_sync_bn

_BN = (nn.BatchNorm2d, nn.SyncBatchNorm)
_BASIC = ("conv1", "bn1", "conv2", "bn2")
_BOTTLENECK = (*_BASIC, "conv3", "bn3")


def _block_kind(module: nn.Module):
    """FusedBottleneck, FusedBasicBlock or None for a torchvision-style block."""
    if isinstance(module, ResidualBlock) or not hasattr(module, "downsample"):
        return None
    names = _BOTTLENECK if hasattr(module, "conv3") else _BASIC
    types = (nn.Conv2d, _BN) * (len(names) // 2)
    if not all(isinstance(getattr(module, n, None), t) for n, t in zip(names, types)):
        return None
    return FusedBottleneck if names is _BOTTLENECK else FusedBasicBlock


def _conv_unfusable_reason(name: str, conv: nn.Conv2d) -> Optional[str]:
    """Why the fused ops cannot run `conv` (called `name`), or None."""
    if conv.dilation != (1, 1):
        return f"{name} has dilation {conv.dilation} (fused convs have dilation 1)"
    if conv.bias is not None:
        return f"{name} has a bias (the BN shift replaces it in fused convs)"
    if conv.padding_mode != "zeros" or not isinstance(conv.padding, tuple):
        return f"{name} pads with {conv.padding_mode!r} / {conv.padding!r}"
    if conv.stride[0] != conv.stride[1] or conv.padding[0] != conv.padding[1]:
        return f"{name} has non-square stride {conv.stride} or padding {conv.padding}"
    return None


def _unfusable_reason(module: nn.Module, names: tuple[str, ...]) -> Optional[str]:
    """Why the convs of a torchvision-style block cannot run fused, or None."""
    convs = [(n, getattr(module, n)) for n in names if n.startswith("conv")]
    if isinstance(module.downsample, nn.Sequential) and len(module.downsample):
        convs.append(("downsample.0", module.downsample[0]))
    for name, conv in convs:
        reason = _conv_unfusable_reason(name, conv) if isinstance(conv, nn.Conv2d) else None
        if reason is not None:
            return reason
    return None


def _fuse_stems(model: nn.Module, backend: str) -> None:
    """torchvision ResNets inside `model` (itself included) get their stem fused
    (nn/torchvision_stem.py); nothing to do without torchvision."""
    if importlib.util.find_spec("torchvision") is None:
        return
    from fused_resnet.nn.torchvision_stem import fuse_stem

    for module in list(model.modules()):
        fuse_stem(module, backend, _conv_unfusable_reason)


def _fused_from(module: nn.Module, cls, backend: str) -> ResidualBlock:
    downsample = module.downsample
    if downsample is not None and not (
        isinstance(downsample, nn.Sequential) and len(downsample) == 2
        and isinstance(downsample[0], nn.Conv2d) and isinstance(downsample[1], _BN)
    ):
        raise ValueError(f"cannot convert a block whose downsample is {type(downsample).__name__}"
                         "; expected None or Sequential(Conv2d, BatchNorm2d)")
    block = cls.__new__(cls)
    nn.Module.__init__(block)
    for name in _BOTTLENECK if cls is FusedBottleneck else _BASIC:
        setattr(block, name, getattr(module, name))  # the same modules: the same tensors
    block.downsample = downsample
    block.shortcut = "B"
    block.stride = getattr(module, "stride", block.conv1.stride[0] * block.conv2.stride[0])
    block.backend = backend
    if cls is FusedBottleneck:
        block.eval_kernel = "auto"
    block.train(module.training)
    return block


def convert(model: nn.Module, backend: str = "auto", *, sync_bn: bool = False,
            process_group=None) -> nn.Module:
    """Replaces every torchvision-style residual block inside `model` with a fused block on
    `backend` (in place; returns `model`). The model's own forward is kept, but for a
    `torchvision.models.ResNet` (that class exactly) the stem conv1 -> bn1 -> relu ->
    maxpool runs fused too (`nn.torchvision_stem`: the object's class swapped, its maxpool a
    FusedMaxPool2d, no tensor or key changed); its head runs as before.

    sync_bn / process_group: also turn every BatchNorm2d into a FusedSyncBatchNorm over
    `process_group` (None: the world), same tensors and keys: under torch.distributed,
    training then takes batch statistics over the group with one all_reduce of per-channel
    sums per BN (on CPU with gloo too, where nn.SyncBatchNorm does not run)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    check_backend_name(backend)
    if _block_kind(model) is not None:
        raise ValueError("convert() swaps blocks inside a model; pass the model that holds them")
    for path, module in list(model.named_modules()):
        if isinstance(module, ResidualBlock):
            module.backend = backend
            continue
        for name, child in list(module.named_children()):
            cls = _block_kind(child)
            if cls is None:
                continue
            reason = _unfusable_reason(child, _BOTTLENECK if cls is FusedBottleneck else _BASIC)
            if reason is not None:
                warnings.warn(f"convert: left {path + '.' if path else ''}{name} unfused: "
                              f"{reason}", RuntimeWarning, stacklevel=2)
                continue
            setattr(module, name, _fused_from(child, cls, backend))
    _fuse_stems(model, backend)
    if sync_bn or process_group is not None:
        convert_sync_bn(model, process_group)
    return model
