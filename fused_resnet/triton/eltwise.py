"""Block-end elementwise kernels over NHWC tensors (channel c = flat index mod C).

Forward:  z = relu?(y * scale[c] + shift[c] + shortcut), where shortcut is a tensor r, or
          a second BN branch y2 * scale2[c] + shift2[c] (a projection shortcut), or absent.
Backward: with g = dz * [z > 0] (dz when there is no ReLU) and the BN backward written as a
          per-channel affine map of (g, y),
              dy = a[c] * g + b[c] * y + d[c],
          where a = gamma * rstd, b = -gamma * rstd^2 * sum(g * yhat) / n and
          d = -gamma * rstd * sum(g) / n + gamma * rstd^2 * mean * sum(g * yhat) / n
          (see `bn_backward_coefficients`); the same for y2, and dr = g for a tensor shortcut.
"""

from typing import Optional, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from fused_resnet.triton.config import acc_dtype

BLOCK = 1024

# How a backward kernel finds the ReLU mask [z > 0] of z = relu(y * scale + shift (+ ...)):
# None (no ReLU), the saved output z, or (scale, shift) to recompute it from y as
# y * scale + shift > 0 (for a BN + ReLU inside a block, whose output is never stored).
ReluMask = Union[None, Tensor, tuple[Tensor, Tensor]]
NO_RELU, RELU_FROM_Z, RELU_FROM_Y = 0, 1, 2


def relu_mask_args(mask: ReluMask, dummy: Tensor) -> tuple[int, Tensor, Tensor, Tensor]:
    """(mode, z, scale, shift) kernel arguments for a ReluMask; dummy fills unused pointers."""
    if mask is None:
        return NO_RELU, dummy, dummy, dummy
    if isinstance(mask, Tensor):
        return RELU_FROM_Z, mask.contiguous(memory_format=torch.channels_last), dummy, dummy
    return RELU_FROM_Y, dummy, mask[0], mask[1]


@triton.jit
def relu(v):
    """max(v, 0) keeping NaN, as torch.relu does (v < 0 is false for NaN)."""
    return tl.where(v < 0, 0.0, v)


@triton.jit
def relu_grad(g, z_ptr, offs, ok, y, ms, mh, RELU: tl.constexpr):
    """g * [z > 0] for the ReLU mask mode RELU (ms, mh broadcast along the channel axis);
    like torch's threshold_backward, only z <= 0 zeroes g (a NaN z lets it through)."""
    if RELU == 1:
        g = tl.where(tl.load(z_ptr + offs, mask=ok, other=0.0) <= 0, 0.0, g)
    elif RELU == 2:
        g = tl.where(y * ms + mh <= 0, 0.0, g)
    return g


@triton.jit
def _bn_act_fwd_kernel(
    y_ptr, scale_ptr, shift_ptr, r_ptr, y2_ptr, scale2_ptr, shift2_ptr, z_ptr, numel, C,
    HAS_RES: tl.constexpr, HAS_BN2: tl.constexpr, RELU: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    c = offs % C
    v = tl.load(y_ptr + offs, mask=ok, other=0.0).to(acc_ty) * tl.load(scale_ptr + c, mask=ok)
    v += tl.load(shift_ptr + c, mask=ok)
    if HAS_RES:
        v += tl.load(r_ptr + offs, mask=ok, other=0.0).to(acc_ty)
    if HAS_BN2:
        y2 = tl.load(y2_ptr + offs, mask=ok, other=0.0).to(acc_ty)
        v += y2 * tl.load(scale2_ptr + c, mask=ok) + tl.load(shift2_ptr + c, mask=ok)
    if RELU:
        v = relu(v)
    tl.store(z_ptr + offs, v.to(z_ptr.dtype.element_ty), mask=ok)


def bn_act_fwd(
    y: Tensor, scale: Tensor, shift: Tensor, *, residual: Optional[Tensor] = None,
    y2: Optional[Tensor] = None, scale2: Optional[Tensor] = None,
    shift2: Optional[Tensor] = None, relu: bool = True,
) -> Tensor:
    """z = relu?(y * scale + shift + residual | y2 * scale2 + shift2), NHWC, in y's dtype.
    y, residual, y2: (N, C, H, W) channels_last; scale, shift: (C,) in the acc dtype."""
    z = torch.empty_like(y, memory_format=torch.channels_last)
    numel = y.numel()
    if numel == 0:
        return z
    _bn_act_fwd_kernel[(triton.cdiv(numel, BLOCK),)](
        y, scale, shift, residual if residual is not None else y,
        y2 if y2 is not None else y, scale2 if y2 is not None else scale,
        shift2 if y2 is not None else shift, z, numel, y.shape[1],
        HAS_RES=residual is not None, HAS_BN2=y2 is not None, RELU=relu,
        ACC_FP64=acc_dtype(y.dtype) == torch.float64, BLOCK=BLOCK,
    )
    return z


@triton.jit
def _bn_act_bwd_kernel(
    dz_ptr, z_ptr, ms_ptr, mh_ptr, y_ptr, a_ptr, b_ptr, d_ptr, y2_ptr, a2_ptr, b2_ptr, d2_ptr,
    dy_ptr, dy2_ptr, dr_ptr, numel, C,
    RELU: tl.constexpr, WRITE_DY: tl.constexpr, HAS_BN2: tl.constexpr, WRITE_DR: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    c = offs % C
    g = tl.load(dz_ptr + offs, mask=ok, other=0.0).to(acc_ty)
    y = tl.load(y_ptr + offs, mask=ok, other=0.0).to(acc_ty)
    if RELU == 2:
        g = relu_grad(g, z_ptr, offs, ok, y, tl.load(ms_ptr + c, mask=ok),
                      tl.load(mh_ptr + c, mask=ok), RELU)
    else:
        g = relu_grad(g, z_ptr, offs, ok, y, 0.0, 0.0, RELU)
    if WRITE_DY:
        dy = tl.load(a_ptr + c, mask=ok) * g + tl.load(b_ptr + c, mask=ok) * y
        dy += tl.load(d_ptr + c, mask=ok)
        tl.store(dy_ptr + offs, dy.to(dy_ptr.dtype.element_ty), mask=ok)
    if HAS_BN2:
        y2 = tl.load(y2_ptr + offs, mask=ok, other=0.0).to(acc_ty)
        dy2 = tl.load(a2_ptr + c, mask=ok) * g + tl.load(b2_ptr + c, mask=ok) * y2
        dy2 += tl.load(d2_ptr + c, mask=ok)
        tl.store(dy2_ptr + offs, dy2.to(dy2_ptr.dtype.element_ty), mask=ok)
    if WRITE_DR:
        tl.store(dr_ptr + offs, g.to(dr_ptr.dtype.element_ty), mask=ok)


def bn_backward_coefficients(
    gamma: Tensor, mean: Tensor, rstd: Tensor, sum_g: Tensor, sum_gy: Tensor, n: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(a, b, d) with dy = a * g + b * y + d, the BN backward for batch statistics over n."""
    a = gamma.to(rstd.dtype) * rstd
    b = -a * rstd * sum_gy / n
    d = -a * sum_g / n - b * mean
    return a, b, d


def bn_act_bwd(
    dz: Tensor, z: ReluMask, y: Tensor, coeffs: tuple[Tensor, Tensor, Tensor], *,
    y2: Optional[Tensor] = None, coeffs2: Optional[tuple[Tensor, Tensor, Tensor]] = None,
    write_dr: bool = False, write_dy: bool = True,
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dy or None, dy2 or None, dr or None), channels_last in y's dtype; z is the ReluMask.
    write_dy=False skips dy (a conv backward computes it on load instead)."""
    dy = torch.empty_like(y, memory_format=torch.channels_last) if write_dy else None
    dy2 = torch.empty_like(y2, memory_format=torch.channels_last) if y2 is not None else None
    dr = torch.empty_like(y, memory_format=torch.channels_last) if write_dr else None
    numel = y.numel()
    if numel == 0 or (dy is None and dy2 is None and dr is None):
        return dy, dy2, dr
    c2 = coeffs2 if coeffs2 is not None else coeffs
    relu, z_arg, ms, mh = relu_mask_args(z, dz)
    _bn_act_bwd_kernel[(triton.cdiv(numel, BLOCK),)](
        dz, z_arg, ms, mh, y, *coeffs, y2 if y2 is not None else y, *c2,
        *(t if t is not None else dz for t in (dy, dy2, dr)), numel, y.shape[1],
        RELU=relu, WRITE_DY=write_dy, HAS_BN2=y2 is not None, WRITE_DR=write_dr,
        ACC_FP64=acc_dtype(y.dtype) == torch.float64, BLOCK=BLOCK,
    )
    return dy, dy2, dr
