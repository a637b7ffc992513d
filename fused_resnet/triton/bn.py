"""BatchNorm statistics: finalize the conv epilogue's partials, and backward reductions.

Forward: the conv kernel leaves, per group of `rows` rows g and channel c, a shift k_g (a y
value), lo_g = mean_g - k_g and M2_g = sum (y - mean_g)^2. `bn_finalize` takes the means
relative to K = k_0, rel_g = (k_g - K) + lo_g (small numbers: no cancellation for large
means), merges the groups in a fixed order with Chan's formula
    rel_ab = rel_a + d * n_b / n,  M2_ab = M2_a + M2_b + d^2 * n_a * n_b / n
(d = rel_b - rel_a, n = n_a + n_b), and returns mean = K + rel, biased var = M2 / n,
scale = gamma / sqrt(var + eps) and shift = beta - mean * scale.

Backward: for z = relu?(gamma * yhat + beta + shortcut), yhat = (y - mean) * rstd, the
gradient at the BN output is g = dz * [z > 0]; `bn_bwd_reduce` returns sum g and
sum g * yhat per channel (= d beta, d gamma), optionally for a second BN branch y2 that
feeds the same sum (a projection shortcut).
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fused_resnet.triton.config import acc_dtype
from fused_resnet.triton.eltwise import ReluMask, relu_grad, relu_mask_args


@triton.jit
def _bn_finalize_kernel(
    part_shift_ptr, part_mean_ptr, part_m2_ptr, gamma_ptr, beta_ptr,
    mean_ptr, var_ptr, scale_ptr, shift_ptr,
    num_groups, rows, M, C, eps,
    ACC_FP64: tl.constexpr, BLOCK_C: tl.constexpr,
):
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    n = tl.zeros((BLOCK_C,), dtype=acc_ty)
    mean = tl.zeros((BLOCK_C,), dtype=acc_ty)  # relative to k0
    m2 = tl.zeros((BLOCK_C,), dtype=acc_ty)
    k0 = tl.load(part_shift_ptr + offs_c, mask=c_ok, other=0.0)
    for g in range(0, num_groups):
        n_b = tl.minimum(rows, M - g * rows).to(acc_ty)
        k = tl.load(part_shift_ptr + g * C + offs_c, mask=c_ok, other=0.0)
        mean_b = (k - k0) + tl.load(part_mean_ptr + g * C + offs_c, mask=c_ok, other=0.0)
        m2_b = tl.load(part_m2_ptr + g * C + offs_c, mask=c_ok, other=0.0)
        total = n + n_b
        delta = mean_b - mean
        mean += delta * (n_b / total)
        m2 += m2_b + delta * delta * (n * n_b / total)
        n = total
    var = m2 / n
    mean += k0
    rstd = 1.0 / tl.sqrt(var + eps)
    gamma = tl.load(gamma_ptr + offs_c, mask=c_ok, other=1.0).to(acc_ty)
    beta = tl.load(beta_ptr + offs_c, mask=c_ok, other=0.0).to(acc_ty)
    scale = gamma * rstd
    tl.store(mean_ptr + offs_c, mean, mask=c_ok)
    tl.store(var_ptr + offs_c, var, mask=c_ok)
    tl.store(scale_ptr + offs_c, scale, mask=c_ok)
    tl.store(shift_ptr + offs_c, beta - mean * scale, mask=c_ok)


def bn_finalize(
    part_shift: Tensor, part_mean: Tensor, part_m2: Tensor, rows: int, m: int, gamma: Tensor,
    beta: Tensor, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean, biased var, scale, shift), each (C,) in the partials' dtype, of m rows whose
    groups of `rows` rows left the partials (shift, mean - shift, M2), each (G, C)."""
    groups, c = part_mean.shape
    out = [torch.empty(c, device=part_mean.device, dtype=part_mean.dtype) for _ in range(4)]
    block_c = min(128, triton.next_power_of_2(c))
    _bn_finalize_kernel[(triton.cdiv(c, block_c),)](
        part_shift, part_mean, part_m2, gamma, beta, *out, groups, rows, m, c, eps,
        ACC_FP64=part_mean.dtype == torch.float64, BLOCK_C=block_c,
    )
    return tuple(out)


@triton.jit
def _bn_bwd_reduce_kernel(
    dz_ptr, z_ptr, ms_ptr, mh_ptr, y_ptr, mean_ptr, rstd_ptr, y2_ptr, mean2_ptr, rstd2_ptr,
    sum_g_ptr, sum_gy_ptr, sum_gy2_ptr,
    M, C,
    RELU: tl.constexpr, TWO: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    pid_r = tl.program_id(0)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    ok = (offs_r < M)[:, None] & c_ok[None, :]
    offs = offs_r.to(tl.int64)[:, None] * C + offs_c[None, :]
    g = tl.load(dz_ptr + offs, mask=ok, other=0.0).to(acc_ty)
    y = tl.load(y_ptr + offs, mask=ok, other=0.0).to(acc_ty)
    ms = tl.load(ms_ptr + offs_c, mask=c_ok & (RELU == 2), other=0.0)[None, :]
    mh = tl.load(mh_ptr + offs_c, mask=c_ok & (RELU == 2), other=0.0)[None, :]
    g = relu_grad(g, z_ptr, offs, ok, y, ms, mh, RELU)
    mean = tl.load(mean_ptr + offs_c, mask=c_ok, other=0.0)
    rstd = tl.load(rstd_ptr + offs_c, mask=c_ok, other=0.0)
    yhat = (y - mean[None, :]) * rstd[None, :]
    part = pid_r * C + offs_c
    tl.store(sum_g_ptr + part, tl.sum(g, axis=0), mask=c_ok)
    tl.store(sum_gy_ptr + part, tl.sum(tl.where(ok, g * yhat, 0.0), axis=0), mask=c_ok)
    if TWO:
        mean2 = tl.load(mean2_ptr + offs_c, mask=c_ok, other=0.0)
        rstd2 = tl.load(rstd2_ptr + offs_c, mask=c_ok, other=0.0)
        y2 = tl.load(y2_ptr + offs, mask=ok, other=0.0).to(acc_ty)
        yhat2 = (y2 - mean2[None, :]) * rstd2[None, :]
        tl.store(sum_gy2_ptr + part, tl.sum(tl.where(ok, g * yhat2, 0.0), axis=0), mask=c_ok)


def bn_bwd_reduce(
    dz: Tensor, z: ReluMask, y: Tensor, mean: Tensor, rstd: Tensor,
    y2: Optional[Tensor] = None, mean2: Optional[Tensor] = None, rstd2: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(sum g, sum g * yhat, sum g * yhat2 or None) per channel, with g = dz * [z > 0]
    (z a ReluMask; g = dz when it is None). Tensors (N, C, H, W) channels_last; stats (C,)."""
    c = y.shape[1]
    m = y.numel() // c
    acc = acc_dtype(y.dtype)
    block_c = min(64, triton.next_power_of_2(c))
    block_r = 64
    tiles = triton.cdiv(m, block_r)
    two = y2 is not None
    parts = [torch.empty((tiles, c), device=y.device, dtype=acc) for _ in range(3 if two else 2)]
    relu, z_arg, ms, mh = relu_mask_args(z, dz)
    _bn_bwd_reduce_kernel[(tiles, triton.cdiv(c, block_c))](
        dz, z_arg, ms, mh, y, mean, rstd,
        y2 if two else y, mean2 if two else mean, rstd2 if two else rstd,
        parts[0], parts[1], parts[2] if two else parts[1], m, c,
        RELU=relu, TWO=two, ACC_FP64=acc == torch.float64,
        BLOCK_R=block_r, BLOCK_C=block_c,
    )
    sums = [p.sum(0) for p in parts]  # fixed-order reduction of the tile partials
    return sums[0], sums[1], sums[2] if two else None
