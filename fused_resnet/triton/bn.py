"""BatchNorm statistics: finalize the conv epilogue's partials, and backward reductions.

Forward: the conv kernel leaves, per group of `rows` rows g and channel c, a shift k_g (a y
value, or for fp16 / bf16 y the group's mean), lo_g = mean_g - k_g (None where k_g is the
mean: lo_g = 0) and M2_g = sum (y - mean_g)^2. `bn_finalize` takes the means
relative to K = k_0, rel_g = (k_g - K) + lo_g (small numbers: no cancellation for large
means), and merges the groups of each tile of MERGE_TILE consecutive groups in parallel with
the exact two-pass formula over groups
    n = sum n_g,  rel = sum n_g * rel_g / n,  M2 = sum M2_g + sum n_g * (rel_g - rel)^2
(every term of M2 is >= 0: nothing cancels), then the tiles' results the same way, level by
level, until one tile is left; that last merge returns mean = K + rel, biased var = M2 / n,
rstd = 1 / sqrt(var + eps), scale = gamma * rstd and shift = beta - mean * scale (the forward
applies the BN as y * scale + shift; the backward reuses these three, so that it sees the
forward's ReLU mask bit for bit). The tiles are fixed by the number of groups, and a tile's
sums run in a fixed order: the statistics are deterministic and do not depend on the conv's
tile config. (A ResNet-50 stem at batch 256 has 100352 groups. Merged one after another, as
this module first did, they are a chain of 100352 dependent loads and divisions in one
program per 128 channels, est. 10-30 ms for that one BN and ~100 ms per training step in
all; in tiles of 512 they are 196 programs, then one.)

Backward: for z = relu?(gamma * yhat + beta + shortcut), yhat = (y - mean) * rstd, the
gradient at the BN output is g = dz * [z > 0]; `bn_bwd_reduce` returns sum g and
sum g * yhat per channel (= d beta, d gamma), optionally for a second BN branch y2 that
feeds the same sum (a projection shortcut), and optionally g itself: a shortcut's gradient,
or what the convs of the BN backward then read on load instead of dz and z.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fused_resnet.triton.config import acc_dtype, cdiv
from fused_resnet.triton.conv import MAX_PIXELS
from fused_resnet.triton.eltwise import (
    RELU_FROM_Y,
    ReluMask,
    relu_bits_keep,
    relu_grad,
    relu_mask_args,
)
from fused_resnet.triton.launch import run

MERGE_TILE = 512  # groups one program merges
MERGE_ROWS = 64  # groups loaded per step


@triton.jit
def _group_means(shift_ptr, mean_ptr, k0, g, g_ok, offs_c, c_ok, C, SHIFTED: tl.constexpr,
                 HAS_LO: tl.constexpr, ACC_TY: tl.constexpr):
    """(BLOCK_R, BLOCK_C) means of groups g relative to K = k0: mean, or with SHIFTED
    (level 0) shift - K (+ lo = mean with HAS_LO); 0 where masked."""
    ok = g_ok[:, None] & c_ok[None, :]
    offs = g.to(tl.int64)[:, None] * C + offs_c[None, :]
    if SHIFTED:
        rel = tl.where(ok, tl.load(shift_ptr + offs, mask=ok, other=0.0) - k0[None, :], 0.0)
        if HAS_LO:
            rel += tl.load(mean_ptr + offs, mask=ok, other=0.0).to(ACC_TY)
    else:
        rel = tl.load(mean_ptr + offs, mask=ok, other=0.0).to(ACC_TY)
    return rel


@triton.jit
def _bn_merge_kernel(
    shift_ptr, mean_ptr, m2_ptr, k0_ptr, out_mean_ptr, out_m2_ptr,
    gamma_ptr, beta_ptr, var_ptr, affine_ptr,
    num_groups, rows, M, C, eps,
    SHIFTED: tl.constexpr, HAS_LO: tl.constexpr, FINAL: tl.constexpr, ACC_FP64: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Groups [tile * TILE, (tile + 1) * TILE) of this level, each covering `rows` rows of y
    # (the last one fewer): n_g = min(rows, M - g * rows). Their means are mean_ptr (+ shift
    # - K with SHIFTED, level 0), relative to K otherwise. Writes the tile's (rel, M2) at row
    # `tile`, or with FINAL (one tile holding every group) the BN's mean, var and the rows
    # rstd, scale, shift of affine (3, C).
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    tile = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    k0 = tl.load(k0_ptr + offs_c, mask=c_ok, other=0.0).to(acc_ty)
    first = tile * TILE
    last = tl.minimum(first + TILE, num_groups)
    n = tl.zeros((BLOCK_C,), dtype=acc_ty)
    total = tl.zeros((BLOCK_C,), dtype=acc_ty)
    for g0 in range(first, last, BLOCK_R):  # pass 1: n and sum n_g * rel_g
        g = g0 + tl.arange(0, BLOCK_R)
        g_ok = g < last
        n_g = tl.where(g_ok, tl.minimum(rows, M - g * rows), 0).to(acc_ty)
        rel = _group_means(shift_ptr, mean_ptr, k0, g, g_ok, offs_c, c_ok, C, SHIFTED, HAS_LO,
                           acc_ty)
        n += tl.sum(n_g, axis=0)
        total += tl.sum(n_g[:, None] * rel, axis=0)
    mean = total / tl.maximum(n, 1.0)
    m2 = tl.zeros((BLOCK_C,), dtype=acc_ty)
    for g0 in range(first, last, BLOCK_R):  # pass 2: sum M2_g + n_g * (rel_g - rel)^2
        g = g0 + tl.arange(0, BLOCK_R)
        g_ok = g < last
        n_g = tl.where(g_ok, tl.minimum(rows, M - g * rows), 0).to(acc_ty)
        rel = _group_means(shift_ptr, mean_ptr, k0, g, g_ok, offs_c, c_ok, C, SHIFTED, HAS_LO,
                           acc_ty)
        d = rel - mean[None, :]  # 0 - mean where masked, but n_g = 0 there
        ok = g_ok[:, None] & c_ok[None, :]
        m2_g = tl.load(m2_ptr + g.to(tl.int64)[:, None] * C + offs_c[None, :], mask=ok, other=0.0)
        m2 += tl.sum(m2_g + n_g[:, None] * d * d, axis=0)
    if FINAL:
        var = m2 / n
        mean += k0
        rstd = 1.0 / tl.sqrt(var + eps)
        gamma = tl.load(gamma_ptr + offs_c, mask=c_ok, other=1.0).to(acc_ty)
        beta = tl.load(beta_ptr + offs_c, mask=c_ok, other=0.0).to(acc_ty)
        scale = gamma * rstd
        tl.store(out_mean_ptr + offs_c, mean, mask=c_ok)
        tl.store(var_ptr + offs_c, var, mask=c_ok)
        tl.store(affine_ptr + offs_c, rstd, mask=c_ok)
        tl.store(affine_ptr + C + offs_c, scale, mask=c_ok)
        tl.store(affine_ptr + 2 * C + offs_c, beta - mean * scale, mask=c_ok)
    else:
        tl.store(out_mean_ptr + tile * C + offs_c, mean, mask=c_ok)
        tl.store(out_m2_ptr + tile * C + offs_c, m2, mask=c_ok)


def bn_finalize(
    part_shift: Tensor, part_mean: Optional[Tensor], part_m2: Tensor, rows: int, m: int,
    gamma: Tensor, beta: Tensor, eps: float, *, tile: int = MERGE_TILE,
) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, biased var, affine), mean and var (C,) and affine (3, C) holding rstd, scale,
    shift, in the partials' dtype, of m rows whose groups of `rows` rows left the partials
    (shift, mean - shift or None (0: the shift is the group's mean), M2), each (G, C);
    `tile` groups merge in one program (tests set it small to exercise several levels)."""
    groups, c = part_m2.shape
    eps = float(eps)  # (a NumPy float or a 0-d tensor, as BN modules may hold, is no kernel
    if m > MAX_PIXELS:  # argument)
        raise ValueError(f"bn_finalize: m (rows of y, N*H*W) must be below 2**31, got {m}")
    if tile < 2:
        raise ValueError(f"bn_finalize: tile must be at least 2 groups, got {tile}")
    dev, dtype = part_m2.device, part_m2.dtype
    mean_out, var_out = (torch.empty(c, device=dev, dtype=dtype) for _ in range(2))
    affine = torch.empty((3, c), device=dev, dtype=dtype)
    block_c = min(64, triton.next_power_of_2(c))
    common = dict(HAS_LO=part_mean is not None, ACC_FP64=dtype == torch.float64, TILE=tile,
                  BLOCK_R=MERGE_ROWS, BLOCK_C=block_c)
    k0 = part_shift[0]  # K: every level's means are relative to it
    # (levels after the first read no shifts: k0 stands in for part_shift there, so that a
    # profile's byte count (`launch_work`) holds only what the level reads)
    mean, m2, shifted = part_mean if part_mean is not None else part_shift, part_m2, True
    while groups > tile:  # one level of the tree: `tile` groups -> 1
        tiles = cdiv(groups, tile)
        level = [torch.empty((tiles, c), device=dev, dtype=dtype) for _ in range(2)]
        run(_bn_merge_kernel, (tiles, cdiv(c, block_c)),
            part_shift if shifted else k0, mean, m2, k0, *level, gamma, beta, var_out, affine,
            groups, rows, m, c, eps, SHIFTED=shifted, FINAL=False, **common)
        mean, m2, shifted = level[0], level[1], False
        groups, rows = tiles, rows * tile
    run(_bn_merge_kernel, (1, cdiv(c, block_c)),
        part_shift if shifted else k0, mean, m2, k0, mean_out, mean_out, gamma, beta, var_out,
        affine, groups, rows, m, c, eps, SHIFTED=shifted, FINAL=True, **common)
    return mean_out, var_out, affine


@triton.jit
def _bn_bwd_reduce_kernel(
    dz_ptr, z_ptr, ms_ptr, mh_ptr, y_ptr, mean_ptr, rstd_ptr, y2_ptr, mean2_ptr, rstd2_ptr,
    sum_g_ptr, sum_gy_ptr, sum_gy2_ptr, g_ptr,
    M, C,
    RELU: tl.constexpr, HAS_Y: tl.constexpr, TWO: tl.constexpr, WRITE_G: tl.constexpr,
    ACC_FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    pid_r = tl.program_id(0)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    ok = (offs_r < M)[:, None] & c_ok[None, :]
    offs = offs_r.to(tl.int64)[:, None] * C + offs_c[None, :]
    g = tl.load(dz_ptr + offs, mask=ok, other=0.0).to(acc_ty)
    y = tl.load(y_ptr + offs, mask=ok & HAS_Y, other=0.0).to(acc_ty)
    ms = tl.load(ms_ptr + offs_c, mask=c_ok & (RELU == 2), other=0.0)[None, :]
    mh = tl.load(mh_ptr + offs_c, mask=c_ok & (RELU == 2), other=0.0)[None, :]
    if RELU == 3:
        g = tl.where(relu_bits_keep(z_ptr, offs_r, tl.program_id(1) * BLOCK_C, ok, M, C,
                                    BLOCK_R, BLOCK_C), g, 0.0)
    else:
        g = relu_grad(g, z_ptr, offs, ok, y, ms, mh, RELU)
    if WRITE_G:  # dz masked: exact in dz's dtype
        tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=ok)
    part = pid_r * C + offs_c
    tl.store(sum_g_ptr + part, tl.sum(g, axis=0), mask=c_ok)
    if HAS_Y:
        mean = tl.load(mean_ptr + offs_c, mask=c_ok, other=0.0)
        rstd = tl.load(rstd_ptr + offs_c, mask=c_ok, other=0.0)
        yhat = (y - mean[None, :]) * rstd[None, :]
        tl.store(sum_gy_ptr + part, tl.sum(tl.where(ok, g * yhat, 0.0), axis=0), mask=c_ok)
    if TWO:
        mean2 = tl.load(mean2_ptr + offs_c, mask=c_ok, other=0.0)
        rstd2 = tl.load(rstd2_ptr + offs_c, mask=c_ok, other=0.0)
        y2 = tl.load(y2_ptr + offs, mask=ok, other=0.0).to(acc_ty)
        yhat2 = (y2 - mean2[None, :]) * rstd2[None, :]
        tl.store(sum_gy2_ptr + part, tl.sum(tl.where(ok, g * yhat2, 0.0), axis=0), mask=c_ok)


def bn_bwd_reduce(
    dz: Tensor, z: ReluMask, y: Optional[Tensor], mean: Optional[Tensor],
    rstd: Optional[Tensor], y2: Optional[Tensor] = None, mean2: Optional[Tensor] = None,
    rstd2: Optional[Tensor] = None, *, write_g: bool = False,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(sum g, sum g * yhat or None without y, sum g * yhat2 or None, g or None) per channel,
    with g = dz * [z > 0] (z a ReluMask; g = dz when it is None), g itself written (in dz's
    dtype) with `write_g`, in the pass that reads dz and z anyway (a shortcut's gradient; one
    tensor for later passes to read instead of two). Tensors (N, C, H, W) channels_last;
    stats (C,)."""
    c = dz.shape[1]
    m = dz.numel() // c
    acc = acc_dtype(dz.dtype)
    block_c = min(64, triton.next_power_of_2(c))
    block_r = 64
    tiles = cdiv(m, block_r)
    has_y = y is not None
    two = y2 is not None
    if two and not has_y:
        raise ValueError("bn_bwd_reduce: y2 needs y")
    parts = [torch.empty((tiles, c), device=dz.device, dtype=acc)
             for _ in range(1 + has_y + two)]
    relu, z_arg, ms, mh = relu_mask_args(z, dz)
    if relu == RELU_FROM_Y and not has_y:
        raise ValueError("bn_bwd_reduce: a ReLU mask from (scale, shift) needs y")
    g = torch.empty_like(dz, memory_format=torch.channels_last) if write_g else None
    y, mean, rstd = (y, mean, rstd) if has_y else (dz, parts[0], parts[0])
    run(_bn_bwd_reduce_kernel, (tiles, cdiv(c, block_c)),
        dz, z_arg, ms, mh, y, mean, rstd,
        y2 if two else y, mean2 if two else mean, rstd2 if two else rstd,
        parts[0], parts[-2 if two else -1], parts[-1], g if write_g else dz, m, c,
        RELU=relu, HAS_Y=has_y, TWO=two, WRITE_G=write_g, ACC_FP64=acc == torch.float64,
        BLOCK_R=block_r, BLOCK_C=block_c,
    )
    sums = [p.sum(0) for p in parts]  # fixed-order reduction of the tile partials
    return (sums[0], sums[1] if has_y else None, sums[2] if two else None, g)
