"""NHWC implicit-GEMM convolution backward: the data gradient here, the weight gradient in
`conv_wgrad`; the dy operand both take (a tensor, or a form of it computed on load) in
`grad_tile`. The public names of both modules are re-exported here.

dgrad (a transposed implicit GEMM; rows = input pixels, columns = C_in, K = taps*C_out):
    dx[img, h, w, c] = sum_{r, s, k} dy[img, (h + pad - r) / stride, (w + pad - s) / stride, k]
                                     * w[k, c, r, s]
  over the taps where h + pad - r (and w + pad - s) is a non-negative multiple of the stride
  that lands inside the output. Which taps those are depends only on the pixel's phase
  (h % stride, w % stride): the r with r mod stride = (h + pad) mod stride.
  So the rows are split by phase (grid axis 2, stride^2 phases; phase (ph, pw) holds the
  pixels (q_h * stride + ph, q_w * stride + pw)) and each program visits only its phase's
  taps: a 3x3 stride-2 dgrad does 9/4 taps per pixel on average instead of 9 with 3/4 of
  them masked to zero, a 1x1 stride-2 one a single tap for a quarter of the pixels and
  none (dx = 0) for the rest. For a pixel of phase ph, at tap r = r0 + j * stride with
  r0 = (ph + pad) % stride, the output row is exact integer arithmetic:
      oh = q_h + (ph + pad - r0) / stride - j.
  Dilated by dil (the constexpr DIL > 1): dx[.., h, ..] takes the taps r with h + pad - r*dil
  a multiple of the stride. With g = gcd(dil, stride), those of phase ph are r = r0 + j *
  tap_step, tap_step = stride / g, r0 the one r in [0, tap_step) with r * dil = ph + pad
  (mod stride) if there is one (else none: dx = 0 in that phase), at the output rows
      oh = q_h + (ph + pad - r0 * dil) / stride - j * oh_step,  oh_step = dil / g
  (for dil = 1: tap_step = stride, oh_step = 1, r0 = (ph + pad) mod stride, as above).
"""

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fused_resnet.triton.autotune import autotune_conv
from fused_resnet.triton.config import acc_dtype, cdiv, input_precision, interpreting
from fused_resnet.triton.conv import (
    STAT_ROWS,
    check_pixels,
    dot_acc,
    k_steps,
    kernel_dilation,
    to_nhwc,
)
from fused_resnet.triton.conv_wgrad import _conv_wgrad_kernel, conv_wgrad
from fused_resnet.triton.eltwise import relu
from fused_resnet.triton.gemm_layout import dense_in
from fused_resnet.triton.grad_tile import Activated, BnGrad, Subsampled, _grad_args, _grad_tile
from fused_resnet.triton.launch import launch

__all__ = ["Activated", "BnGrad", "BnReduce", "Subsampled", "_conv_dgrad_kernel",
           "_conv_wgrad_kernel", "conv_dgrad", "conv_wgrad"]


@autotune_conv("BN_BWD", "REDUCE", "REDUCE_ACT")
@triton.jit
def _conv_dgrad_kernel(
    dy_ptr, w_ptr, dx_ptr, z_ptr, ms_ptr, mh_ptr, y_ptr,
    coef_ptr, ry_ptr, r_scale_ptr, r_shift_ptr, r_mean_ptr, r_rstd_ptr,
    part_g_ptr, part_gy_ptr, part_a_ptr, res_ptr, tap_ptr,
    num_groups, H, W, C_in, Ho, Wo, C_out, Hq, Wq, M, stride, padding, tap_step, oh_step,
    KH: tl.constexpr, KW: tl.constexpr, DIL: tl.constexpr, BN_BWD: tl.constexpr,
    RELU: tl.constexpr,
    REDUCE: tl.constexpr, REDUCE_ACT: tl.constexpr, HAS_RES: tl.constexpr,
    TAP_RES: tl.constexpr, EVERY_PHASE_TAPPED: tl.constexpr, GROUP: tl.constexpr,
    UPCAST: tl.constexpr, ACC_FP64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Rows: the M = N * Hq * Wq pixel slots (img, q_h, q_w) of phase (ph, pw); a slot is the
    # pixel (q_h * stride + ph, q_w * stride + pw), absent where that falls outside H x W.
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    phase = tl.program_id(2)
    ph = phase // stride
    pw = phase % stride
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < C_in
    qw = offs_m % Wq  # int32 division (M < 2^31); 64-bit division is a slow subroutine
    qh = (offs_m // Wq) % Hq
    img = (offs_m // (Wq * Hq)).to(tl.int64)  # N*H*W*C may exceed 2^31
    ih = qh * stride + ph
    iw = qw * stride + pw
    m_ok = (offs_m < M) & (ih < H) & (iw < W)
    if DIL == 1:
        r0 = (ph + padding) % stride
        s0 = (pw + padding) % stride
        step = stride
        out_step: tl.constexpr = 1
    else:  # r0: the r in [0, tap_step) with (ph + pad - r * DIL) % stride == 0, else KH
        r0 = ph * 0 + KH
        s0 = pw * 0 + KW
        for t in range(0, tap_step):
            r0 = tl.where((r0 == KH) & ((ph + padding - t * DIL) % stride == 0), t, r0)
            s0 = tl.where((s0 == KW) & ((pw + padding - t * DIL) % stride == 0), t, s0)
        step = tap_step
        out_step = oh_step
    # Taps of this phase: r = r0, r0 + step, ... < KH (none where r0 >= KH); r0 < step.
    taps_h = (KH - r0 + step - 1) // step
    taps_w = (KW - s0 + step - 1) // step
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_ty)
    # One loop over (r, s, C_out slice) of this phase, as the forward does (pipelining), the
    # slice k0 and the tap (i, j) advancing like an odometer (no division per step), and the
    # dy rows as the loop-invariant dy_base minus the tap's scalar offset (i * Wo + j) * C_out
    # (times out_step). Where the phase has no tap, oh0 is not an output row and is not read.
    oh0 = qh + (ph + padding - r0 * DIL) // stride  # the output row of tap i: oh0 - i * out_step
    ow0 = qw + (pw + padding - s0 * DIL) // stride
    dy_base = ((img * Ho + oh0) * Wo + ow0) * C_out  # int64
    i = 0
    j = 0
    k0 = 0
    steps = taps_h * taps_w * tl.cdiv(C_out, BLOCK_K)
    if EVERY_PHASE_TAPPED:  # no phase runs 0 steps: let the compiler know it (k_steps)
        steps = k_steps(steps)
    for _step in range(0, steps):
        if KH * KW == 1:  # the one tap (i, j) = (0, 0): the row terms stay out of the loop
            ti: tl.constexpr = 0
            tj: tl.constexpr = 0
        else:
            ti = i
            tj = j
        oh = oh0 - ti * out_step
        ow = ow0 - tj * out_step
        row_ok = m_ok & (oh >= 0) & (oh < Ho) & (ow >= 0) & (ow < Wo)
        k = k0 + offs_k
        k_ok = k < C_out
        ca = tl.load(coef_ptr + k, mask=k_ok & BN_BWD, other=0.0)
        cb = tl.load(coef_ptr + C_out + k, mask=k_ok & BN_BWD, other=0.0)
        cd = tl.load(coef_ptr + 2 * C_out + k, mask=k_ok & BN_BWD, other=0.0)
        ms = tl.load(ms_ptr + k, mask=k_ok & (RELU == 2), other=0.0)[None, :]
        mh = tl.load(mh_ptr + k, mask=k_ok & (RELU == 2), other=0.0)[None, :]
        dy_row = dy_base - (ti * Wo + tj) * out_step * C_out
        a = _grad_tile(dy_ptr, z_ptr, y_ptr, dy_row[:, None] + k[None, :],
                       row_ok[:, None] & k_ok[None, :], ca[None, :], cb[None, :],
                       cd[None, :], ms, mh,
                       BN_BWD, RELU, ACC_FP64, KH * KW > 1, False)  # a 1x1 tap is in range
        krow = ((r0 + ti * step) * KW + s0 + tj * step) * C_out + k
        b = tl.load(w_ptr + krow[:, None] * C_in + offs_n[None, :],
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = dot_acc(a, b, acc, UPCAST, PRECISION)
        k0 += BLOCK_K
        wrap = k0 >= C_out
        k0 = tl.where(wrap, 0, k0)
        j += wrap.to(tl.int32)
        wrap = j >= taps_w
        j = tl.where(wrap, 0, j)
        i += wrap.to(tl.int32)
    out = (((img * H + ih) * W + iw) * C_in)[:, None] + offs_n[None, :]
    out_ok = m_ok[:, None] & n_ok[None, :]
    if HAS_RES:  # dx = the conv's input gradient + another path's (a shortcut's), at x
        acc += tl.load(res_ptr + out, mask=out_ok, other=0.0).to(acc_ty)
    if TAP_RES:  # 1x1, no padding: t (dy's pixels, C_in) added at the pixels with a tap,
        # dx[:, :, ::stride, ::stride] += t (phase (0, 0); the other phases have no tap)
        tap_ok = m_ok & (taps_h * taps_w > 0) & (oh0 < Ho) & (ow0 < Wo)
        tap_pix = (img * Ho + oh0) * Wo + ow0  # int64: the dy pixel of tap (0, 0)
        acc += tl.load(tap_ptr + tap_pix[:, None] * C_in + offs_n[None, :],
                       mask=tap_ok[:, None] & n_ok[None, :], other=0.0).to(acc_ty)
    dx = acc.to(dx_ptr.dtype.element_ty)
    tl.store(dx_ptr + out, dx, mask=out_ok)
    if REDUCE:
        # dx is the gradient at relu(bn(y)) of the previous layer: per group of GROUP rows,
        # sum g and sum g * yhat with g = dx * [y * scale + shift > 0], yhat = (y - mean) * rstd.
        yv = tl.load(ry_ptr + out, mask=out_ok, other=0.0).to(acc_ty)
        sc = tl.load(r_scale_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        sh = tl.load(r_shift_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        mean = tl.load(r_mean_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        rstd = tl.load(r_rstd_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        v = yv * sc + sh  # as relu_grad: only v <= 0 zeroes dx (a NaN v lets it through)
        g = tl.where(out_ok, tl.where(v <= 0, 0.0, dx.to(acc_ty)), 0.0)
        G: tl.constexpr = BLOCK_M // GROUP
        sum_g = tl.sum(tl.reshape(g, (G, GROUP, BLOCK_N)), axis=1)
        sum_gy = tl.sum(tl.reshape(g * (yv - mean) * rstd, (G, GROUP, BLOCK_N)), axis=1)
        group = tl.program_id(0) * G + tl.arange(0, G)  # num_groups per phase
        part = (phase * num_groups + group)[:, None] * C_in + offs_n[None, :]
        part_ok = (group < num_groups)[:, None] & n_ok[None, :]
        tl.store(part_g_ptr + part, sum_g, mask=part_ok)
        tl.store(part_gy_ptr + part, sum_gy, mask=part_ok)
        if REDUCE_ACT:  # and sum relu(y * scale + shift), rounded as the prologue rounds it
            act = tl.where(out_ok, relu(v), 0.0)  # (relu keeps NaN, as torch.relu)
            act = act.to(ry_ptr.dtype.element_ty).to(acc_ty)
            tl.store(part_a_ptr + part, tl.sum(tl.reshape(act, (G, GROUP, BLOCK_N)), axis=1),
                     mask=part_ok)


class BnReduce(NamedTuple):
    """The BN + ReLU that produced the conv's input, relu(y * scale + shift): dgrad then also
    returns its backward sums (sum g, sum g * yhat). y: the input's shape, channels_last;
    scale, shift, mean, rstd: (C_in,)."""

    y: Tensor
    scale: Tensor
    shift: Tensor
    mean: Tensor
    rstd: Tensor


def every_phase_tapped(kh: int, kw: int, dilation: int, stride: int) -> bool:
    """Whether every stride phase of the dgrad takes a tap, in rows and in columns. The taps
    of phase ph are the r < k with r * dilation = ph + padding (mod stride): r * dilation
    covers min(k, stride) residues when gcd(dilation, stride) = 1, and only multiples of
    that gcd otherwise, whatever the padding. Where a phase has none (a 1x1 conv's 3 of 4 at
    stride 2) it runs 0 steps, and its loop is left as it was: `k_steps` would make it run
    one step of zeros, 5-19% more MMA work in ResNet-50's strided projections, whose loops
    ptxas keeps in flight as they are (they apply no BN backward on load)."""
    return math.gcd(dilation, stride) == 1 and min(kh, kw) >= stride


def conv_dgrad(dy, weight: Tensor, x_shape: torch.Size, *, stride: int, padding: int,
               dilation: int = 1, reduce: Optional[BnReduce] = None,
               residual: Optional[Tensor] = None,
               reduce_act: bool = False, tap_residual: Optional[Tensor] = None):
    """dx (N, C_in, H, W) channels_last in dy's dtype, for dy (N, C_out, Ho, Wo) given as a
    tensor or a BnGrad (weight in any float dtype: cast while laid out); plus `residual`
    (x's shape: the gradient reaching x by another path, a shortcut's) added in fp32 before
    dx is rounded, so that no separate pass adds it; with `reduce`, (dx, (sum g,
    sum g * yhat)) for that BN, of the dx written, and with `reduce_act` a third sum, of the
    activation relu(y * scale + shift) itself (per channel, as the prologue rounds it).
    `tap_residual` (1x1 convs without padding; (N, C_in, Ho, Wo), dy's pixels): added where
    the conv's taps land, dx[:, :, ::stride, ::stride] += tap_residual, in the same fp32
    sum. `dilation`: the spacing of the conv's taps, as torch's conv2d takes it."""
    if reduce_act and reduce is None:
        raise ValueError("conv_dgrad: reduce_act needs reduce")
    if residual is not None and tuple(residual.shape) != tuple(x_shape):
        raise ValueError(f"conv_dgrad: residual must have x's shape {tuple(x_shape)}, got "
                         f"{tuple(residual.shape)}")
    grad, flags = _grad_args(dy, coefficient_rows=True)
    dy = grad[0]
    n, c_in, h, w = x_shape
    c_out, _, kh, kw = weight.shape
    ho, wo = dy.shape[2], dy.shape[3]
    check_pixels(x_shape, (ho, wo))
    if tap_residual is not None:
        if (kh, kw, padding) != (1, 1, 0):
            raise ValueError(f"conv_dgrad: tap_residual needs a 1x1 conv without padding, got "
                             f"{kh}x{kw} with padding {padding}")
        if tuple(tap_residual.shape) != (n, c_in, ho, wo):
            raise ValueError(f"conv_dgrad: tap_residual must have shape {(n, c_in, ho, wo)} "
                             f"(dy's pixels, x's channels), got {tuple(tap_residual.shape)}")
    dx = torch.empty((n, c_in, h, w), device=dy.device, dtype=dy.dtype,
                     memory_format=torch.channels_last)
    hq, wq = cdiv(h, stride), cdiv(w, stride)  # pixel slots per phase
    dil = kernel_dilation(dilation, kh, kw)
    g = math.gcd(dil, stride)
    m = n * hq * wq
    w_t = dense_in(weight.permute(2, 3, 0, 1), dy.dtype).reshape(-1, c_in)  # (kh*kw*C_out, C_in)
    grid = lambda meta: (  # noqa: E731
        cdiv(m, meta["BLOCK_M"]), cdiv(c_in, meta["BLOCK_N"]), stride * stride)
    acc = acc_dtype(dy.dtype)
    groups = cdiv(m, STAT_ROWS)  # per phase
    parts = [torch.empty((stride * stride * groups, c_in), device=dy.device, dtype=acc)
             for _ in range(3 if reduce_act else 2)]
    r_args = (to_nhwc(reduce.y), *reduce[1:]) if reduce is not None else (dx,) * 5
    res = to_nhwc(residual) if residual is not None else dx  # any float dtype: read as fp32
    tap = to_nhwc(tap_residual) if tap_residual is not None else dx
    launch(
        _conv_dgrad_kernel, grid, dy, w_t, dx, *grad[1:], *r_args, *parts[:2], parts[-1], res,
        tap,
        groups, h, w, c_in, ho, wo, c_out, hq, wq, m, stride, padding, stride // g, dil // g,
        KH=kh, KW=kw, DIL=dil, **flags,
        REDUCE=reduce is not None, REDUCE_ACT=reduce_act, HAS_RES=residual is not None,
        TAP_RES=tap_residual is not None,
        EVERY_PHASE_TAPPED=every_phase_tapped(kh, kw, dil, stride), GROUP=STAT_ROWS,
        UPCAST=dy.dtype == torch.bfloat16 and interpreting(), ACC_FP64=acc == torch.float64,
        PRECISION=input_precision(dy.dtype),
    )
    if reduce is None:
        return dx
    return dx, tuple(p.sum(0) for p in parts)  # fixed-order sum of the group partials
