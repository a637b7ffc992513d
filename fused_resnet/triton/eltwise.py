"""Block-end elementwise kernels over NHWC tensors, as (rows, channels) tiles of the
(N*H*W, C) matrix, so per-channel values load once per tile and no flat index is divided.

Forward:  z = relu?(y * scale[c] + shift[c] + shortcut), where shortcut is a tensor r, or
          a second BN branch y2 * scale2[c] + shift2[c] (a projection shortcut), or absent.
Backward: with g = dz * [z > 0] (dz when there is no ReLU) and the BN backward written as a
          per-channel affine map of (g, y),
              dy = a[c] * g + b[c] * y + d[c],
          where, over the BN's n rows, with yhat = (y - mean) * rstd,
              a = gamma * rstd,  b = -a * rstd * sum(g * yhat) / n,
              d = -a * sum(g) / n - b * mean
          (`bn_bwd_coefficients`: computed inside the kernels that apply a `BnBackward`,
          once per tile or program, or by `bn_bwd_coefficient_rows` in one launch for a
          loop that would recompute them each step; no per-channel torch ops between the
          reductions and their users); the same for y2, and dr = g for a tensor shortcut.
"""

from typing import NamedTuple, Optional, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from fused_resnet.triton.config import acc_dtype, cdiv
from fused_resnet.triton.launch import run

BLOCK = 1024  # elements per program: BLOCK_C channels x BLOCK // BLOCK_C rows
MAX_BLOCK_C = 256

# How a backward kernel finds the ReLU mask [z > 0] of z = relu(y * scale + shift (+ ...)):
# None (no ReLU), the saved output z, (scale, shift) to recompute it from y as
# y * scale + shift > 0 (for a BN + ReLU inside a block, whose output is never stored), or
# the mask packed as bits (an int32 tensor, `bn_act_fwd_bits`: 1/16 of a bf16 z's bytes; read
# by the elementwise backward kernels, not by the conv loops).
ReluMask = Union[None, Tensor, tuple[Tensor, Tensor]]
NO_RELU, RELU_FROM_Z, RELU_FROM_Y, RELU_FROM_BITS = 0, 1, 2, 3
# The ReLU mask as bits: row m (a pixel of the NHWC (M, C) matrix) holds cdiv(C, 32) int32
# words, bit c % 32 of word c // 32 being [z[m, c] > 0] (z as stored: rounded to its dtype).
BITS_DTYPE = torch.int32


class BnBackward(NamedTuple):
    """What a kernel needs to apply a training BN's backward, dy = a * g + b * y + d (see the
    module docstring): the BN's gamma, batch mean and rstd, the sums over its n rows of g and
    g * yhat, all (C,), and n."""

    gamma: Tensor
    mean: Tensor
    rstd: Tensor
    sum_g: Tensor
    sum_gy: Tensor
    n: int


def relu_mask_args(mask: ReluMask, dummy: Tensor) -> tuple[int, Tensor, Tensor, Tensor]:
    """(mode, z, scale, shift) kernel arguments for a ReluMask; dummy fills unused pointers."""
    if mask is None:
        return NO_RELU, dummy, dummy, dummy
    if isinstance(mask, Tensor) and mask.dtype == BITS_DTYPE:
        return RELU_FROM_BITS, mask, dummy, dummy
    if isinstance(mask, Tensor):
        return RELU_FROM_Z, mask.contiguous(memory_format=torch.channels_last), dummy, dummy
    return RELU_FROM_Y, dummy, mask[0], mask[1]


@triton.jit
def relu(v):
    """max(v, 0) keeping NaN, as torch.relu does: one max.NaN instruction (FMNMX.NAN) on
    sm_80+ where tl.where(v < 0, 0, v) took a compare and a select."""
    return tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def relu_grad(g, z_ptr, offs, ok, y, ms, mh, RELU: tl.constexpr):
    """g * [z > 0] for the ReLU mask mode RELU (ms, mh broadcast along the channel axis);
    like torch's threshold_backward, only z <= 0 zeroes g (a NaN z lets it through)."""
    if RELU == 1:
        g = tl.where(tl.load(z_ptr + offs, mask=ok, other=0.0) <= 0, 0.0, g)
    elif RELU == 2:
        g = tl.where(y * ms + mh <= 0, 0.0, g)
    return g


def relu_bits_words(channels: int) -> int:
    """int32 words a row of the packed ReLU mask takes for `channels` channels."""
    return cdiv(channels, 32)


def pack_relu_bits(z: Tensor) -> Tensor:
    """The packed ReLU mask of z (N, C, H, W) as `bn_act_fwd_bits` writes it, in torch ops
    (tests, and the format's definition): (N*H*W, cdiv(C, 32)) int32, bit c % 32 of word
    c // 32 = [z > 0] (not z <= 0: a NaN passes, as in `relu_grad`)."""
    n, c, h, w = z.shape
    keep = ~(z.permute(0, 2, 3, 1).reshape(-1, c) <= 0)
    words = relu_bits_words(c)
    keep = torch.nn.functional.pad(keep.to(torch.int64), (0, 32 * words - c))
    bit_values = 2 ** torch.arange(32, dtype=torch.int64, device=z.device)
    packed = (keep.view(-1, words, 32) * bit_values).sum(-1)  # distinct bits: no carries
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(BITS_DTYPE)


@triton.jit
def relu_bits_keep(bits_ptr, rows, col0, ok, M, C, BLOCK_R: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """[z > 0] on a (BLOCK_R, BLOCK_C) tile (rows: its row indices, col0: its first channel,
    a multiple of BLOCK_C; False where not ok) from the packed mask: each word loaded once
    and its bits shifted out (a load per element, each word 32 times, took Triton 3.6 2.5x
    the instructions and up to 244 registers in `bn_bwd_reduce`)."""
    BITS: tl.constexpr = 32 if BLOCK_C > 32 else BLOCK_C
    WORDS: tl.constexpr = BLOCK_C // BITS
    words = (C + 31) // 32
    w = col0 // 32 + tl.arange(0, WORDS)
    word = tl.load(bits_ptr + rows.to(tl.int64)[:, None] * words + w[None, :],
                   mask=(rows < M)[:, None] & (w < words)[None, :], other=0)
    bits = (word[:, :, None] >> tl.arange(0, BITS)[None, None, :]) & 1
    return (tl.reshape(bits, (BLOCK_R, BLOCK_C)) != 0) & ok


@triton.jit
def bn_bwd_coefficients(gamma_ptr, mean_ptr, rstd_ptr, sum_g_ptr, sum_gy_ptr, n, offs_c, c_ok,
                        ACC_TY: tl.constexpr):
    """(a, b, d) of a BnBackward at channels offs_c (0 where not c_ok), in ACC_TY. 1 / n is
    one scalar division (hoisted out of a caller's loop), not two per channel."""
    inv_n = 1.0 / (n * tl.full((), 1.0, ACC_TY))
    gamma = tl.load(gamma_ptr + offs_c, mask=c_ok, other=0.0).to(ACC_TY)
    mean = tl.load(mean_ptr + offs_c, mask=c_ok, other=0.0).to(ACC_TY)
    rstd = tl.load(rstd_ptr + offs_c, mask=c_ok, other=0.0).to(ACC_TY)
    sum_g = tl.load(sum_g_ptr + offs_c, mask=c_ok, other=0.0).to(ACC_TY)
    sum_gy = tl.load(sum_gy_ptr + offs_c, mask=c_ok, other=0.0).to(ACC_TY)
    a = gamma * rstd
    b = -a * rstd * sum_gy * inv_n
    d = -a * sum_g * inv_n - b * mean
    return a, b, d


@triton.jit
def _bn_bwd_coefficients_kernel(
    gamma_ptr, mean_ptr, rstd_ptr, sum_g_ptr, sum_gy_ptr, n, out_ptr, C,
    ACC_FP64: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    a, b, d = bn_bwd_coefficients(gamma_ptr, mean_ptr, rstd_ptr, sum_g_ptr, sum_gy_ptr, n,
                                  offs_c, c_ok, tl.float64 if ACC_FP64 else tl.float32)
    tl.store(out_ptr + offs_c, a, mask=c_ok)
    tl.store(out_ptr + C + offs_c, b, mask=c_ok)
    tl.store(out_ptr + 2 * C + offs_c, d, mask=c_ok)


def bn_bwd_coefficient_rows(bn: BnBackward) -> Tensor:
    """(a, b, d) of a BnBackward as the rows of a (3, C) tensor in rstd's dtype, in one
    launch: for a kernel that would otherwise recompute them in its inner loop."""
    c = bn.rstd.shape[0]
    out = torch.empty((3, c), device=bn.rstd.device, dtype=bn.rstd.dtype)
    block_c = min(MAX_BLOCK_C, triton.next_power_of_2(c))
    run(_bn_bwd_coefficients_kernel, (cdiv(c, block_c),),
        *bn_bwd_args(bn, out), out, c, ACC_FP64=bn.rstd.dtype == torch.float64,
        BLOCK_C=block_c)
    return out


def bn_bwd_args(bn: Optional[BnBackward], dummy: Tensor) -> tuple:
    """A BnBackward as kernel arguments for `bn_bwd_coefficients`; for None (no BN backward
    applied), `dummy` in its pointers' places and n = 1."""
    if bn is None:
        return (dummy,) * 5 + (1,)
    return bn.gamma, bn.mean, bn.rstd, bn.sum_g, bn.sum_gy, bn.n


def _grid(y: Tensor) -> tuple[int, int, int, int, tuple[int, int]]:
    """(rows M, channels C, BLOCK_R, BLOCK_C, grid) of the tiles over y's (M, C) matrix."""
    c = y.shape[1]
    m = y.numel() // c
    block_c = min(MAX_BLOCK_C, triton.next_power_of_2(c))
    block_r = BLOCK // block_c
    return m, c, block_r, block_c, (cdiv(m, block_r), cdiv(c, block_c))


@triton.jit
def _tile(M, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """(element offsets, mask, rows, channels, channel mask) of this program's tile
    (M < 2^31)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    ok = (rows < M)[:, None] & c_ok[None, :]
    return rows.to(tl.int64)[:, None] * C + cols[None, :], ok, rows, cols, c_ok


@triton.jit
def store_relu_bits(bits_ptr, z, ok, rows, col0, M, C, BLOCK_R: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    """Stores [z > 0] of a (BLOCK_R, BLOCK_C) tile of the stored z (rows: its row indices,
    col0: its first channel; False where not ok) into the packed mask, BITS channels a word:
    bit b of word w = channel w * 32 + b. col0 must be a multiple of 32, or the tile must
    hold all C channels (one word, its low bits): a word is written by one tile, whole."""
    BITS: tl.constexpr = 32 if BLOCK_C > 32 else BLOCK_C
    WORDS: tl.constexpr = BLOCK_C // BITS
    keep = (ok & ~(z <= 0)).to(tl.int32)
    shifts = tl.arange(0, BITS)[None, None, :]
    packed = tl.sum(tl.reshape(keep, (BLOCK_R, WORDS, BITS)) << shifts, axis=2)
    words = (C + 31) // 32
    w = col0 // 32 + tl.arange(0, WORDS)
    w_ok = (rows < M)[:, None] & (w < words)[None, :]
    tl.store(bits_ptr + rows.to(tl.int64)[:, None] * words + w[None, :], packed, mask=w_ok)


@triton.jit
def _bn_act_fwd_kernel(
    y_ptr, scale_ptr, shift_ptr, r_ptr, y2_ptr, scale2_ptr, shift2_ptr, z_ptr, bits_ptr, M, C,
    HAS_RES: tl.constexpr, HAS_BN2: tl.constexpr, RELU: tl.constexpr,
    WRITE_BITS: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    offs, ok, rows, cols, c_ok = _tile(M, C, BLOCK_R, BLOCK_C)
    scale = tl.load(scale_ptr + cols, mask=c_ok, other=0.0)[None, :]
    shift = tl.load(shift_ptr + cols, mask=c_ok, other=0.0)[None, :]
    v = tl.load(y_ptr + offs, mask=ok, other=0.0).to(acc_ty) * scale + shift
    if HAS_RES:
        v += tl.load(r_ptr + offs, mask=ok, other=0.0).to(acc_ty)
    if HAS_BN2:
        y2 = tl.load(y2_ptr + offs, mask=ok, other=0.0).to(acc_ty)
        v += (y2 * tl.load(scale2_ptr + cols, mask=c_ok, other=0.0)[None, :]
              + tl.load(shift2_ptr + cols, mask=c_ok, other=0.0)[None, :])
    if RELU:
        v = relu(v)
    z = v.to(z_ptr.dtype.element_ty)
    tl.store(z_ptr + offs, z, mask=ok)
    if WRITE_BITS:
        store_relu_bits(bits_ptr, z, ok, rows, tl.program_id(1) * BLOCK_C, M, C, BLOCK_R,
                        BLOCK_C)


def bn_act_fwd(
    y: Tensor, scale: Tensor, shift: Tensor, *, residual: Optional[Tensor] = None,
    y2: Optional[Tensor] = None, scale2: Optional[Tensor] = None,
    shift2: Optional[Tensor] = None, relu: bool = True,
) -> Tensor:
    """z = relu?(y * scale + shift + residual | y2 * scale2 + shift2), NHWC, in y's dtype.
    y, residual, y2: (N, C, H, W) channels_last; scale, shift: (C,) in the acc dtype."""
    return _bn_act_fwd(y, scale, shift, residual, y2, scale2, shift2, relu, False)[0]


def bn_act_fwd_bits(
    y: Tensor, scale: Tensor, shift: Tensor, *, residual: Optional[Tensor] = None,
    y2: Optional[Tensor] = None, scale2: Optional[Tensor] = None,
    shift2: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """(z, its ReLU mask packed as bits) in one pass: z as `bn_act_fwd(..., relu=True)`, the
    mask as `pack_relu_bits(z)`, for a backward that needs [z > 0] but not z (16x fewer
    bytes to read than a bf16 z)."""
    return _bn_act_fwd(y, scale, shift, residual, y2, scale2, shift2, True, True)


def _bn_act_fwd(y, scale, shift, residual, y2, scale2, shift2, relu, write_bits):
    z = torch.empty_like(y, memory_format=torch.channels_last)
    n, c, h, w = y.shape
    bits = torch.empty((n * h * w, relu_bits_words(c)), device=y.device, dtype=BITS_DTYPE) \
        if write_bits else None
    if y.numel() == 0:
        return z, bits
    m, c, block_r, block_c, grid = _grid(y)
    run(_bn_act_fwd_kernel, grid,
        y, scale, shift, residual if residual is not None else y,
        y2 if y2 is not None else y, scale2 if y2 is not None else scale,
        shift2 if y2 is not None else shift, z, bits if write_bits else z, m, c,
        HAS_RES=residual is not None, HAS_BN2=y2 is not None, RELU=relu,
        WRITE_BITS=write_bits,
        ACC_FP64=acc_dtype(y.dtype) == torch.float64, BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return z, bits


@triton.jit
def _bn_act_bwd_kernel(
    dz_ptr, z_ptr, ms_ptr, mh_ptr, y_ptr,
    gamma_ptr, mean_ptr, rstd_ptr, sum_g_ptr, sum_gy_ptr, n,
    y2_ptr, gamma2_ptr, mean2_ptr, rstd2_ptr, sum_g2_ptr, sum_gy2_ptr, n2,
    dy_ptr, dy2_ptr, dr_ptr, M, C,
    RELU: tl.constexpr, WRITE_DY: tl.constexpr, HAS_BN2: tl.constexpr, WRITE_DR: tl.constexpr,
    ACC_FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    offs, ok, rows, cols, c_ok = _tile(M, C, BLOCK_R, BLOCK_C)
    g = tl.load(dz_ptr + offs, mask=ok, other=0.0).to(acc_ty)
    y = tl.load(y_ptr + offs, mask=ok, other=0.0).to(acc_ty)
    ms = tl.load(ms_ptr + cols, mask=c_ok & (RELU == 2), other=0.0)[None, :]
    mh = tl.load(mh_ptr + cols, mask=c_ok & (RELU == 2), other=0.0)[None, :]
    if RELU == 3:
        g = tl.where(relu_bits_keep(z_ptr, rows, tl.program_id(1) * BLOCK_C, ok, M, C,
                                    BLOCK_R, BLOCK_C), g, 0.0)
    else:
        g = relu_grad(g, z_ptr, offs, ok, y, ms, mh, RELU)
    if WRITE_DY:
        a, b, d = bn_bwd_coefficients(gamma_ptr, mean_ptr, rstd_ptr, sum_g_ptr, sum_gy_ptr, n,
                                      cols, c_ok, acc_ty)
        dy = a[None, :] * g + b[None, :] * y + d[None, :]
        tl.store(dy_ptr + offs, dy.to(dy_ptr.dtype.element_ty), mask=ok)
    if HAS_BN2:
        a2, b2, d2 = bn_bwd_coefficients(gamma2_ptr, mean2_ptr, rstd2_ptr, sum_g2_ptr,
                                         sum_gy2_ptr, n2, cols, c_ok, acc_ty)
        y2 = tl.load(y2_ptr + offs, mask=ok, other=0.0).to(acc_ty)
        dy2 = a2[None, :] * g + b2[None, :] * y2 + d2[None, :]
        tl.store(dy2_ptr + offs, dy2.to(dy2_ptr.dtype.element_ty), mask=ok)
    if WRITE_DR:
        tl.store(dr_ptr + offs, g.to(dr_ptr.dtype.element_ty), mask=ok)


def bn_act_bwd(
    dz: Tensor, z: ReluMask, y: Tensor, bn: Optional[BnBackward], *,
    y2: Optional[Tensor] = None, bn2: Optional[BnBackward] = None,
    write_dr: bool = False, write_dy: bool = True,
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dy or None, dy2 or None, dr or None), channels_last in y's dtype; z is the ReluMask,
    bn (bn2) the BN backward giving dy (dy2). write_dy=False skips dy (a conv backward then
    computes it on load) and needs no bn; dr = g."""
    if write_dy and bn is None:
        raise ValueError("bn_act_bwd: write_dy needs the BN backward bn")
    if y2 is not None and bn2 is None:
        raise ValueError("bn_act_bwd: y2 needs its BN backward bn2")
    dy = torch.empty_like(y, memory_format=torch.channels_last) if write_dy else None
    dy2 = torch.empty_like(y2, memory_format=torch.channels_last) if y2 is not None else None
    dr = torch.empty_like(y, memory_format=torch.channels_last) if write_dr else None
    if y.numel() == 0 or (dy is None and dy2 is None and dr is None):
        return dy, dy2, dr
    m, c, block_r, block_c, grid = _grid(y)
    relu, z_arg, ms, mh = relu_mask_args(z, dz)
    run(_bn_act_bwd_kernel, grid,
        dz, z_arg, ms, mh, y, *bn_bwd_args(bn, dz),
        y2 if y2 is not None else y, *bn_bwd_args(bn2, dz),
        *(t if t is not None else dz for t in (dy, dy2, dr)), m, c,
        RELU=relu, WRITE_DY=write_dy, HAS_BN2=y2 is not None, WRITE_DR=write_dr,
        ACC_FP64=acc_dtype(y.dtype) == torch.float64, BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return dy, dy2, dr
