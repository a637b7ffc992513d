"""Synchronized BatchNorm inside a fused `conv -> BN -> (+ residual) -> ReLU`, across the
processes of a `torch.distributed` group (data-parallel training with batch statistics
taken over the global batch, as `nn.SyncBatchNorm` does).

Forward: each rank computes its per-channel mean m_r and biased variance v_r over its n_r
values (one pass: the `_C` kernel where built), and ONE all_reduce sums, per channel,
    [S1, S2, N] = sum_r [n_r m_r, n_r (v_r + m_r^2), n_r]    (fp64, so S2 - N mean^2 keeps
                                                               its digits for large means)
giving mean = S1 / N and var = S2 / N - mean^2; then z = act(y * scale + shift + residual)
with scale = gamma / sqrt(var + eps), shift = beta - mean * scale.

Backward: g = dz [z > 0]; ONE all_reduce sums [sum g, sum g (y - mean)] over the group;
    dy = gamma rstd (g - sum g / N - (y - mean) rstd^2 sum g (y - mean) / N),
and d gamma = rstd sum_local g (y - mean), d beta = sum_local g are this rank's own terms
(DistributedDataParallel averages parameter gradients across ranks, as for nn.SyncBatchNorm).

A rank whose local batch is empty still joins both all_reduces, with zero counts and sums:
its output is empty and its running stats take the group's statistics like every other
rank's. Over an empty global batch (N = 0) the output is empty and the running stats stay as
they are, as for torch's BatchNorm; N = 1 raises on every rank.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fused_resnet import backend as _backend
from fused_resnet import reference
from fused_resnet.ops.conv_bn_act import (
    check_conv_bn_act_args,
    check_momentum,
    check_running_stats,
    check_vector,
    is_real_scalar,
    update_running_stats,
)
from fused_resnet.ops.first_order import first_order
from fused_resnet.ops.layout import bn_params, stat_dtype


def _native(y: Tensor) -> bool:
    """Whether the `_C` kernels run on y's device."""
    backend = "cuda" if y.device.type == "cuda" else "cpu"
    return _backend.unavailable_reason(backend, y.device) is None


def _local_stats(y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of y (N, C, H, W), in y's statistics dtype;
    zeros for an empty y (its count, 0, weighs them out of the group's sums)."""
    if y.numel() == 0:
        zeros = y.new_zeros(y.shape[1], dtype=stat_dtype(y.dtype))
        return zeros, zeros
    if _native(y):
        return torch.ops.fused_resnet.bn_stats(y)
    var, mean = torch.var_mean(y.to(stat_dtype(y.dtype)), dim=(0, 2, 3), correction=0)
    return mean, var


def _view(t: Tensor) -> Tensor:
    return t.view(1, -1, 1, 1)


class _SyncBNAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, gamma, beta, residual, eps, relu, group):
        n_local = y.numel() // y.shape[1]
        mean_l, var_l = (m.double() for m in _local_stats(y))
        packed = torch.stack([mean_l * n_local, (var_l + mean_l * mean_l) * n_local,
                              torch.full_like(mean_l, n_local)])
        dist.all_reduce(packed, group=group)
        n = packed[2, 0].item()
        if n == 1:  # (n is the group's: every rank raises)
            raise ValueError(f"Expected more than 1 value per channel when training, got input "
                             f"size {list(y.shape)} on this rank and {int(n)} over the group")
        mean64 = packed[0] / max(n, 1)  # (n = 0: mean = var = 0, never used)
        var64 = (packed[1] / max(n, 1) - mean64 * mean64).clamp_min(0)
        dtype = stat_dtype(y.dtype)
        mean, var = mean64.to(dtype), var64.to(dtype)
        rstd = torch.rsqrt(var + eps)
        scale = gamma.to(dtype) * rstd
        shift = beta.to(dtype) - mean * scale
        if _native(y):
            z = torch.ops.fused_resnet.bn_add_relu(y, scale, shift, residual, relu)
        else:
            z = y.to(dtype) * _view(scale) + _view(shift)
            if residual is not None:
                z = z + residual
            z = (z.relu() if relu else z).to(y.dtype)
        ctx.save_for_backward(y, z, gamma, mean, rstd)
        ctx.args = (n, relu, residual is not None, group)
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)
        return z, mean, var, torch.tensor(n)

    @staticmethod
    @first_order("the synchronized BN")
    def backward(ctx, dz, _dmean, _dvar, _dn):
        y, z, gamma, mean, rstd = ctx.saved_tensors
        n, relu, has_residual, group = ctx.args
        if dz is None:
            return (None,) * 7
        dtype = mean.dtype
        g = (torch.where(z <= 0, 0, dz) if relu else dz).to(dtype)
        centered = y.to(dtype) - _view(mean)
        sums = torch.stack([g.sum(dim=(0, 2, 3)), (g * centered).sum(dim=(0, 2, 3))])
        local = sums.clone()
        dist.all_reduce(sums, group=group)  # (joined by an empty rank too: its sums are 0)
        coef = gamma.to(dtype) * rstd
        n = max(n, 1)  # (n = 0: dy is empty)
        dy = _view(coef) * (g - _view(sums[0] / n) - centered * _view(rstd * rstd * sums[1] / n))
        dy = dy.to(y.dtype)
        dgamma = (local[1] * rstd).to(gamma.dtype)
        dbeta = local[0].to(gamma.dtype)
        dres = g.to(y.dtype) if has_residual else None
        return dy, dgamma, dbeta, dres, None, None, None


def check_process_group(process_group, name: str = "process_group"):
    """`process_group` where it is None (the default group, the world) or a torch.distributed
    ProcessGroup; anything else is a ValueError naming it (it would fail only at the first
    all_reduce)."""
    group_type = getattr(dist, "ProcessGroup", None) if dist.is_available() else None
    if process_group is not None and (group_type is None
                                      or not isinstance(process_group, group_type)):
        raise ValueError(f"{name} must be None (the world) or a torch.distributed "
                         f"ProcessGroup, got {type(process_group).__name__}")
    return process_group


def _check_sync_args(
    running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum, eps, group,
) -> None:
    """The checks of a synchronized training BN beyond its tensors' shapes: the process
    group, the running stats as a pair that autograd lets it update, momentum and eps. (Not
    "more than 1 value per channel": that is the group's count, known after the all_reduce,
    and a rank that raised before it would leave the others waiting in it.) Not under a
    torch.func transform or forward-mode AD: its all_reduces sit in an autograd Function
    without functorch rules or a jvp (as torch's nn.SyncBatchNorm's do), and a reference
    op without them would take this rank's batch statistics alone."""
    transform = _backend.transform_reason()
    if transform is not None:
        raise NotImplementedError(
            f"the synchronized BN cannot run while {transform}: its all_reduces have no "
            "functorch rules or jvp (nor have torch's nn.SyncBatchNorm's)")
    check_process_group(group, "group")
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group: torch.distributed is not initialized (call "
                         "torch.distributed.init_process_group first); the synchronized BN "
                         "takes batch statistics over a process group (one process's batch: "
                         "ops.conv_bn_act, or nn.BatchNorm2d)")
    check_running_stats(running_mean, running_var, training=True)
    check_momentum(momentum)
    if not (is_real_scalar(eps) and 0 < float(eps) < math.inf):
        raise ValueError(f"eps must be a positive number in training, got {eps!r}")


def check_sync_batch_norm_args(
    y: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor], running_var: Optional[Tensor], *, momentum, eps,
    residual: Optional[Tensor], group,
) -> None:
    """Raises ValueError naming the first argument of `sync_batch_norm` that does not fit."""
    if y.dim() != 4:
        raise ValueError(f"y must be 4-D (N, C, H, W), got shape {tuple(y.shape)}")
    if not y.is_floating_point():
        raise ValueError(f"y must be a floating-point tensor, got {y.dtype}")
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias),
                    ("running_mean", running_mean), ("running_var", running_var)):
        check_vector(name, t, y.shape[1], y, "y")
    if residual is not None and (residual.shape != y.shape or residual.dtype != y.dtype
                                 or residual.device != y.device):
        raise ValueError(f"residual must match y ({y.dtype} {tuple(y.shape)} on {y.device}), "
                         f"got {residual.dtype} {tuple(residual.shape)} on {residual.device}")
    _check_sync_args(running_mean, running_var, momentum, eps, group)


def sync_batch_norm(
    y: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor], running_var: Optional[Tensor], *, momentum: float,
    eps: float, residual: Optional[Tensor] = None, relu: bool = False, group,
) -> Tensor:
    """Training forward of act(SyncBN(y) + residual) over `group` (None: the default process
    group; torch.distributed must be initialized), y: (N, C, H, W); the running stats (when
    given) take the global batch's mean and unbiased variance with factor `momentum` in
    [0, 1]. Every rank of the group must call it in the same order (one collective forward,
    one in backward), an empty local batch included (see the module's docstring). The
    arguments are checked before anything runs: a call that raises leaves the running stats
    unchanged."""
    check_sync_batch_norm_args(y, bn_weight, bn_bias, running_mean, running_var,
                               momentum=momentum, eps=eps, residual=residual, group=group)
    return _checked_sync_batch_norm(y, bn_weight, bn_bias, running_mean, running_var,
                                    momentum=momentum, eps=eps, residual=residual, relu=relu,
                                    group=group)


def _checked_sync_batch_norm(
    y: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor], running_var: Optional[Tensor], *, momentum: float,
    eps: float, residual: Optional[Tensor], relu: bool, group,
) -> Tensor:
    gamma, beta = bn_params(bn_weight, bn_bias, y.shape[1], y)
    z, mean, var, n = _SyncBNAct.apply(y, gamma, beta, residual, eps, relu, group)
    if running_mean is not None and int(n) > 0:  # (an empty global batch: left unchanged)
        update_running_stats(running_mean, running_var, mean, var, int(n), momentum)
    return z


def sync_conv_bn_act(
    x: Tensor, weight: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor], running_var: Optional[Tensor], *, stride: int,
    padding: int, groups: int, momentum: float, eps: float, residual: Optional[Tensor],
    relu: bool, group, dilation: int = 1,
) -> Tensor:
    """act(SyncBN(conv(x)) + residual) over `group` (see `sync_batch_norm`); the arguments
    are checked as `conv_bn_act`'s in training, before anything runs, except that one value
    per channel on this rank is fine (the count that matters is the group's)."""
    _check_sync_args(running_mean, running_var, momentum, eps, group)
    # training=False: conv_bn_act's checks without the local count (_check_sync_args has
    # made the training-only ones)
    check_conv_bn_act_args(x, weight, bn_weight, bn_bias, running_mean, running_var,
                           stride=stride, padding=padding, groups=groups, training=False,
                           residual=residual, running_ok=True, eps=eps, dilation=dilation)
    y = reference.conv2d(x, weight, None, stride, padding, groups, dilation)
    return _checked_sync_batch_norm(y, bn_weight, bn_bias, running_mean, running_var,
                                    momentum=momentum, eps=eps, residual=residual, relu=relu,
                                    group=group)
