"""When fused modules call their conv / BN / pool modules as torch does instead of running
fused ops that only read those modules' tensors: while a tracer wants a graph of standard
layers (`tracing_layers`: torch.fx symbolic tracing, torch.jit.trace, torch.onnx export),
and where the modules hold what fused ops cannot stand for or a transform runs that they do
not support (`module_call_reason`: hooks, another norm layer in a BN's place, a conv class
with its own forward or settings fused ops cannot take, an activation other than ReLU in the
`relu` module's place, a torch.func transform), warned (`warn_module_calls`).
"""

from __future__ import annotations

import sys
import warnings
from typing import Optional

import torch
import torch.fx
from torch import nn

from fused_resnet.backend import transform_reason
from fused_resnet.nn.sync_bn import FusedSyncBatchNorm

# torch.fx's flag of a symbolic trace; newer torch sets it under torch.export too, which
# `is_fx_symbolic_tracing` (where it exists) and the is_compiling test leave out.
_FX_FLAG = next((getattr(torch.fx._symbolic_trace, name) for name in (
    "is_fx_symbolic_tracing", "_get_is_fx_tracing", "is_fx_tracing")
    if hasattr(torch.fx._symbolic_trace, name)), lambda: False)


def tracing_layers() -> bool:
    """Whether a tracer that wants a graph of standard layers is running: the modules then
    compute with their conv / BN / pool modules and torch functions. torch.fx symbolic
    tracing (torchvision's `create_feature_extractor` among its users; not torch.export /
    compile, which keep the fused ops): fused ops would need the input's shape and dtype,
    which a tracing proxy does not have. torch.jit.trace (a TorchScript module of aten
    convs, batch norms and ReLUs, which runs anywhere; fused ops' Python checks and Triton
    launches are not recorded by its tracer, and folded weights would become constants).
    torch.onnx export (either exporter): ONNX has no fused_resnet ops, and its Conv /
    BatchNormalization / Relu nodes are what ONNX runtimes fuse themselves (asked only
    while dynamo compiles, as the new exporter does: the question costs ~3 us, against
    ~0.5 us for the rest, on every module call)."""
    compiling = torch.compiler.is_compiling()
    if compiling:
        return torch.onnx.is_in_onnx_export()
    return _FX_FLAG() or torch.jit.is_tracing()


def has_call_hooks(module: nn.Module) -> bool:
    """Whether `module` has forward (pre-) or backward (pre-) hooks: a module that fused code
    runs without calling its forward would not fire them (read from the instance's dict: a
    few ns, as fused modules ask on every call)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _classes_reason(conv_class: type, bn_class: type) -> Optional[str]:
    """Why fused ops cannot stand for modules of these classes: the BN must be a BatchNorm2d
    (this package's FusedSyncBatchNorm included) or torchvision's FrozenBatchNorm2d, the conv
    a Conv2d, each with its class's own forward; None where they can."""
    bn_forward = bn_class.forward
    if issubclass(bn_class, nn.BatchNorm2d):
        plain_bn = bn_forward in (nn.BatchNorm2d.forward, FusedSyncBatchNorm.forward)
    else:
        frozen = getattr(sys.modules.get("torchvision.ops.misc"), "FrozenBatchNorm2d", None)
        plain_bn = frozen is not None and issubclass(bn_class, frozen) and (
            bn_forward is frozen.forward)
    if not plain_bn:
        advice = (" (fr.nn.convert_sync_bn makes it a FusedSyncBatchNorm, which fused ops "
                  "synchronize)" if issubclass(bn_class, nn.SyncBatchNorm) else "")
        return f"{bn_class.__name__} in a BatchNorm2d's place{advice}"
    if not issubclass(conv_class, nn.Conv2d) or (conv_class.forward, conv_class._conv_forward
                                                 ) != (nn.Conv2d.forward,
                                                       nn.Conv2d._conv_forward):
        return f"{conv_class.__name__} in a Conv2d's place (its own forward)"
    return None


_CLASS_REASONS: dict[tuple[type, type], Optional[str]] = {}  # memo of classes_reason


def classes_reason(conv_class: type, bn_class: type) -> Optional[str]:
    """Why fused ops cannot stand for a conv and a BN of these classes (module_call_reason's
    test of the classes, remembered per pair of classes), or None."""
    key = conv_class, bn_class
    if key not in _CLASS_REASONS:
        _CLASS_REASONS[key] = _classes_reason(*key)
    return _CLASS_REASONS[key]


def activation_reason(relu: Optional[nn.Module]) -> Optional[str]:
    """Why the module in a ReLU's place (torchvision's `relu` of a block or of the stem) must
    be called as itself: another class there (an activation swapped in: SiLU, ReLU6, a
    subclass of ReLU) or hooks on it. None for a plain nn.ReLU without hooks, or for none at
    all (a block pickled before blocks held a `relu` module computes torch.relu)."""
    if relu is None:
        return None
    if type(relu) is not nn.ReLU:
        return f"relu is {type(relu).__name__}, not nn.ReLU"
    return "hooks on its ReLU" if has_call_hooks(relu) else None


def module_call_reason(pairs: list[tuple[nn.Module, nn.Module]],
                       others: tuple[nn.Module, ...] = (),
                       relu: Optional[nn.Module] = None) -> Optional[str]:
    """Why the conv / BN modules of `pairs` (and the modules `others`) must be called as
    themselves rather than run by the fused ops, which only read their tensors: hooks on one
    (pruning's and the old weight_norm's forward pre-hooks compute the weight; forward hooks
    read outputs), a norm layer other than a BatchNorm2d put in a BN's place (InstanceNorm2d,
    GroupNorm, Identity, nn.SyncBatchNorm, a subclass with its own forward), or a conv class
    with its own forward (weight standardisation), or a `relu` module that is not a plain
    nn.ReLU (`activation_reason`), a conv the fused ops cannot take (`conv_reason`: a bias,
    another padding mode, unequal stride / padding / dilation along H and W), or while a
    torch.func transform runs (`transform_reason`).
    None where the fused ops compute what the modules would. ~1 us a block: asked on every
    call."""
    reason = transform_reason() or activation_reason(relu)
    if reason is not None:
        return reason
    for module in others:
        if has_call_hooks(module):
            return f"hooks on its {type(module).__name__}"
    for conv, bn in pairs:
        if has_call_hooks(conv) or has_call_hooks(bn):
            hooked = conv if has_call_hooks(conv) else bn
            return f"hooks on its {type(hooked).__name__}"
        reason = classes_reason(type(conv), type(bn))
        if reason is not None:
            return reason
        unfit = conv_reason(conv)
        if unfit is not None:
            return f"its conv is not one fused ops take ({unfit})"
    return None


def conv_reason(conv: nn.Conv2d) -> Optional[str]:
    """Why the fused ops cannot take `conv` (they take BN's shift as its bias, zero padding,
    a square stride, padding and dilation), or None. Asked on every fused call: the usual
    conv is answered from its instance dict (nn.Module.__getattr__ costs ~0.3 us a name)."""
    d = conv.__dict__
    params, s, p, dil = d["_parameters"], d["stride"], d["padding"], d["dilation"]
    if (params.get("bias", 0) is None and d["padding_mode"] == "zeros" and type(p) is tuple
            and s[0] == s[1] and p[0] == p[1] and dil[0] == dil[1]):
        return None
    bias = params["bias"] if "bias" in params else getattr(conv, "bias", None)
    if bias is not None:
        return "conv must have bias=False (the BatchNorm shift plays its role)"
    if conv.padding_mode != "zeros":
        return f"conv must have padding_mode='zeros', got {conv.padding_mode!r}"
    if not square_geometry(conv):
        return (f"conv must have square stride, padding and dilation, got {conv.stride}, "
                f"{conv.padding}, {conv.dilation}")
    return None


def square_geometry(conv: nn.Conv2d) -> bool:
    """Whether `conv` has the same stride, padding and dilation along H and W (the fused
    ops take one of each), its padding as numbers (not "same" / "valid")."""
    return (isinstance(conv.padding, tuple) and conv.stride[0] == conv.stride[1]
            and conv.padding[0] == conv.padding[1] and conv.dilation[0] == conv.dilation[1])


def warn_module_calls(what: str, reason: str) -> None:
    """The warning of fused code that calls modules as themselves (`what` runs unfused): once
    per message and place, Python's default filter. While dynamo compiles, the warning
    breaks the graph (fullgraph=True: fails, naming it): the modules, or the torch.func
    transform around them, then run eagerly (a traced jvp over a BN fails in torch 2.14)."""
    warnings.warn(f"{what} runs unfused, calling its modules as torch does: {reason}",
                  stacklevel=2)
