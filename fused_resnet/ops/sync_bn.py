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
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fused_resnet import backend as _backend
from fused_resnet import reference
from fused_resnet.ops.conv_bn_act import update_running_stats
from fused_resnet.ops.first_order import first_order
from fused_resnet.ops.layout import bn_params, stat_dtype


def _native(y: Tensor) -> bool:
    """Whether the `_C` kernels run on y's device."""
    backend = "cuda" if y.device.type == "cuda" else "cpu"
    return _backend.unavailable_reason(backend, y.device) is None


def _local_stats(y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of y (N, C, H, W), in y's statistics dtype."""
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
        if n <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input "
                             f"size {list(y.shape)} on this rank and {int(n)} over the group")
        mean64 = packed[0] / n
        var64 = (packed[1] / n - mean64 * mean64).clamp_min(0)
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
        dist.all_reduce(sums, group=group)
        coef = gamma.to(dtype) * rstd
        dy = _view(coef) * (g - _view(sums[0] / n) - centered * _view(rstd * rstd * sums[1] / n))
        dy = dy.to(y.dtype)
        dgamma = (local[1] * rstd).to(gamma.dtype)
        dbeta = local[0].to(gamma.dtype)
        dres = g.to(y.dtype) if has_residual else None
        return dy, dgamma, dbeta, dres, None, None, None


def sync_batch_norm(
    y: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor], running_var: Optional[Tensor], *, momentum: float,
    eps: float, residual: Optional[Tensor] = None, relu: bool = False, group,
) -> Tensor:
    """Training forward of act(SyncBN(y) + residual) over `group`, y: (N, C, H, W); the running
    stats (when given) take the global batch's mean and unbiased variance. Every rank of the
    group must call it in the same order (one collective forward, one in backward)."""
    if y.dim() != 4:
        raise ValueError(f"y must be 4-D (N, C, H, W), got shape {tuple(y.shape)}")
    gamma, beta = bn_params(bn_weight, bn_bias, y.shape[1], y)
    z, mean, var, n = _SyncBNAct.apply(y, gamma, beta, residual, eps, relu, group)
    if running_mean is not None:
        update_running_stats(running_mean, running_var, mean, var, int(n), momentum)
    return z


def sync_conv_bn_act(
    x: Tensor, weight: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor], running_var: Optional[Tensor], *, stride: int,
    padding: int, groups: int, momentum: float, eps: float, residual: Optional[Tensor],
    relu: bool, group, dilation: int = 1,
) -> Tensor:
    """act(SyncBN(conv(x)) + residual) over `group` (see `sync_batch_norm`)."""
    y = reference.conv2d(x, weight, None, stride, padding, groups, dilation)
    return sync_batch_norm(y, bn_weight, bn_bias, running_mean, running_var,
                           momentum=momentum, eps=eps, residual=residual, relu=relu,
                           group=group)
