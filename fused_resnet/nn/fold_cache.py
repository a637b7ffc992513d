"""BatchNorm folded into its conv for inference, cached on the BN module.

In eval mode BN(conv(x)) = conv(x, w * scale) + shift with scale = gamma / sqrt(running_var +
eps) and shift = beta - running_mean * scale. `cached_folds` makes (w * scale, shift) for
each conv / BN pair of a call and keeps it on the BN until any source tensor changes
(identity, storage, version counter, shape), an optimizer steps, or a `FoldingModule`
holding the BN enters training mode or is moved / cast. `clear_fold_cache` forgets them
where a write is none of these (a CUDA graph's replay, a write through `.data`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from fused_resnet import backend as _backend
from fused_resnet import reference
from fused_resnet.ops.conv_bn_act import autocasting, bn_dtypes, compute_dtype, is_real_scalar
from fused_resnet.ops.layout import inference_weight

_FOLD = "_fused_resnet_fold"  # on a BatchNorm module: its _Fold


def _no_fold() -> None:
    return None


class _Fold(tuple):
    """A BN's cached fold: (key, (weight, shift) as the kernels read it, [(source, detached
    alias)]). The sources stay alive (their ids in the key are not reused) and so do their
    storages (no later tensor takes one's address while the entry lives, though
    `p.data = t` frees p's old storage). Copies and pickles of the module carry no fold
    (None: folded again at its first call)."""

    __slots__ = ()

    def __reduce__(self):
        return (_no_fold, ())

    def __deepcopy__(self, memo) -> None:
        return None


# Optimizer steps taken in this process, by any torch.optim optimizer: part of every fold's
# key, as fused / capturable optimizers (fused=True) write parameters without moving their
# version counters.
_OPTIMIZER_STEPS = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def clear_fold_cache(module: nn.Module) -> None:
    """Forgets the BN folds cached on every BatchNorm in `module` (itself included), and so
    the inference plans made from them: the next eval call folds anew. The cache sees the
    writes PyTorch counts (version counters: load_state_dict, in-place ops), every
    torch.optim optimizer's step (fused ones move no version counter), and a source tensor
    replaced or given other storage or another shape (`p.data = t`, a view put in its
    place); it is dropped whenever one of this package's modules enters training mode or is
    moved or cast. Call this after writes it cannot see while a model stays in eval mode: a
    CUDA graph's replay (the replayed kernels move no version counter), an in-place write
    through `.data` (`p.data.mul_(2)`), or one to a tensor the parameters alias through
    `.data` (the flat vector of torch.nn.utils.vector_to_parameters). An inference graph
    captured earlier reads the folds it was captured with: capture it again after this (the
    old folds are freed)."""
    for m in module.modules():  # BatchNorms, and torchvision's FrozenBatchNorm2d in blocks
        m.__dict__.pop(_FOLD, None)


class FoldingModule(nn.Module):
    """A module whose BNs get folded in eval mode (blocks, models, FusedConvBNAct): entering
    training mode drops their cached folds, as training can change the weights without a
    version counter seeing it (a captured training step replayed from a CUDA graph); so does
    moving or casting it."""

    def train(self, mode: bool = True):
        if mode:
            clear_fold_cache(self)
        return super().train(mode)

    def _apply(self, *args, **kwargs):
        # .to / .cuda / .half / ...: the folds (and the storages they keep) go with the old
        # tensors rather than stay on the old device until the next call
        clear_fold_cache(self)
        return super()._apply(*args, **kwargs)


def cached_fold(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d,
                backend: str) -> Optional[tuple[Tensor, Tensor]]:
    """(w * scale, shift) of an inference BN folded into its conv, cached on `bn` until what
    it came from changes (this module's docstring says what is seen), or None where folding
    does not apply: training, autograd needing the fold, grouped convs, or a backend that
    does not run folded convs."""
    folded = cached_folds(x, [(conv, bn)], backend)
    return None if folded is None else folded[0]


def cached_folds(x: Tensor, pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]],
                 backend: str) -> Optional[list[tuple[Tensor, Tensor]]]:
    """`cached_fold` of every pair of a block (the backend resolved once), or None unless
    all of them fold. Run on every inference call of every block: the tensors come from the
    modules' parameter / buffer dicts (nn.Module.__getattr__ takes ~0.6 us each)."""
    sources = []
    for conv, bn in pairs:
        # batch statistics (as `_batchnorm_args`: training, or no running stats)
        if bn.training or conv.groups != 1:
            return None
        tensors = _fold_sources(conv, bn)
        if tensors[1] is None and tensors[2] is None:
            return None
        sources.append(tensors)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for tensors in sources for t in tensors):
        return None
    kernels = _backend.resolve(backend, "conv_bn_act", x.device)
    if kernels == "reference":
        return None
    dtype = compute_dtype(x)
    if torch.compiler.is_compiling():  # folded inside the graph (torch 2.5 cannot trace data_ptr)
        return [_fold(conv, bn, dtype) for conv, bn in pairs]
    out = []
    steps = _OPTIMIZER_STEPS[0]
    for (conv, bn), tensors in zip(pairs, sources):
        # Storage address and version of each source, and the conv weight's identity and
        # shape: moving the module (.to, .cuda), a write PyTorch counts (load_state_dict,
        # in-place ops), new storage under `.data`, a new weight or a view of the old one in
        # its place (channels sliced off, transposed) change one of them; an optimizer step
        # moves `steps`. The entry keeps the sources (their ids are not reused) and aliases
        # of their storages. A parametrized weight is a new tensor on every access: refolded
        # every call.
        try:
            weight = tensors[0]
            key = (dtype, kernels, bn.eps, steps, id(weight), weight.shape,
                   *[(t.data_ptr(), t._version) if t is not None else None for t in tensors])
        except RuntimeError:  # an inference tensor has no version counter: fold, don't cache
            weight, shift = _fold(conv, bn, dtype)
            out.append((inference_weight(weight, kernels), shift))
            continue
        cached = bn.__dict__.get(_FOLD)
        if cached is None or cached[0] != key:
            _check_fold_dtypes(x, conv, bn, dtype)
            # normal tensors, even in inference mode: a later call may save them for backward
            with torch.inference_mode(False):
                weight, shift = _fold(conv, bn, dtype)
                folded = (inference_weight(weight, kernels), shift)
            cached = _Fold((key, folded, [(t, t.detach()) for t in tensors if t is not None]))
            bn.__dict__[_FOLD] = cached
        out.append(cached[1])
    return out


def _check_fold_dtypes(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d,
                       dtype: torch.dtype) -> None:
    """Outside autocast the conv weight has x's dtype (torch's conv requires it; the fold,
    made in x's dtype, would hide it); a BN folded for a conv computing in `dtype` holds
    tensors of that dtype, or fp32 beside fp16 / bf16 (as eager BatchNorm takes them). Else
    ValueError naming the tensor (not the folded shift the fused conv would name)."""
    if autocasting(x) is None and conv.weight.dtype != x.dtype:
        raise ValueError(f"weight dtype {conv.weight.dtype} differs from x's dtype {x.dtype} "
                         "(outside autocast they must match)")
    allowed = bn_dtypes(dtype)
    for name in ("running_mean", "running_var", "weight", "bias"):
        t = getattr(bn, name, None)
        if isinstance(t, Tensor) and t.dtype not in allowed:
            raise ValueError(f"BatchNorm {name} must be {' or '.join(sorted(map(str, allowed)))}"
                             f" for a conv computing in {dtype}, got {t.dtype}")


def _fold_sources(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Optional[Tensor], ...]:
    """(conv.weight, bn.running_mean, bn.running_var, bn.weight, bn.bias), read from the
    modules' parameter and buffer dicts (nn.Module.__getattr__ takes ~0.6 us a name), or
    through getattr where one lives elsewhere (a parametrized or weight-normed weight is a
    computed attribute)."""
    buffers, params = bn._buffers, bn._parameters
    try:
        return (conv._parameters["weight"], buffers["running_mean"], buffers["running_var"],
                params["weight"], params["bias"])
    except KeyError:
        return (conv.weight, bn.running_mean, bn.running_var, bn.weight, bn.bias)


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(w * scale in `dtype`, shift) with scale = gamma / sqrt(running_var + eps). A
    negative eps (or not a number) raises as torch's batch_norm does, where training's
    checks would have named it."""
    if not is_real_scalar(bn.eps) or bn.eps < 0:
        raise ValueError(f"eps must be >= 0 in eval (BatchNorm eps), a number; got {bn.eps!r}")
    with torch.no_grad():
        scale, shift = reference.fold_bn(bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                         bn.eps)
        return (conv.weight.to(scale.dtype) * scale.view(-1, 1, 1, 1)).to(dtype), shift
