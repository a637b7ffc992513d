"""`fr.convert(model, backend)`: swap a torchvision-style ResNet's residual blocks for fused
ones, in place, sharing the very same parameter and buffer tensors.

A block is recognised by its shape, not its class: a module with `conv1, bn1, conv2, bn2`
(and `conv3, bn3` for a bottleneck) and a `downsample` that is None,
`Sequential(Conv2d, BatchNorm2d)` or ResNet-D's `Sequential(pool, Conv2d, BatchNorm2d)` —
torchvision's `BasicBlock` / `Bottleneck`, timm's, and user blocks built like them. Since
the fused block computes relu(bn(conv(...)) + shortcut) whatever the block's own forward
did, a block is swapped only where that is what it computes: its forward
is torchvision's, with plain Conv2d / BatchNorm2d / ReLU modules, or else a probe
(`_probe_reason`: copies of the block and of its fused twin run a random batch in training
and eval mode) finds the same outputs and running statistics. A block with a squeeze-excite,
a drop path, another activation, a pre-activation order or a weight-standardised conv fails
that and is left as it is, with a warning. Blocks that are already fused are pointed at
`backend`, so `convert(model, backend="reference")` turns a converted model back into the
pure-PyTorch computation. The state dict is unchanged either way. Blocks whose convs the
fused ops do not run (bias, padding modes, non-square stride, padding or dilation) are left as
they are, with a warning naming them; dilated convs (torchvision's `replace_stride_with_dilation`,
its segmentation backbones) run fused. A torchvision ResNet's stem is fused too, and that
of an IntermediateLayerGetter over a ResNet's children, and a timm ResNet's (`_fuse_stems`).
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import warnings
from typing import Optional

import torch
from torch import nn

from fused_resnet.backend import check_backend_name
from fused_resnet.nn.blocks import FusedBasicBlock, FusedBottleneck, ResidualBlock
from fused_resnet.nn.fold_cache import FoldingModule
from fused_resnet.nn.module_calls import classes_reason, has_call_hooks, square_geometry
from fused_resnet.nn.pool import FusedMaxPool2d
from fused_resnet.nn.sync_bn import check_process_group, convert_sync_bn

_BN = (nn.BatchNorm2d, nn.SyncBatchNorm)
_BASIC = ("conv1", "bn1", "conv2", "bn2")
_BOTTLENECK = (*_BASIC, "conv3", "bn3")


def _names(cls) -> tuple[str, ...]:
    """The conv / BN attribute names of a FusedBottleneck or FusedBasicBlock, in order."""
    return _BOTTLENECK if cls is FusedBottleneck else _BASIC


def _frozen_bn_loaded() -> bool:
    """Whether torchvision's FrozenBatchNorm2d is loaded (a model holding one has loaded it;
    until then nn/frozen_bn.py, which imports torchvision, is not imported)."""
    return getattr(sys.modules.get("torchvision.ops.misc"), "FrozenBatchNorm2d", None) is not None


def _bn_types() -> tuple[type, ...]:
    """The BN classes a block may hold: BatchNorm2d, SyncBatchNorm and, where torchvision is
    loaded, its FrozenBatchNorm2d and this package's subclass of it (nn/frozen_bn.py)."""
    if not _frozen_bn_loaded():
        return _BN
    from fused_resnet.nn.frozen_bn import BN_TYPES

    return BN_TYPES


def _torchvision_stem():
    """nn/torchvision_stem.py (it imports torchvision), or None without torchvision."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    from fused_resnet.nn import torchvision_stem

    return torchvision_stem


def _block_kind(module: nn.Module):
    """FusedBottleneck, FusedBasicBlock or None for a torchvision-style block."""
    if isinstance(module, ResidualBlock) or not hasattr(module, "downsample"):
        return None
    names = _BOTTLENECK if hasattr(module, "conv3") else _BASIC
    types = (nn.Conv2d, _bn_types()) * (len(names) // 2)
    if not all(isinstance(getattr(module, n, None), t) for n, t in zip(names, types)):
        return None
    return FusedBottleneck if names is _BOTTLENECK else FusedBasicBlock


def _conv_unfusable_reason(name: str, conv: nn.Conv2d) -> Optional[str]:
    """Why the fused ops cannot run `conv` (called `name`), or None."""
    if conv.bias is not None:
        return f"{name} has a bias (the BN shift replaces it in fused convs)"
    if conv.padding_mode != "zeros" or not isinstance(conv.padding, tuple):
        return f"{name} pads with {conv.padding_mode!r} / {conv.padding!r}"
    if not square_geometry(conv):
        return (f"{name} has non-square stride {conv.stride}, padding {conv.padding} or "
                f"dilation {conv.dilation}")
    return None


def _unfusable_reason(module: nn.Module, names: tuple[str, ...]) -> Optional[str]:
    """Why the convs of a torchvision-style block cannot run fused, or None."""
    convs = [(n, getattr(module, n)) for n in names if n.startswith("conv")]
    if isinstance(module.downsample, nn.Sequential) and len(module.downsample) >= 2:
        index = len(module.downsample) - 2  # the projection's conv (after ResNet-D's pool)
        convs.append((f"downsample.{index}", module.downsample[index]))
    for name, conv in convs:
        reason = _conv_unfusable_reason(name, conv) if isinstance(conv, nn.Conv2d) else None
        if reason is not None:
            return reason
    return None


def _timm_stem():
    """nn/timm_stem.py where timm's ResNet module is imported (a timm model exists only
    then: convert never imports timm itself), else None."""
    if "timm.models.resnet" not in sys.modules:
        return None
    from fused_resnet.nn import timm_stem

    return timm_stem


def _fuse_stems(model: nn.Module, backend: str) -> None:
    """torchvision ResNets, IntermediateLayerGetters over a ResNet's children and timm
    ResNets inside `model` (itself included) get their stem fused (nn/torchvision_stem.py,
    nn/timm_stem.py); nothing to do without torchvision."""
    stems = [m for m in (_torchvision_stem(), _timm_stem()) if m is not None]
    for module in list(model.modules()):
        for stem in stems:
            stem.fuse_stem(module, backend, _conv_unfusable_reason)


def _torchvision_forward(module: nn.Module, cls) -> bool:
    """Whether `module` runs torchvision's BasicBlock / Bottleneck forward over plain
    Conv2d / BatchNorm2d / ReLU modules (then it computes what the fused block does)."""
    if importlib.util.find_spec("torchvision") is None:
        return False
    from torchvision.models import resnet

    theirs = resnet.Bottleneck if cls is FusedBottleneck else resnet.BasicBlock
    names = _names(cls)
    parts = [getattr(module, n) for n in names]
    if module.downsample is not None:
        parts += list(module.downsample)
    plain = (nn.Conv2d, *_bn_types())
    return (type(module).forward is theirs.forward and type(getattr(module, "relu", None))
            is nn.ReLU and all(type(p) in plain for p in parts))


def _classes_reason(module: nn.Module, cls) -> Optional[str]:
    """Why the fused block could not run the conv / BN modules of `module` fused (a norm
    layer other than a BatchNorm, a conv class with its own forward: it would call them as
    torch does), or None. torch's SyncBatchNorm counts as the FusedSyncBatchNorm that
    convert makes of it."""
    names = _names(cls)
    pairs = [(getattr(module, c), getattr(module, b)) for c, b in zip(names[::2], names[1::2])]
    if isinstance(module.downsample, nn.Sequential) and len(module.downsample) in (2, 3):
        pairs.append(tuple(module.downsample)[-2:])
    for conv, bn in pairs:
        bn_class = nn.BatchNorm2d if type(bn) is nn.SyncBatchNorm else type(bn)
        reason = classes_reason(type(conv), bn_class)
        if reason is not None:
            return reason
    return None


def _children_reason(module: nn.Module, cls) -> Optional[str]:
    """Why `module` holds a child the fused block would drop: any child besides its convs,
    BNs and downsample that is not an nn.ReLU or an nn.Identity (an attention module, another
    activation such as ReLU6 that a probe's small values do not reach, a DropBlock that a
    probe's small map does not trigger, a layer with parameters), or None."""
    kept = set(_names(cls)) | {"downsample"}
    for name, child in module.named_children():
        if name not in kept and type(child) not in (nn.ReLU, nn.Identity):
            return (f"its {name} is a {type(child).__name__}, which the fused block does not "
                    f"run (it keeps convs, BNs, the downsample, and ReLU / Identity only)")
    return None


def _probe_copies(module: nn.Module, cls) -> tuple[nn.Module, ResidualBlock, torch.Tensor]:
    """fp32 CPU copies of `module` (its BNs' affine parameters and running statistics
    randomised, a SyncBatchNorm made a BatchNorm2d) and of the fused block made from it, and
    a random probe batch."""
    gen = torch.Generator().manual_seed(0)
    theirs = copy.deepcopy(module).float().cpu()
    with torch.no_grad():
        for m in theirs.modules():
            if type(m) is nn.SyncBatchNorm:  # one process, on CPU: the BatchNorm2d it is then
                m.__class__ = nn.BatchNorm2d
            bn = isinstance(m, _bn_types())  # a FrozenBatchNorm2d: affine, running stats
            if bn and getattr(m, "affine", True):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.5, 0.5, generator=gen)
            if bn and getattr(m, "track_running_stats", True):
                m.running_mean.uniform_(-0.5, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
    ours = _fused_from(copy.deepcopy(theirs), cls, "reference")
    return theirs, ours, torch.randn(2, theirs.conv1.in_channels, 8, 8, generator=gen)


def _probe_reason(module: nn.Module, cls) -> Optional[str]:
    """Why `module` does not compute what the fused block made from it computes, or None:
    two copies (its BNs' affine parameters and running statistics randomised alike), one
    converted on the reference backend, run a random fp32 batch (2 x C x 8 x 8, on CPU)
    in training mode, then in eval mode; outputs and updated running statistics must agree
    to 1e-4. Nothing of `module` is changed, nor torch's random state (a block drawing random
    numbers, dropout-like, would advance it)."""
    with torch.random.fork_rng(devices=[]):
        return _probe_in_copies(module, cls)


def _probe_in_copies(module: nn.Module, cls) -> Optional[str]:
    try:
        theirs, ours, x = _probe_copies(module, cls)
        for training in (True, False):
            theirs.train(training)
            ours.train(training)
            with torch.no_grad():
                expected, got = theirs(x), ours(x)
            if expected.shape != got.shape or not torch.allclose(got, expected, 1e-4, 1e-4):
                return (f"its forward ({type(module).__name__}) does not compute relu(bn(conv"
                        f"(...)) + shortcut) as torchvision's blocks do (a probe in "
                        f"{'training' if training else 'eval'} mode differs)")
    except Exception as err:  # noqa: BLE001 - the user's forward failing, meta tensors, ...
        return f"a probe of it failed ({type(err).__name__}: {err})"
    updated = dict(ours.named_buffers())  # the same names: the fused block keeps the modules
    for name, a in theirs.named_buffers():
        b = updated.get(name)
        if a.is_floating_point() and b is not None and not torch.allclose(a, b, 1e-4, 1e-5):
            return f"its forward updates {name} otherwise than the fused block (a probe)"
    return None


def _downsample_reason(module: nn.Module) -> Optional[str]:
    """Why a block's downsample is not one the fused block runs, or None: it runs None,
    Sequential(Conv2d, BatchNorm2d), and ResNet-D's Sequential(pool, Conv2d, BatchNorm2d)
    (timm's resnet50d ...: an average pool, or an Identity, that the block calls as itself)."""
    downsample = module.downsample
    if downsample is None or (
        isinstance(downsample, nn.Sequential) and len(downsample) in (2, 3)
        and isinstance(downsample[-2], nn.Conv2d) and isinstance(downsample[-1], _bn_types())
    ):
        return None
    parts = (", ".join(type(m).__name__ for m in downsample)
             if isinstance(downsample, nn.Sequential) else type(downsample).__name__)
    return (f"its downsample is {parts}, not None, Sequential(Conv2d, BatchNorm2d) or "
            "Sequential(pool, Conv2d, BatchNorm2d)")


def _adopt_frozen_bns(module: nn.Module) -> None:
    """FrozenBatchNorm2d modules inside `module` answer as the fused blocks read a BN."""
    if _frozen_bn_loaded():
        from fused_resnet.nn.frozen_bn import adopt

        for m in module.modules():
            adopt(m)


def _keep_sync(model: nn.Module) -> None:
    """torch's nn.SyncBatchNorm modules that fused code now runs (in fused blocks, in a
    converted torchvision stem) become FusedSyncBatchNorm over the same process group, same
    tensors: the fused ops synchronize only those, and would otherwise take this process's
    batch statistics alone under DDP."""
    stem, timm = _torchvision_stem(), _timm_stem()
    fused_types: tuple[type, ...] = (ResidualBlock,)
    if stem is not None:
        fused_types += (stem.TorchvisionResNetFusedStem, stem.GetterFusedStem)
    if timm is not None:
        fused_types += (timm.TimmResNetFusedStem,)
    for module in list(model.modules()):
        if isinstance(module, ResidualBlock):  # its BNs: main path and projection
            places = [(module, name) for name, _ in module.named_children()]
            if isinstance(module.downsample, nn.Sequential):
                places += [(module.downsample, name) for name, _ in
                           module.downsample.named_children()]
        elif isinstance(module, fused_types):  # a converted torchvision / timm stem: bn1,
            places = [(module, "bn1")]          # and a deep stem's BNs
            if isinstance(getattr(module, "conv1", None), nn.Sequential):
                places += [(module.conv1, name) for name, _ in module.conv1.named_children()]
        else:
            continue
        for holder, name in places:
            child = getattr(holder, name)
            if type(child) is nn.SyncBatchNorm:
                setattr(holder, name, convert_sync_bn(child, child.process_group))


# The hook dicts of an nn.Module (those of this torch version: getattr with a default).
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks", "_is_full_backward_hook", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


def hooked_submodules(module: nn.Module) -> list[str]:
    """The names of the modules inside `module` (not itself) with forward or backward hooks:
    once fused, their forward is no longer called, so those hooks would not fire (convert
    leaves such a block or stem as it is)."""
    return [name for name, m in module.named_modules() if name and has_call_hooks(m)]


def _carry_over(module: nn.Module, block: nn.Module) -> None:
    """The fused `block` takes `module`'s hooks (the very dicts: their handles still remove
    them) and the attributes a user set on it that the fused class does not define."""
    for attr in _HOOK_DICTS:
        if attr in module.__dict__:
            block.__dict__[attr] = module.__dict__[attr]
    for key, value in module.__dict__.items():
        if not key.startswith("_") and key not in block.__dict__ and not hasattr(type(block), key):
            block.__dict__[key] = value


def _fused_from(module: nn.Module, cls, backend: str) -> ResidualBlock:
    downsample = module.downsample
    block = cls.__new__(cls)
    nn.Module.__init__(block)
    _carry_over(module, block)
    relu = module._modules.get("relu")  # the block's own nn.ReLU kept, in torchvision's place
    relu = relu if type(relu) is nn.ReLU else nn.ReLU(inplace=True)
    for name in _names(cls):
        setattr(block, name, getattr(module, name))  # the same modules: the same tensors
        if name == ("bn3" if cls is FusedBottleneck else "bn1"):
            block.relu = relu
    block.downsample = downsample
    _adopt_frozen_bns(block)
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
    FusedMaxPool2d, no tensor or key changed); its head runs as before. So does the stem in
    torchvision's `IntermediateLayerGetter` over a ResNet (DeepLabV3, FCN, detection
    backbones), unless it returns the output of conv1, bn1 or relu, and in a timm ResNet
    (`nn.timm_stem`: its forward_features, where the stem is conv1 -> bn1 -> act1 ->
    maxpool of plain modules).

    sync_bn / process_group: also turn every BatchNorm2d into a FusedSyncBatchNorm over
    `process_group` (None: the world), same tensors and keys: under torch.distributed,
    training then takes batch statistics over the group with one all_reduce of per-channel
    sums per BN (on CPU with gloo too, where nn.SyncBatchNorm does not run)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    check_backend_name(backend)
    check_process_group(process_group)
    if _block_kind(model) is not None:
        raise ValueError("convert() swaps blocks inside a model; pass the model that holds them")
    swaps = []  # (parent, name, block, fused class): every check made before any change
    for path, module in list(model.named_modules()):
        for name, child in module.named_children():
            cls = _block_kind(child)
            if cls is None:
                continue
            reason = (_downsample_reason(child) or _unfusable_reason(child, _names(cls))
                      or _classes_reason(child, cls) or _children_reason(child, cls))
            if reason is None and not _torchvision_forward(child, cls):
                reason = _probe_reason(child, cls)
            hooked = hooked_submodules(child)
            if reason is None and hooked:  # fused, their modules' forward would not be called
                reason = f"hooks on {', '.join(hooked)} (the fused block runs them as one op)"
            if reason is not None:
                warnings.warn(f"convert: left {path + '.' if path else ''}{name} unfused: "
                              f"{reason}", RuntimeWarning, stacklevel=2)
                continue
            swaps.append((module, name, child, cls))
    if backend == "triton":  # refused before any change, not at a call mid-model
        blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
        for module in blocks + [child for _, _, child, _ in swaps]:
            grouped = [c.groups for c in module.modules()
                       if isinstance(c, nn.Conv2d) and c.groups != 1]
            if grouped:
                raise NotImplementedError(
                    f"convert: backend 'triton' cannot run grouped convolutions (groups="
                    f"{grouped[0]}); use backend='auto', which runs them on the cpu / cuda "
                    "backend")
    for module in model.modules():  # fused modules already there follow, fr's nets' stems too
        if isinstance(module, (FoldingModule, FusedMaxPool2d)) and "backend" in module.__dict__:
            module.backend = backend
    for parent, name, child, cls in swaps:
        setattr(parent, name, _fused_from(child, cls, backend))
    _fuse_stems(model, backend)
    _keep_sync(model)
    if sync_bn or process_group is not None:
        convert_sync_bn(model, process_group)
    return model
