"""`fr.convert(model, backend)`: swap a torchvision-style ResNet's residual blocks for fused
ones, in place, sharing the very same parameter and buffer tensors.

A block is recognised by its shape, not its class: a module with `conv1, bn1, conv2, bn2`
(and `conv3, bn3` for a bottleneck) and a `downsample` that is None or
`Sequential(Conv2d, BatchNorm2d)` — torchvision's `BasicBlock` / `Bottleneck` and user blocks
built like them. Blocks that are already fused are pointed at `backend`, so
`convert(model, backend="reference")` turns a converted model back into the pure-PyTorch
computation. The state dict is unchanged either way.
"""

from __future__ import annotations

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
        block.eval_kernel = "chain"
    block.train(module.training)
    return block


def convert(model: nn.Module, backend: str = "auto", *, sync_bn: bool = False,
            process_group=None) -> nn.Module:
    """Replaces every torchvision-style residual block inside `model` with a fused block on
    `backend` (in place; returns `model`). The model's own forward is kept, so for a
    torchvision ResNet the stem and head run as before.

    sync_bn / process_group: also turn every BatchNorm2d into a FusedSyncBatchNorm over
    `process_group` (None: the world), same tensors and keys: under torch.distributed,
    training then takes batch statistics over the group with one all_reduce of per-channel
    sums per BN (on CPU with gloo too, where nn.SyncBatchNorm does not run)."""
    check_backend_name(backend)
    if _block_kind(model) is not None:
        raise ValueError("convert() swaps blocks inside a model; pass the model that holds them")
    for module in list(model.modules()):
        if isinstance(module, ResidualBlock):
            module.backend = backend
            continue
        for name, child in list(module.named_children()):
            cls = _block_kind(child)
            if cls is not None:
                setattr(module, name, _fused_from(child, cls, backend))
    if sync_bn or process_group is not None:
        convert_sync_bn(model, process_group)
    return model
