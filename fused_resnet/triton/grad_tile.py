"""The dy operand of the backward convs (`conv_bwd.conv_dgrad`, `conv_wgrad.conv_wgrad`): a
tensor, or a form of it computed on load, tile by tile, so that it is never written.

Both take dy as a `BnGrad` instead of a tensor: the BN backward is then applied to each
dy tile on load, dy = a[k] * g + b[k] * y + d[k] with g = dz * [z > 0], so dy is never
written. (a, b, d) come from the BN's statistics and backward sums (`eltwise.BnBackward`):
wgrad computes its rows' once per program; dgrad, whose loop steps over the output channels,
reads them from a (3, C_out) tensor computed by one small launch (computed in its loop they
cost ~70 more SASS instructions a step, sm_90 bf16 128x128x32, 2026-12-04). Worth
it where each dy element is loaded once (1x1 convs); a 3x3 dgrad reloads it for every tap.

wgrad also takes dy as an `Activated`: relu(y * scale + shift) of a BN's input (the Gram
matrix of an activation, which a bottleneck's last BN backward needs), or as a `Subsampled`:
its own input x read at the conv's stride (the Gram matrix of a strided 1x1 conv's input,
which a projection's BN backward needs), addressed as the x tile is, so x_s is not copied.
"""

from typing import NamedTuple

import triton
import triton.language as tl
from torch import Tensor

from fused_resnet.triton.conv import to_nhwc
from fused_resnet.triton.eltwise import (
    NO_RELU,
    RELU_FROM_BITS,
    BnBackward,
    ReluMask,
    bn_bwd_args,
    bn_bwd_coefficient_rows,
    relu,
    relu_grad,
    relu_mask_args,
)


class BnGrad(NamedTuple):
    """dy given implicitly: dy = a * (dz * [z > 0]) + b * y + d, per output channel, with z
    an `eltwise.ReluMask` and (a, b, d) those of the BnBackward bn. dz, y: (N, C_out, Ho, Wo)
    channels_last."""

    dz: Tensor
    z: ReluMask
    y: Tensor
    bn: BnBackward


class Activated(NamedTuple):
    """wgrad's dy given as relu(y * scale + shift) of a BN's input y, computed on load (a
    Gram matrix of the activation, `conv_wgrad(x, Activated(x, ...), ..., in_scale=...)`).
    y: (N, C, H, W) channels_last; scale, shift: (C,)."""

    y: Tensor
    scale: Tensor
    shift: Tensor


class Subsampled(NamedTuple):
    """wgrad's dy read at the conv's stride from a tensor of the input's shape, dy[img, oh,
    ow] = x[img, oh * stride, ow * stride] (no padding), addressed as the input tile is:
    `conv_wgrad(x, Subsampled(x), ...)` is the Gram matrix x_s^T x_s of a 1x1 conv's strided
    input, without x_s copied. x: (N, C, H, W)."""

    x: Tensor


@triton.jit
def _grad_tile(dy_ptr, z_ptr, y_ptr, offs, ok, a, b, d, ms, mh,
               BN_BWD: tl.constexpr, RELU: tl.constexpr, ACC_FP64: tl.constexpr,
               MASK: tl.constexpr, ACT: tl.constexpr):
    """The dy tile at offs: loaded, or with BN_BWD computed as a * g + b * y + d where
    g = dz * [z > 0] (a, b, d, ms, mh broadcast along the channel axis); zero where not ok,
    or without MASK (a select less per element) d there: for a caller whose entries not ok
    meet a zero in the other operand (a masked weight row, a masked x tile) or land in rows
    it does not store. With ACT (`Activated`): relu(dy * ms + mh), zero where not ok."""
    if ACT:
        acc_ty = tl.float64 if ACC_FP64 else tl.float32
        v = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(acc_ty) * ms + mh
        return tl.where(ok, relu(v), 0.0).to(dy_ptr.dtype.element_ty)  # NaN kept
    if BN_BWD:
        acc_ty = tl.float64 if ACC_FP64 else tl.float32
        g = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(acc_ty)
        y = tl.load(y_ptr + offs, mask=ok, other=0.0).to(acc_ty)
        g = relu_grad(g, z_ptr, offs, ok, y, ms, mh, RELU)
        v = a * g + b * y + d
        if MASK:
            v = tl.where(ok, v, 0.0)
        return v.to(dy_ptr.dtype.element_ty)
    else:
        return tl.load(dy_ptr + offs, mask=ok, other=0.0)


def _grad_args(dy, coefficient_rows: bool = False) -> tuple[tuple, dict]:
    """Kernel arguments (dy or dz, z, ms, mh, y, then the BN backward) and flags for a dy
    tensor, a BnGrad or (wgrad only: not with coefficient_rows) an Activated or a Subsampled. The BN
    backward: (gamma, mean, rstd, sum_g, sum_gy, n), or with coefficient_rows the (3, C_out)
    rows (a, b, d)."""
    if isinstance(dy, Subsampled):
        if coefficient_rows:
            raise ValueError("conv_dgrad takes dy as a tensor or a BnGrad, not a Subsampled")
        x = to_nhwc(dy.x)
        return ((x,) * 5 + bn_bwd_args(None, x),
                {"BN_BWD": False, "RELU": NO_RELU, "ACT": False, "SUB": True})
    if isinstance(dy, Activated):
        if coefficient_rows:
            raise ValueError("conv_dgrad takes dy as a tensor or a BnGrad, not an Activated")
        y = to_nhwc(dy.y)
        return ((y, y, dy.scale, dy.shift, y, *bn_bwd_args(None, y)),
                {"BN_BWD": False, "RELU": NO_RELU, "ACT": True})
    if isinstance(dy, BnGrad):
        dz = to_nhwc(dy.dz)
        relu, z, ms, mh = relu_mask_args(dy.z, dz)
        if relu == RELU_FROM_BITS:
            raise ValueError("BnGrad.z: the conv loops take the ReLU mask as z or (scale, "
                             "shift), not packed bits (write g = dz * [z > 0] first)")
        bn = (bn_bwd_coefficient_rows(dy.bn),) if coefficient_rows else bn_bwd_args(dy.bn, dz)
        return (dz, z, ms, mh, to_nhwc(dy.y), *bn), {"BN_BWD": True, "RELU": relu}
    dy = to_nhwc(dy)
    unused = (dy,) if coefficient_rows else bn_bwd_args(None, dy)
    return (dy,) * 5 + unused, {"BN_BWD": False, "RELU": NO_RELU}
