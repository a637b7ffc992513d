"""NHWC implicit-GEMM convolution backward: data gradient and weight gradient.

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

wgrad (rows = C_out, columns = (r, s, c), reduction over the N*Ho*Wo output pixels, split
into `split` slices (`config.wgrad_split`) whose partial sums are added by fp32 atomics into
one zeroed dw, or, where a config is pinned (deterministic mode), written per slice and
added in a fixed order (`config.wgrad_atomic`); a program's columns are
BLOCK_N channels of one tap, or, for inputs with few channels (`config.flat_k`: the stem's 3),
BLOCK_N of the flattened (r, s, c) columns, so that 7x7x3 takes 3 column blocks of 64
instead of 49 blocks holding 3 channels each):
    dw[k, c, r, s] = sum_m dy[m, k] * pro(x[img(m), oh(m)*stride - pad + r,
                                            ow(m)*stride - pad + s, c])
  where pro is the forward's prologue (relu?(x * in_scale + in_shift), zero in the padding),
  recomputed on load instead of read from a saved activation.

Both can take dy as a `BnGrad` instead of a tensor: the BN backward is then applied to each
dy tile on load, dy = a[k] * g + b[k] * y + d[k] with g = dz * [z > 0], so dy is never
written. (a, b, d) come from the BN's statistics and backward sums (`eltwise.BnBackward`):
wgrad computes its rows' once per program; dgrad, whose loop steps over the output channels,
reads them from a (3, C_out) tensor computed by one small launch (computed in its loop they
cost ~70 more SASS instructions a step, sm_90 bf16 128x128x32, 2026-12-04). Worth
it where each dy element is loaded once (1x1 convs); a 3x3 dgrad reloads it for every tap.
"""

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fused_resnet.triton.config import (
    acc_dtype,
    cdiv,
    flat_k,
    input_precision,
    interpreting,
    wgrad_atomic,
    wgrad_split,
    wgrad_tiles,
)
from fused_resnet.triton.conv import (
    STAT_ROWS,
    autotune_conv,
    check_pixels,
    dense_in,
    dot_acc,
    prologue,
    to_nhwc,
)
from fused_resnet.triton.eltwise import (
    NO_RELU,
    RELU_FROM_BITS,
    BnBackward,
    ReluMask,
    bn_bwd_args,
    bn_bwd_coefficient_rows,
    bn_bwd_coefficients,
    relu_grad,
    relu_mask_args,
)
from fused_resnet.triton.launch import launch


class BnGrad(NamedTuple):
    """dy given implicitly: dy = a * (dz * [z > 0]) + b * y + d, per output channel, with z
    an `eltwise.ReluMask` and (a, b, d) those of the BnBackward bn. dz, y: (N, C_out, Ho, Wo)
    channels_last."""

    dz: Tensor
    z: ReluMask
    y: Tensor
    bn: BnBackward


@triton.jit
def _grad_tile(dy_ptr, z_ptr, y_ptr, offs, ok, a, b, d, ms, mh,
               BN_BWD: tl.constexpr, RELU: tl.constexpr, ACC_FP64: tl.constexpr,
               MASK: tl.constexpr):
    """The dy tile at offs: loaded, or with BN_BWD computed as a * g + b * y + d where
    g = dz * [z > 0] (a, b, d, ms, mh broadcast along the channel axis); zero where not ok,
    or without MASK (a select less per element) d there: for a caller whose entries not ok
    meet a zero in the other operand (a masked weight row, a masked x tile) or land in rows
    it does not store."""
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


@autotune_conv("BN_BWD", "REDUCE")
@triton.jit
def _conv_dgrad_kernel(
    dy_ptr, w_ptr, dx_ptr, z_ptr, ms_ptr, mh_ptr, y_ptr,
    coef_ptr, ry_ptr, r_scale_ptr, r_shift_ptr, r_mean_ptr, r_rstd_ptr,
    part_g_ptr, part_gy_ptr, res_ptr,
    num_groups, H, W, C_in, Ho, Wo, C_out, Hq, Wq, M, stride, padding,
    KH: tl.constexpr, KW: tl.constexpr, BN_BWD: tl.constexpr, RELU: tl.constexpr,
    REDUCE: tl.constexpr, HAS_RES: tl.constexpr, GROUP: tl.constexpr,
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
    r0 = (ph + padding) % stride
    s0 = (pw + padding) % stride
    # Taps of this phase: r = r0, r0 + stride, ... < KH (none where r0 >= KH); r0 < stride.
    taps_h = (KH - r0 + stride - 1) // stride
    taps_w = (KW - s0 + stride - 1) // stride
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_ty)
    # One loop over (r, s, C_out slice) of this phase, as the forward does (pipelining), the
    # slice k0 and the tap (i, j) advancing like an odometer (no division per step), and the
    # dy rows as the loop-invariant dy_base minus the tap's scalar offset (i * Wo + j) * C_out.
    oh0 = qh + (ph + padding - r0) // stride  # the output row of tap i is oh0 - i
    ow0 = qw + (pw + padding - s0) // stride
    dy_base = ((img * Ho + oh0) * Wo + ow0) * C_out  # int64
    i = 0
    j = 0
    k0 = 0
    for _step in range(0, taps_h * taps_w * tl.cdiv(C_out, BLOCK_K)):
        if KH * KW == 1:  # the one tap (i, j) = (0, 0): the row terms stay out of the loop
            ti: tl.constexpr = 0
            tj: tl.constexpr = 0
        else:
            ti = i
            tj = j
        oh = oh0 - ti
        ow = ow0 - tj
        row_ok = m_ok & (oh >= 0) & (oh < Ho) & (ow >= 0) & (ow < Wo)
        k = k0 + offs_k
        k_ok = k < C_out
        ca = tl.load(coef_ptr + k, mask=k_ok & BN_BWD, other=0.0)
        cb = tl.load(coef_ptr + C_out + k, mask=k_ok & BN_BWD, other=0.0)
        cd = tl.load(coef_ptr + 2 * C_out + k, mask=k_ok & BN_BWD, other=0.0)
        ms = tl.load(ms_ptr + k, mask=k_ok & (RELU == 2), other=0.0)[None, :]
        mh = tl.load(mh_ptr + k, mask=k_ok & (RELU == 2), other=0.0)[None, :]
        dy_row = dy_base - (ti * Wo + tj) * C_out
        a = _grad_tile(dy_ptr, z_ptr, y_ptr, dy_row[:, None] + k[None, :],
                       row_ok[:, None] & k_ok[None, :], ca[None, :], cb[None, :],
                       cd[None, :], ms, mh,
                       BN_BWD, RELU, ACC_FP64, KH * KW > 1)  # a 1x1 tap is in range
        krow = ((r0 + ti * stride) * KW + s0 + tj * stride) * C_out + k
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
        g = tl.where(out_ok & (yv * sc + sh > 0), dx.to(acc_ty), 0.0)
        G: tl.constexpr = BLOCK_M // GROUP
        sum_g = tl.sum(tl.reshape(g, (G, GROUP, BLOCK_N)), axis=1)
        sum_gy = tl.sum(tl.reshape(g * (yv - mean) * rstd, (G, GROUP, BLOCK_N)), axis=1)
        group = tl.program_id(0) * G + tl.arange(0, G)  # num_groups per phase
        part = (phase * num_groups + group)[:, None] * C_in + offs_n[None, :]
        part_ok = (group < num_groups)[:, None] & n_ok[None, :]
        tl.store(part_g_ptr + part, sum_g, mask=part_ok)
        tl.store(part_gy_ptr + part, sum_gy, mask=part_ok)


def _grad_args(dy, coefficient_rows: bool = False) -> tuple[tuple, dict]:
    """Kernel arguments (dy or dz, z, ms, mh, y, then the BN backward) and flags for a dy
    tensor or a BnGrad. The BN backward: (gamma, mean, rstd, sum_g, sum_gy, n), or with
    coefficient_rows the (3, C_out) rows (a, b, d)."""
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


class BnReduce(NamedTuple):
    """The BN + ReLU that produced the conv's input, relu(y * scale + shift): dgrad then also
    returns its backward sums (sum g, sum g * yhat). y: the input's shape, channels_last;
    scale, shift, mean, rstd: (C_in,)."""

    y: Tensor
    scale: Tensor
    shift: Tensor
    mean: Tensor
    rstd: Tensor


def conv_dgrad(dy, weight: Tensor, x_shape: torch.Size, *, stride: int, padding: int,
               reduce: Optional[BnReduce] = None, residual: Optional[Tensor] = None):
    """dx (N, C_in, H, W) channels_last in dy's dtype, for dy (N, C_out, Ho, Wo) given as a
    tensor or a BnGrad (weight in any float dtype: cast while laid out); plus `residual`
    (x's shape: the gradient reaching x by another path, a shortcut's) added in fp32 before
    dx is rounded, so that no separate pass adds it; with `reduce`, (dx, (sum g,
    sum g * yhat)) for that BN, of the dx written."""
    if residual is not None and tuple(residual.shape) != tuple(x_shape):
        raise ValueError(f"conv_dgrad: residual must have x's shape {tuple(x_shape)}, got "
                         f"{tuple(residual.shape)}")
    grad, flags = _grad_args(dy, coefficient_rows=True)
    dy = grad[0]
    n, c_in, h, w = x_shape
    c_out, _, kh, kw = weight.shape
    ho, wo = dy.shape[2], dy.shape[3]
    check_pixels(x_shape, (ho, wo))
    dx = torch.empty((n, c_in, h, w), device=dy.device, dtype=dy.dtype,
                     memory_format=torch.channels_last)
    hq, wq = cdiv(h, stride), cdiv(w, stride)  # pixel slots per phase
    m = n * hq * wq
    w_t = dense_in(weight.permute(2, 3, 0, 1), dy.dtype).reshape(-1, c_in)  # (kh*kw*C_out, C_in)
    grid = lambda meta: (  # noqa: E731
        cdiv(m, meta["BLOCK_M"]), cdiv(c_in, meta["BLOCK_N"]), stride * stride)
    acc = acc_dtype(dy.dtype)
    groups = cdiv(m, STAT_ROWS)  # per phase
    parts = [torch.empty((stride * stride * groups, c_in), device=dy.device, dtype=acc)
             for _ in range(2)]
    r_args = (to_nhwc(reduce.y), *reduce[1:]) if reduce is not None else (dx,) * 5
    res = to_nhwc(residual) if residual is not None else dx  # any float dtype: read as fp32
    launch(
        _conv_dgrad_kernel, grid, dy, w_t, dx, *grad[1:], *r_args, *parts, res, groups,
        h, w, c_in, ho, wo, c_out, hq, wq, m, stride, padding, KH=kh, KW=kw, **flags,
        REDUCE=reduce is not None, HAS_RES=residual is not None, GROUP=STAT_ROWS,
        UPCAST=dy.dtype == torch.bfloat16 and interpreting(), ACC_FP64=acc == torch.float64,
        PRECISION=input_precision(dy.dtype),
    )
    if reduce is None:
        return dx
    return dx, (parts[0].sum(0), parts[1].sum(0))  # fixed-order sum of the group partials


@autotune_conv("PROLOGUE", "BN_BWD", reset_to_zero=("dw_ptr",))
@triton.jit
def _conv_wgrad_kernel(
    x_ptr, dy_ptr, dw_ptr, in_scale_ptr, in_shift_ptr, z_ptr, ms_ptr, mh_ptr, y_ptr,
    gamma_ptr, mean_ptr, rstd_ptr, sum_g_ptr, sum_gy_ptr, bn_n,
    H, W, C_in, Ho, Wo, C_out, M, stride, padding, rows_per_split,
    KH: tl.constexpr, KW: tl.constexpr, FLAT: tl.constexpr,
    PROLOGUE: tl.constexpr, PROLOGUE_RELU: tl.constexpr, BN_BWD: tl.constexpr,
    RELU: tl.constexpr, PADDED: tl.constexpr, UPCAST: tl.constexpr, ACC_FP64: tl.constexpr,
    PRECISION: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Tile: BLOCK_M output channels x BLOCK_N columns, the input channels offs_c of one tap
    # (r, s scalars), or with FLAT the flattened columns (r, s, offs_c) = col -> (col // C_in
    # // KW, col // C_in % KW, col % C_in) (r, s rows of a (1, BLOCK_N) tile); the reduction
    # runs over BLOCK_K output pixels at a time within this program's split.
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    if FLAT:
        col = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        c_ok = col < KH * KW * C_in
        offs_c = col % C_in
        r = (col // C_in // KW)[None, :]
        s = (col // C_in % KW)[None, :]
    else:
        c_blocks = tl.cdiv(C_in, BLOCK_N)
        tap = tl.program_id(1) // c_blocks
        r = tap // KW
        s = tap % KW
        offs_c = (tl.program_id(1) % c_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        c_ok = offs_c < C_in
        col = tap * C_in + offs_c
    if PROLOGUE:
        sc = tl.load(in_scale_ptr + offs_c, mask=c_ok, other=0.0)[None, :]
        sh = tl.load(in_shift_ptr + offs_c, mask=c_ok, other=0.0)[None, :]
    offs_co = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    co_ok = offs_co < C_out
    ca, cb, cd = bn_bwd_coefficients(gamma_ptr, mean_ptr, rstd_ptr, sum_g_ptr, sum_gy_ptr,
                                     bn_n, offs_co, co_ok & BN_BWD, acc_ty)
    ms = tl.load(ms_ptr + offs_co, mask=co_ok & (RELU == 2), other=0.0)[:, None]
    mh = tl.load(mh_ptr + offs_co, mask=co_ok & (RELU == 2), other=0.0)[:, None]
    split = tl.program_id(2)
    start = split * rows_per_split
    stop = tl.minimum(start + rows_per_split, M)
    # The lanes' output pixels m = m0 + lane as (img, oh, ow): divided once here (int32, M <
    # 2^31), then advanced by BLOCK_K = step_img * Ho*Wo + step_h * Wo + step_w per step like
    # an odometer (each digit wraps at most once). Dividing in the loop, as this kernel first
    # did, cost four calls of a 64-bit division routine per step: ~620 SASS instructions per
    # warp and step against 178 after, 162 with the int32 pixel index below, for the same two
    # wgmma (sm_90, bf16, 128x128x32 w8).
    lanes = start + tl.arange(0, BLOCK_K)
    ow = lanes % Wo
    oh = (lanes // Wo) % Ho
    img = lanes // (Wo * Ho)
    step_w = BLOCK_K % Wo
    step_h = (BLOCK_K // Wo) % Ho
    step_img = BLOCK_K // (Wo * Ho)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_ty)
    # Pixels past this split's end hold real data of the next split: one of the two tiles
    # must be zero there. The x tile is (loaded as zero) unless an unmasked prologue makes
    # relu?(sh) of it; only then is the dy tile masked too.
    X_MASKED: tl.constexpr = (not PROLOGUE) or PADDED or FLAT
    for m0 in range(start, stop, BLOCK_K):
        offs_m = m0 + tl.arange(0, BLOCK_K)
        m_ok = offs_m < stop
        ih = oh[:, None] * stride - padding + r  # (BLOCK_K, 1), or (BLOCK_K, BLOCK_N) if FLAT
        iw = ow[:, None] * stride - padding + s
        dy_t = _grad_tile(dy_ptr, z_ptr, y_ptr,
                          offs_m.to(tl.int64)[None, :] * C_out + offs_co[:, None],
                          co_ok[:, None] & m_ok[None, :], ca[:, None], cb[:, None],
                          cd[:, None], ms, mh,
                          BN_BWD, RELU, ACC_FP64, not X_MASKED)
        x_ok = m_ok[:, None] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & c_ok[None, :]
        # the input pixel in int32 (N*H*W < 2^31, `check_pixels`; wrong only where masked),
        # widened once for the element offset
        x_pix = (img[:, None] * H + ih) * W + iw
        xa = tl.load(x_ptr + x_pix.to(tl.int64) * C_in + offs_c[None, :], mask=x_ok, other=0.0)
        if PROLOGUE:
            xa = prologue(xa, x_ok, sc, sh, PROLOGUE_RELU, acc_ty, X_MASKED)
        acc = dot_acc(dy_t, xa, acc, UPCAST, PRECISION)
        ow += step_w
        wrap_w = ow >= Wo
        ow = tl.where(wrap_w, ow - Wo, ow)
        oh += step_h + wrap_w.to(tl.int32)
        wrap_h = oh >= Ho
        oh = tl.where(wrap_h, oh - Ho, oh)
        img += step_img + wrap_h.to(tl.int32)
    # dw layout: (C_out, KH * KW * C_in), the columns in (r, s, c) order; ATOMIC adds the
    # slice's sum into it (relaxed: no ordering with other memory is needed, the launch's
    # end orders it for the next kernel), else one such matrix per slice: (split, C_out, ...)
    out = offs_co[:, None] * (KH * KW * C_in) + col[None, :]
    out_ok = co_ok[:, None] & c_ok[None, :]
    if ATOMIC:
        tl.atomic_add(dw_ptr + out, acc, mask=out_ok, sem="relaxed")
    else:
        tl.store(dw_ptr + split.to(tl.int64) * C_out * KH * KW * C_in + out, acc, mask=out_ok)


def conv_wgrad(
    x: Tensor, dy, weight_shape: torch.Size, *, stride: int, padding: int,
    in_scale: Optional[Tensor] = None, in_shift: Optional[Tensor] = None, in_relu: bool = False,
    split: Optional[int] = None, atomic: Optional[bool] = None,
) -> Tensor:
    """dw (C_out, C_in, kh, kw) in the accumulator dtype (fp32, fp64 for fp64 inputs), for
    dy (N, C_out, Ho, Wo) given as a tensor or a BnGrad. `split` slices of the pixels
    (default `config.wgrad_split`), added by atomics or in a fixed order (`atomic`, default
    `config.wgrad_atomic`; one slice writes dw itself)."""
    grad, flags = _grad_args(dy)
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight_shape
    ho, wo = grad[0].shape[2], grad[0].shape[3]
    m = n * ho * wo
    check_pixels(x.shape, (ho, wo))
    acc = acc_dtype(x.dtype)
    if split is None:
        split = wgrad_split(m, wgrad_tiles(c_out, c_in, kh, kw))
    rows_per_split = cdiv(m, split)
    atomic = split > 1 and (wgrad_atomic(split) if atomic is None else atomic)
    parts = torch.zeros((c_out, kh, kw, c_in), device=x.device, dtype=acc) if atomic \
        else torch.empty((split, c_out, kh, kw, c_in), device=x.device, dtype=acc)
    flat = flat_k(c_in)
    grid = lambda meta: (  # noqa: E731
        cdiv(c_out, meta["BLOCK_M"]),
        cdiv(kh * kw * c_in, meta["BLOCK_N"]) if flat
        else kh * kw * cdiv(c_in, meta["BLOCK_N"]), split)
    launch(
        _conv_wgrad_kernel, grid, to_nhwc(x), grad[0], parts,
        in_scale if in_scale is not None else parts, in_shift if in_shift is not None else parts,
        *grad[1:], h, w, c_in, ho, wo, c_out, m, stride, padding, rows_per_split,
        KH=kh, KW=kw, FLAT=flat, PROLOGUE=in_scale is not None, PROLOGUE_RELU=in_relu, **flags,
        PADDED=padding > 0,
        UPCAST=x.dtype == torch.bfloat16 and interpreting(), ACC_FP64=acc == torch.float64,
        PRECISION=input_precision(x.dtype), ATOMIC=atomic,
    )
    dw = parts if atomic else parts[0] if split == 1 else parts.sum(0)  # fixed order
    return dw.permute(0, 3, 1, 2)
