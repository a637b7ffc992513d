"""NHWC implicit-GEMM convolution weight gradient (the data gradient: `conv_bwd`).

wgrad (rows = C_out, columns = (r, s, c), reduction over the N*Ho*Wo output pixels, split
into `split` slices (`config.wgrad_split`) whose partial sums are added by fp32 atomics into
one zeroed dw, or, where a config is pinned (deterministic mode), written per slice and
added in a fixed order (`config.wgrad_atomic`); a program's columns are
BLOCK_N channels of one tap, or, for inputs with few channels (`config.flat_k`: the stem's 3),
BLOCK_N of the flattened (r, s, c) columns, so that 7x7x3 takes 3 column blocks of 64
instead of 49 blocks holding 3 channels each):
    dw[k, c, r, s] = sum_m dy[m, k] * pro(x[img(m), oh(m)*stride - pad + r*dil,
                                            ow(m)*stride - pad + s*dil, c])
  where pro is the forward's prologue (relu?(x * in_scale + in_shift), zero in the padding),
  recomputed on load instead of read from a saved activation; dy a tensor or computed on
  load (`grad_tile`: a BnGrad, an Activated). With the prologue a program computes its tile
  transposed, pro(x)^T dy, so that the operand it transforms is wgmma's register operand
  (`XT` in the kernel); so does the stem's, whose gathered x tile stays in registers too
  (GATHER_IN_REGS, sm_90).
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fused_resnet.triton.autotune import autotune_conv
from fused_resnet.triton.config import (
    acc_dtype,
    cdiv,
    flat_k,
    gather_in_registers,
    input_precision,
    interpreting,
    wgrad_atomic,
    wgrad_split,
    wgrad_tiles,
)
from fused_resnet.triton.conv import (
    check_pixels,
    dot_acc,
    k_steps,
    kernel_dilation,
    prologue,
    to_nhwc,
)
from fused_resnet.triton.eltwise import bn_bwd_coefficients
from fused_resnet.triton.grad_tile import _grad_args, _grad_tile
from fused_resnet.triton.launch import launch


@autotune_conv("PROLOGUE", "BN_BWD", "ACT", "SUB", reset_to_zero=("dw_ptr",))
@triton.jit
def _conv_wgrad_kernel(
    x_ptr, dy_ptr, dw_ptr, in_scale_ptr, in_shift_ptr, z_ptr, ms_ptr, mh_ptr, y_ptr,
    gamma_ptr, mean_ptr, rstd_ptr, sum_g_ptr, sum_gy_ptr, bn_n,
    H, W, C_in, Ho, Wo, C_out, M, stride, padding, rows_per_split,
    KH: tl.constexpr, KW: tl.constexpr, DIL: tl.constexpr, FLAT: tl.constexpr,
    GATHER_IN_REGS: tl.constexpr, PROLOGUE: tl.constexpr, PROLOGUE_RELU: tl.constexpr,
    BN_BWD: tl.constexpr, RELU: tl.constexpr, ACT: tl.constexpr, SUB: tl.constexpr,
    PADDED: tl.constexpr, UPCAST: tl.constexpr,
    ACC_FP64: tl.constexpr, PRECISION: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Tile: BLOCK_M output channels x BLOCK_N columns, the input channels offs_c of one tap
    # (r, s scalars), or with FLAT the flattened columns (r, s, offs_c) = col -> (col // C_in
    # // KW, col // C_in % KW, col % C_in) (r, s vectors over the columns); the reduction
    # runs over BLOCK_K output pixels at a time within this program's split.
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    if FLAT:
        col = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        c_ok = col < KH * KW * C_in
        offs_c = col % C_in
        r = col // C_in // KW  # (BLOCK_N,): broadcast along the tile's column axis below
        s = col // C_in % KW
    else:
        c_blocks = tl.cdiv(C_in, BLOCK_N)
        tap = tl.program_id(1) // c_blocks
        r = tap // KW
        s = tap % KW
        offs_c = (tl.program_id(1) % c_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        c_ok = offs_c < C_in
        col = tap * C_in + offs_c
    # XT: the product taken transposed, dw^T tile (BLOCK_N x BLOCK_M) = pro(x)^T dy, so that
    # the operand transformed on load in registers is wgmma's A (which it reads from
    # registers) and dy its B, brought to shared memory by the pipelined loads. The other
    # way round the transformed x is B, which wgmma reads from shared memory only: each step
    # stores it there and must wait for the step's MMAs before the next store (Triton's
    # pipeliner leaves no group in flight: `python -m fused_resnet compile` shows
    # wgmma_in_flight 0 for every tile; transposed, a group stays in flight in every one,
    # Triton 3.6, sm_90). The Gram (ACT: dy transformed too) keeps the plain order: one of
    # its operands is B either way. The stem's gathered x (GATHER_IN_REGS: FLAT, 2-byte, C_in
    # odd, for sm_90; `config.gather_in_registers`) has the same trouble untransformed: no
    # cp.async for its 2-byte runs, so it was stored to shared memory each step. Transposed
    # and passed through a select that changes no value (Triton keeps only a computed A
    # tile in registers), its 7x7 wgrad keeps 1-3 groups in flight in 6 of 8 tiles, 0 of 8
    # before (8 of 8 since `k_steps`).
    XT: tl.constexpr = (PROLOGUE or GATHER_IN_REGS) and not ACT
    if PROLOGUE:
        sc = tl.load(in_scale_ptr + offs_c, mask=c_ok, other=0.0)
        sh = tl.load(in_shift_ptr + offs_c, mask=c_ok, other=0.0)
    offs_co = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    co_ok = offs_co < C_out
    ca, cb, cd = bn_bwd_coefficients(gamma_ptr, mean_ptr, rstd_ptr, sum_g_ptr, sum_gy_ptr,
                                     bn_n, offs_co, co_ok & BN_BWD, acc_ty)
    ms = tl.load(ms_ptr + offs_co, mask=co_ok & ((RELU == 2) | ACT), other=0.0)
    mh = tl.load(mh_ptr + offs_co, mask=co_ok & ((RELU == 2) | ACT), other=0.0)
    split = tl.program_id(2)
    start = split * rows_per_split
    stop = tl.minimum(start + rows_per_split, M)
    # The lanes' output pixels m = start + step * BLOCK_K + lane as (img, oh, ow): divided
    # once here (int32, M < 2^31), then advanced by BLOCK_K = step_img * Ho*Wo + step_h * Wo
    # + step_w per step like an odometer (each digit wraps at most once). Dividing in the
    # loop, as this kernel first did, cost four calls of a 64-bit division routine per step:
    # ~620 SASS instructions per warp and step against 178 after, 162 with the int32 pixel
    # index below, for the same two wgmma (sm_90, bf16, 128x128x32 w8).
    lanes = start + tl.arange(0, BLOCK_K)
    ow = lanes % Wo
    oh = (lanes // Wo) % Ho
    img = lanes // (Wo * Ho)
    step_w = BLOCK_K % Wo
    step_h = (BLOCK_K // Wo) % Ho
    step_img = BLOCK_K // (Wo * Ho)
    if XT:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=acc_ty)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_ty)
    # Pixels past this split's end hold real data of the next split: one of the two tiles
    # must be zero there. The x tile is (loaded as zero) unless an unmasked prologue makes
    # relu?(sh) of it; only then is the dy tile masked too.
    X_MASKED: tl.constexpr = (not PROLOGUE) or PADDED or FLAT
    # k_steps: an empty split (stop <= start) runs one step with every pixel masked.
    for step in range(0, k_steps(tl.cdiv(stop - start, BLOCK_K))):
        offs_m = start + step * BLOCK_K + tl.arange(0, BLOCK_K)
        m_ok = offs_m < stop
        if SUB:  # dy = x at the conv's stride (`Subsampled`): the lanes' (img, oh, ow) in x
            dy_pix = ((img * H + oh * stride) * W + ow * stride).to(tl.int64)
        else:
            dy_pix = offs_m.to(tl.int64)
        if XT:  # x^T (BLOCK_N, BLOCK_K) and dy (BLOCK_K, BLOCK_M): NHWC's own order for dy
            r_t = r[:, None] if FLAT else r
            s_t = s[:, None] if FLAT else s
            ih = oh[None, :] * stride - padding + r_t * DIL
            iw = ow[None, :] * stride - padding + s_t * DIL
            x_ok = m_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & c_ok[:, None]
            x_pix = (img[None, :] * H + ih) * W + iw
            xa = tl.load(x_ptr + x_pix.to(tl.int64) * C_in + offs_c[:, None], mask=x_ok,
                         other=0.0)
            if PROLOGUE:
                xa = prologue(xa, x_ok, sc[:, None], sh[:, None], PROLOGUE_RELU, acc_ty,
                              X_MASKED)
            else:  # GATHER_IN_REGS: computed, not loaded (above)
                xa = tl.where(x_ok, xa, 0.0)
            dy_t = _grad_tile(dy_ptr, z_ptr, y_ptr, dy_pix[:, None] * C_out + offs_co[None, :],
                              m_ok[:, None] & co_ok[None, :], ca[None, :], cb[None, :],
                              cd[None, :], ms[None, :], mh[None, :],
                              BN_BWD, RELU, ACC_FP64, not X_MASKED, ACT)
            acc = dot_acc(xa, dy_t, acc, UPCAST, PRECISION)
        else:  # dy^T (BLOCK_M, BLOCK_K) and x (BLOCK_K, BLOCK_N)
            r_t = r[None, :] if FLAT else r
            s_t = s[None, :] if FLAT else s
            ih = oh[:, None] * stride - padding + r_t * DIL  # (BLOCK_K, 1 or BLOCK_N)
            iw = ow[:, None] * stride - padding + s_t * DIL
            dy_t = _grad_tile(dy_ptr, z_ptr, y_ptr, dy_pix[None, :] * C_out + offs_co[:, None],
                              co_ok[:, None] & m_ok[None, :], ca[:, None], cb[:, None],
                              cd[:, None], ms[:, None], mh[:, None],
                              BN_BWD, RELU, ACC_FP64, not X_MASKED, ACT)
            x_ok = m_ok[:, None] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & c_ok[None, :]
            # the input pixel in int32 (N*H*W < 2^31, `check_pixels`; wrong only where
            # masked), widened once for the element offset
            x_pix = (img[:, None] * H + ih) * W + iw
            xa = tl.load(x_ptr + x_pix.to(tl.int64) * C_in + offs_c[None, :], mask=x_ok,
                         other=0.0)
            if PROLOGUE:
                xa = prologue(xa, x_ok, sc[None, :], sh[None, :], PROLOGUE_RELU, acc_ty,
                              X_MASKED)
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
    if XT:
        out = offs_co[None, :] * (KH * KW * C_in) + col[:, None]
        out_ok = co_ok[None, :] & c_ok[:, None]
    else:
        out = offs_co[:, None] * (KH * KW * C_in) + col[None, :]
        out_ok = co_ok[:, None] & c_ok[None, :]
    if ATOMIC:
        tl.atomic_add(dw_ptr + out, acc, mask=out_ok, sem="relaxed")
    else:
        tl.store(dw_ptr + split.to(tl.int64) * C_out * KH * KW * C_in + out, acc, mask=out_ok)


def conv_wgrad(
    x: Tensor, dy, weight_shape: torch.Size, *, stride: int, padding: int, dilation: int = 1,
    in_scale: Optional[Tensor] = None, in_shift: Optional[Tensor] = None, in_relu: bool = False,
    split: Optional[int] = None, atomic: Optional[bool] = None,
) -> Tensor:
    """dw (C_out, C_in, kh, kw) in the accumulator dtype (fp32, fp64 for fp64 inputs), for
    dy (N, C_out, Ho, Wo) given as a tensor, a BnGrad, an Activated or a Subsampled (a
    tensor of x's shape, x itself for a Gram matrix, read at the stride; no padding);
    `dilation`: the spacing of the kernel's taps, as torch's conv2d takes it.
    `split` slices of the pixels (default `config.wgrad_split`), added by atomics or in a
    fixed order (`atomic`, default `config.wgrad_atomic`; one slice writes dw itself)."""
    grad, flags = _grad_args(dy)
    flags.setdefault("ACT", False)
    flags.setdefault("SUB", False)
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight_shape
    ho, wo = grad[0].shape[2], grad[0].shape[3]
    if flags["SUB"]:  # dy read at the stride from a tensor of x's shape: the output grid
        if tuple(grad[0].shape) != tuple(x.shape) or padding != 0:
            raise ValueError(f"conv_wgrad: a Subsampled dy needs a tensor of x's shape "
                             f"{tuple(x.shape)} and no padding, got {tuple(grad[0].shape)} "
                             f"and padding {padding}")
        ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
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
        KH=kh, KW=kw, DIL=kernel_dilation(dilation, kh, kw), FLAT=flat,
        GATHER_IN_REGS=gather_in_registers(x.dtype, c_in, x.device),
        PROLOGUE=in_scale is not None, PROLOGUE_RELU=in_relu, **flags,
        PADDED=padding > 0,
        UPCAST=x.dtype == torch.bfloat16 and interpreting(), ACC_FP64=acc == torch.float64,
        PRECISION=input_precision(x.dtype), ATOMIC=atomic,
    )
    dw = parts if atomic else parts[0] if split == 1 else parts.sum(0)  # fixed order
    return dw.permute(0, 3, 1, 2)
