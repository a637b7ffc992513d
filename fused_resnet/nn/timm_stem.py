"""timm's ResNet with its stem fused: what `fr.convert` makes of a `timm.models.resnet.ResNet`
(that class exactly: resnet18 ... resnet152, resnext, wide, resnet*d's blocks) besides
swapping its blocks, as `nn/torchvision_stem.py` does for torchvision's.

timm's `forward_features` runs the stem as conv1 -> bn1 -> act1 -> maxpool, then the four
stages (through `checkpoint_seq` when grad checkpointing is on). `convert` swaps the object's
class for `TimmResNetFusedStem`, whose `forward_features` runs the stem as
`fr.nn.conv_bn_relu_pool` (on Triton in training one op that keeps neither relu(bn(y)) nor
int64 pool indices; in inference BN folded into the conv) and the stages as timm does:
the same object, parameters, buffers and state-dict keys; `maxpool` becomes a
`FusedMaxPool2d` of the same window (neither holds a tensor). timm's other entry points
(`forward_intermediates`, `forward_head`) are its own.

The stem's last conv, bn1, act1 and maxpool must be a plain Conv2d, a BatchNorm2d, an
nn.ReLU and an nn.MaxPool2d. conv1 is that conv, or ResNet-D's deep stem (resnet*d, timm's
stem_type "deep" / "deep_tiered"): Sequential(conv, BN, ReLU, conv, BN, ReLU, conv), whose
first two conv -> BN -> ReLU run as `fr.nn.conv_bn_act` each (one fused op: in inference
folded). Anti-aliased or convolutional stem pools are left, and so is every stem under a
timm whose `forward_features` reads other attributes than it read when this was written
(`TIMM_FEATURE_NAMES`): it would compute something this class does not know of. convert
warns why it leaves a stem. Hooks on a deep stem's Sequential or ReLUs, or an activation
swapped in for one of them after the conversion, make the call run timm's own
`forward_features`, and so does a deep stem while torch.fx traces (timm's node names).
This module imports timm; `convert` imports it only where timm is already imported.
"""

from __future__ import annotations

from typing import Optional

import torch
from timm.models.resnet import ResNet as TimmResNet
from torch import Tensor, nn

from fused_resnet.nn import module_calls
from fused_resnet.nn.batch_check import check_image_batch
from fused_resnet.nn.conv_bn import conv_bn_act
from fused_resnet.nn.fold_cache import FoldingModule
from fused_resnet.nn.frozen_bn import BN_TYPES
from fused_resnet.nn.module_calls import (
    activation_reason,
    has_call_hooks,
    tracing_layers,
    warn_module_calls,
)
from fused_resnet.nn.pool import conv_bn_relu_pool
from fused_resnet.nn.torchvision_stem import stem_modules_reason, swap_stem

STEM_NAMES = ("conv1", "bn1", "act1", "maxpool")
# What timm's ResNet.forward_features reads (timm 1.0.x): its stem, its stages, the
# checkpointing switch and function. Other names mean a forward this class does not mirror.
TIMM_FEATURE_NAMES = frozenset(STEM_NAMES + (
    "grad_checkpointing", "torch", "jit", "is_scripting", "checkpoint_seq",
    "layer1", "layer2", "layer3", "layer4"))
_checkpoint_seq = TimmResNet.forward_features.__globals__.get("checkpoint_seq")


class TimmResNetFusedStem(FoldingModule, TimmResNet):
    """A timm ResNet whose stem runs as `conv_bn_relu_pool` on `stem_backend`; the stages
    as timm's `forward_features` runs them. Made by `fr.convert` (a class swap of an
    existing model), not constructed. Entering training mode drops the cached inference
    folds of every BN in it, bn1 included (`FoldingModule`)."""

    # `stem_backend` (a str) is set by fr.convert: no annotation here (TorchScript would read it)

    def forward_features(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles only this branch: timm's layers
            x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
            return self.layer4(self.layer3(self.layer2(self.layer1(x))))
        deep = isinstance(self.conv1, nn.Sequential)
        if deep:  # its modules, as timm calls them (fx: timm's node names, conv1.2 ...)
            if tracing_layers():
                return TimmResNet.forward_features(self, x)
            reason = _deep_call_reason(self.conv1)
            if reason is not None:
                warn_module_calls("the stem", reason)
                return TimmResNet.forward_features(self, x)
        check_image_batch(self, x)  # before any layer: a failing batch moves no statistic
        conv = self.conv1
        if deep:  # conv -> BN -> ReLU twice, each one fused op, then the last conv below
            x = conv_bn_act(x, conv[0], conv[1], backend=self.stem_backend)
            x = conv_bn_act(x, conv[3], conv[4], backend=self.stem_backend)
            conv = conv[6]
        x = conv_bn_relu_pool(x, conv, self.bn1, self.maxpool, backend=self.stem_backend,
                              relu=self.act1)
        stages = [self.layer1, self.layer2, self.layer3, self.layer4]
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return _checkpoint_seq(stages, x, flatten=True)
        for stage in stages:
            x = stage(x)
        return x


def _timm_reason() -> Optional[str]:
    """Why this timm's ResNet.forward_features cannot be mirrored, or None."""
    names = set(TimmResNet.forward_features.__code__.co_names)
    if not names <= TIMM_FEATURE_NAMES or _checkpoint_seq is None:
        extra = ", ".join(sorted(names - TIMM_FEATURE_NAMES)) or "no checkpoint_seq"
        return (f"this timm's ResNet.forward_features reads what fused_resnet does not know "
                f"({extra})")
    return None


# ResNet-D's deep stem: the module types of its Sequential, in order
DEEP_STEM = (nn.Conv2d, "bn", nn.ReLU, nn.Conv2d, "bn", nn.ReLU, nn.Conv2d)


def _deep_stem_reason(stem: nn.Sequential, conv_reason) -> Optional[str]:
    """Why a Sequential conv1 is not a deep stem whose first two conv -> BN -> ReLU run
    fused, or None (the last conv is checked with bn1, act1 and maxpool)."""
    kinds = [type(m) for m in stem]
    if len(kinds) != len(DEEP_STEM) or any(
            (k not in BN_TYPES) if want == "bn" else (k is not want)
            for k, want in zip(kinds, DEEP_STEM)):
        return (f"conv1 is a Sequential of {', '.join(k.__name__ for k in kinds)}, not a deep "
                "stem of Conv2d, BatchNorm2d, ReLU, Conv2d, BatchNorm2d, ReLU, Conv2d")
    for i in (0, 3):
        reason = conv_reason(f"conv1.{i}", stem[i]) or (
            f"conv1.{i} has groups={stem[i].groups}" if stem[i].groups != 1 else None)
        if reason is not None:
            return reason
    hooked = (["conv1"] if has_call_hooks(stem) else []) + [
        f"conv1.{i}" for i, m in enumerate(stem) if has_call_hooks(m)]
    if hooked:
        return f"hooks on {', '.join(hooked)} (the fused stem runs them as one op each)"
    return None


def _deep_call_reason(stem: nn.Sequential) -> Optional[str]:
    """Per call: why a converted deep stem must run as timm runs it (hooks on the Sequential,
    modules added or removed, another activation or hooks on its ReLUs, a conv the fused
    ops cannot take, set since the conversion), or None. Hooks on its convs and BNs, or
    other classes there, are `conv_bn_act`'s to see."""
    if has_call_hooks(stem):
        return "hooks on conv1"
    if len(stem) != len(DEEP_STEM):
        return f"conv1 holds {len(stem)} modules, not a deep stem's {len(DEEP_STEM)}"
    return (activation_reason(stem[2]) or activation_reason(stem[5]) or
            _swapped_conv_reason(stem[0]) or _swapped_conv_reason(stem[3]))


def _swapped_conv_reason(conv: nn.Module) -> Optional[str]:
    """Why a deep stem's conv, swapped since the conversion, cannot run fused (a bias, a
    padding mode: `conv_reason`), or None (other classes are conv_bn_act's to see)."""
    unfit = module_calls.conv_reason(conv) if isinstance(conv, nn.Conv2d) else None
    return None if unfit is None else f"a conv of conv1 is not one fused ops take ({unfit})"


def fuse_stem(model: nn.Module, backend: str, conv_reason) -> None:
    """Points a converted timm ResNet's stem at `backend`, or converts `model` where its
    class is exactly timm's ResNet and its stem can run fused (else warns why not);
    anything else is left alone."""
    if isinstance(model, TimmResNetFusedStem):
        model.stem_backend = model.maxpool.backend = backend
        return
    if type(model) is not TimmResNet:
        return
    modules = [getattr(model, n) for n in STEM_NAMES]
    names = STEM_NAMES
    reason = _timm_reason()
    if reason is None and isinstance(model.conv1, nn.Sequential):
        reason = _deep_stem_reason(model.conv1, conv_reason)
        modules[0], names = model.conv1[-1], ("conv1.6",) + STEM_NAMES[1:]
    reason = reason or stem_modules_reason(modules, names, conv_reason)
    deep = tuple(model.conv1) if isinstance(model.conv1, nn.Sequential) else ()
    swap_stem(model, TimmResNetFusedStem, backend, reason, "timm's ResNet", deep)
