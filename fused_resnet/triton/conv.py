"""NHWC implicit-GEMM convolution, forward, with prologue and epilogue fusion.

GEMM view: M = N*Ho*Wo output pixels (rows), N = C_out (columns), K = kh*kw*C_in ordered
(r, s, c) so the innermost K run is a contiguous channel vector of the NHWC input.
Each program owns a BLOCK_M x BLOCK_N tile of the output:

    acc[m, n] = sum_{r, s, c} pro(x[img(m), oh(m)*stride - pad + r*dil, ow(m)*stride - pad + s*dil,
                                    c]) * w[n, c, r, s]

(dil: the dilation DIL, a constexpr, so that the undilated kernels compile as without it.)

- prologue (optional): pro(v) = relu?(v * in_scale[c] + in_shift[c]) on load, then zero
  where the tap falls in the padding (the previous BN + ReLU, never materialized);
- K loop: one loop over (tap, BLOCK_K channel slice), tap-major; or, for inputs with fewer
  channels than a K slice (FLAT_K: `config.flat_k`, C_in < 32: the stem's 3, a CIFAR net's
  16), over the flattened K itself, k -> (r, s, c) = (k // C_in // KW, k // C_in % KW,
  k % C_in), a gather. The stem's 7x7x3 then takes 5 slices of 32 (160 for 147) instead
  of 49 slices each holding 3 channels and 29 zeros (1568 for 147, 10.7x its MACs in tl.dot).
  FLAT_K is then C_in itself (0 otherwise), a constexpr, so that these divisions are by a
  constant: the stem's forward (sm_90, bf16, Triton 3.6) issues 12-27% fewer instructions
  and spills less (128x128x32 w4 folded: 592 B of stack -> none). With GATHER_IN_REGS
  (`config.gather_in_registers`: bf16 / fp16 with C_in odd, for sm_90) the gathered tile
  passes through a select that changes no value: Triton stages a tile taken straight from
  a load in shared memory, and this one, which cp.async cannot copy (2-byte runs), in a
  single buffer stored each K step, so each step's wgmma waited for the last (TTGIR
  pendings 0, wgmma_in_flight 0 in all 8 sm_90 tiles of the stem). Computed, it stays in
  registers as wgmma's A operand: 1 or 3 groups in flight in all 8, for +0.3-8% SASS
  instructions (Triton 3.6, bf16; NOTES.md);
- epilogue, inference: out = relu?(acc + bias[n] + residual[m, n]);
- epilogue, a training block's end (BN_OUT: `ops.triton_block.unwritten_ys`): y = acc rounded
  to x's dtype (as a stored y would be), out = relu(y * scale[n] + shift[n] + r[m, n]) with r
  the residual, or with RES_BN a projection's r * r_scale[n] + r_shift[n], and with
  WRITE_BITS [out > 0] packed 32 channels a word (`eltwise.store_relu_bits`);
- epilogue, training: out = acc (the raw conv output y) and, for every group of STAT_ROWS
  consecutive rows and every channel, a shift k, the mean of y - k and M2 = sum (y - mean)^2
  of the stored y, which `bn.bn_finalize` merges with Chan's formula. Shifting keeps large
  means (1e4 with std 1) from cancelling the variance. For fp32 / fp64 y, k is the group's
  first y (exact, so y - k is too); for fp16 / bf16 y (SHIFT_BY_MEAN) k is the group's
  fp32 mean and mean(y - k) is taken as 0: two reductions over the group's rows instead of
  three (~1600 -> ~1160 SASS instructions a warp per 128x128 tile, sm_90), where y's own
  rounding (2^-9 of its size in bf16) is far above k's (~2^-24 x 32). The groups do not
  depend on the tile config, so neither do the statistics. With STATS_ONLY y is not stored:
  the statistics alone, for a conv that runs again with its BN in the epilogue (BN_OUT).
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
    pinned_config,
)
from fused_resnet.triton.eltwise import relu, store_relu_bits
from fused_resnet.triton.gemm_layout import gemm_weight
from fused_resnet.triton.launch import launch

STAT_ROWS = 32  # rows per statistics group; divides every BLOCK_M of the configs


@triton.jit
def dot_acc(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b. UPCAST multiplies in acc's dtype: the interpreter's bf16 tl.dot is wrong.
    out_dtype is acc's: Triton 3.6 asserts acc.dtype == out_dtype (default fp32) for fp64."""
    if UPCAST:
        return acc + tl.dot(a.to(acc.dtype), b.to(acc.dtype), input_precision=PRECISION)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def k_steps(n):
    """A K loop's trip count n as max(n, 1), for `range(0, k_steps(n))`: a loop the compiler
    knows runs at least once. Where it might run zero times, LLVM gives the exit a block of
    its own that sets the accumulator to its initial zeros, and lays it out after the loop,
    between its wgmma and their final wait; ptxas then serializes every wgmma of the loop
    (C7515: "non wgmma instructions defining accumulator registers"), each K step waiting
    for its own MMAs. Where n may be 0 the one step it gains must add nothing (its loads
    masked: an empty wgrad split), or cost too much to take (`conv_bwd.every_phase_tapped`)."""
    return tl.maximum(n, 1)


@triton.jit
def prologue(a, ok, sc, sh, RELU: tl.constexpr, ACC_TY: tl.constexpr, MASK: tl.constexpr):
    """The loaded x tile a as relu?(a * sc + sh), with MASK zero where not ok (the padding);
    sc, sh: the per-channel scale and shift at a's columns, as a (1, columns) row. Without
    padding the callers leave MASK off (a select less per element): the entries not ok are
    then rows past the end or channels past C_in, whose products are dropped or meet a zero
    (a masked weight row, a masked dy), and are finite: relu?(0 * sc + sh)."""
    v = a.to(ACC_TY) * sc + sh
    if RELU:
        v = relu(v)
    if MASK:
        v = tl.where(ok, v, 0.0)
    return v.to(a.dtype)


@autotune_conv("PROLOGUE", "STATS", "STATS_ONLY", "BN_OUT")
@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, out_ptr,
    in_scale_ptr, in_shift_ptr, bias_ptr, res_ptr, out_affine_ptr, res_affine_ptr, bits_ptr,
    part_shift_ptr, part_mean_ptr, part_m2_ptr, num_groups,
    H, W, C_in, Ho, Wo, C_out, M, stride, padding,
    KH: tl.constexpr, KW: tl.constexpr, DIL: tl.constexpr, FLAT_K: tl.constexpr,
    GATHER_IN_REGS: tl.constexpr, PROLOGUE: tl.constexpr, PROLOGUE_RELU: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, STATS: tl.constexpr,
    STATS_ONLY: tl.constexpr, BN_OUT: tl.constexpr, RES_BN: tl.constexpr,
    WRITE_BITS: tl.constexpr,
    PADDED: tl.constexpr, SHIFT_BY_MEAN: tl.constexpr, UPCAST: tl.constexpr,
    ACC_FP64: tl.constexpr,
    PRECISION: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < C_out
    m64 = offs_m.to(tl.int64)  # N*H*W*C may exceed 2^31
    ow = offs_m % Wo  # int32 division (M < 2^31); 64-bit division is a slow subroutine
    oh = (offs_m // Wo) % Ho
    img = (offs_m // (Wo * Ho)).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_ty)
    if FLAT_K:
        for k0 in range(0, KH * KW * FLAT_K, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < KH * KW * FLAT_K
            c = (k % FLAT_K)[None, :]
            tap = k // FLAT_K
            ih = oh[:, None] * stride - padding + (tap // KW)[None, :] * DIL
            iw = ow[:, None] * stride - padding + (tap % KW)[None, :] * DIL
            a_ok = (m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0)
                    & (iw < W))
            a = tl.load(x_ptr + ((img[:, None] * H + ih) * W + iw) * C_in + c, mask=a_ok,
                        other=0.0)
            if PROLOGUE:
                sc = tl.load(in_scale_ptr + c, mask=k_ok[None, :], other=0.0)
                sh = tl.load(in_shift_ptr + c, mask=k_ok[None, :], other=0.0)
                a = prologue(a, a_ok, sc, sh, PROLOGUE_RELU, acc_ty, True)
            elif GATHER_IN_REGS:  # a select, so that the tile is computed, not loaded
                a = tl.where(a_ok, a, 0.0)
            b = tl.load(w_ptr + k[:, None] * C_out + offs_n[None, :],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = dot_acc(a, b, acc, UPCAST, PRECISION)
    else:
        # One loop over (tap, channel slice), tap-major, rather than a channel loop per tap:
        # Triton pipelines only the innermost loop, and a 3x3 conv over 64 channels would
        # give it 2 iterations per tap, with the loads of each new tap exposed. The tap and
        # the slice advance like an odometer (c0 by BLOCK_K, wrapping into the tap): dividing
        # the step by the slices per tap ran per thread, ~20 SASS instructions a step, and
        # the row addresses are the loop-invariant x_base plus the tap's scalar offset
        # (r * W + s) * C_in instead of a 64-bit multiply chain per row and step.
        ih0 = oh * stride - padding
        iw0 = ow * stride - padding
        x_base = ((img * H + ih0) * W + iw0) * C_in  # int64; < 0 only for rows in padding
        tap = 0
        c0 = 0
        for _step in range(0, k_steps(KH * KW * tl.cdiv(C_in, BLOCK_K))):  # C_in >= 1
            if KH * KW == 1:  # constant tap: the row terms stay out of the loop
                r: tl.constexpr = 0
                s: tl.constexpr = 0
            else:
                r = tap // KW
                s = tap % KW
            ih = ih0 + r * DIL
            iw = iw0 + s * DIL
            row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            c = c0 + offs_k
            c_ok = c < C_in
            a_ok = row_ok[:, None] & c_ok[None, :]
            a = tl.load(x_ptr + (x_base + (r * W + s) * DIL * C_in)[:, None] + c[None, :],
                        mask=a_ok, other=0.0)
            if PROLOGUE:
                sc = tl.load(in_scale_ptr + c, mask=c_ok, other=0.0)[None, :]
                sh = tl.load(in_shift_ptr + c, mask=c_ok, other=0.0)[None, :]
                a = prologue(a, a_ok, sc, sh, PROLOGUE_RELU, acc_ty, PADDED)
            k = (r * KW + s) * C_in + c
            b = tl.load(w_ptr + k[:, None] * C_out + offs_n[None, :],
                        mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            acc = dot_acc(a, b, acc, UPCAST, PRECISION)
            c0 += BLOCK_K
            wrap = c0 >= C_in
            c0 = tl.where(wrap, 0, c0)
            tap += wrap.to(tl.int32)
    if BN_OUT:  # y as it would be stored (rounded), through its BN: y * scale + shift
        scale = tl.load(out_affine_ptr + C_out + offs_n, mask=n_ok, other=0.0)
        shift = tl.load(out_affine_ptr + 2 * C_out + offs_n, mask=n_ok, other=0.0)
        acc = acc.to(out_ptr.dtype.element_ty).to(acc_ty) * scale[None, :] + shift[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(acc_ty)[None, :]
    out_ok = m_ok[:, None] & n_ok[None, :]
    out_offs = m64[:, None] * C_out + offs_n[None, :]
    if HAS_RES:
        r = tl.load(res_ptr + out_offs, mask=out_ok, other=0.0).to(acc_ty)
        if RES_BN:  # the residual is a projection's y_d: bn_d(y_d) added
            r_scale = tl.load(res_affine_ptr + C_out + offs_n, mask=n_ok, other=0.0)
            r_shift = tl.load(res_affine_ptr + 2 * C_out + offs_n, mask=n_ok, other=0.0)
            r = r * r_scale[None, :] + r_shift[None, :]
        acc += r
    if RELU:
        acc = relu(acc)
    y = acc.to(out_ptr.dtype.element_ty)
    if not STATS_ONLY:
        tl.store(out_ptr + out_offs, y, mask=out_ok)
    if WRITE_BITS:  # [out > 0] packed, as `eltwise.bn_act_fwd_bits` writes it
        store_relu_bits(bits_ptr, y, out_ok, offs_m, pid_n * BLOCK_N, M, C_out, BLOCK_M,
                        BLOCK_N)
    if STATS:
        # Statistics of the stored (rounded) y, so backward's recomputation sees the same data.
        # Per group of GROUP rows, shifted by k: mean = k + lo with lo = mean(y - k), and
        # M2 = sum (y - k - lo)^2 over the valid rows. k is the group's first value (a y value:
        # y - k exact), or with SHIFT_BY_MEAN the group's mean itself (lo = 0, not stored).
        G: tl.constexpr = BLOCK_M // GROUP
        ok3 = tl.reshape(out_ok, (G, GROUP, BLOCK_N))
        y3 = tl.reshape(y.to(acc_ty), (G, GROUP, BLOCK_N))
        count = tl.maximum(tl.sum(tl.reshape(m_ok.to(acc_ty), (G, GROUP)), axis=1), 1.0)
        group = pid_m * G + tl.arange(0, G)
        part = group[:, None] * C_out + offs_n[None, :]
        part_ok = (group < num_groups)[:, None] & n_ok[None, :]
        if SHIFT_BY_MEAN:
            k = tl.sum(tl.where(ok3, y3, 0.0), axis=1) / count[:, None]
            d = tl.where(ok3, y3 - k[:, None, :], 0.0)
        else:
            first = (tl.arange(0, GROUP) == 0)[None, :, None]
            k = tl.sum(tl.where(first & ok3, y3, 0.0), axis=1)
            dk = tl.where(ok3, y3 - k[:, None, :], 0.0)
            lo = tl.sum(dk, axis=1) / count[:, None]
            d = tl.where(ok3, dk - lo[:, None, :], 0.0)
            tl.store(part_mean_ptr + part, lo, mask=part_ok)
        tl.store(part_shift_ptr + part, k, mask=part_ok)
        tl.store(part_m2_ptr + part, tl.sum(d * d, axis=1), mask=part_ok)


MAX_PIXELS = 2**31 - 1  # the kernels index pixels (N*H*W, N*Ho*Wo) in int32


def check_pixels(x_shape, out_hw: tuple[int, int]) -> None:
    """Raises where the input (N, C, H, W) or the output (N, ., Ho, Wo) has more pixels than
    the kernels' int32 pixel indices reach (element offsets are int64 and unlimited)."""
    n, _, h, w = x_shape
    pixels = max(n * h * w, n * out_hw[0] * out_hw[1])
    if pixels > MAX_PIXELS:
        raise ValueError(f"input of shape {tuple(x_shape)}: the Triton conv kernels take at most "
                         f"2**31 - 1 pixels (N*H*W) per call, got {pixels}; split the batch")


def to_nhwc(t: Tensor) -> Tensor:
    """t (N, C, H, W) stored channels_last (a copy only if it is not already)."""
    return t.contiguous(memory_format=torch.channels_last)


def fwd_output(x_shape, weight_shape, stride: int, padding: int,
               dilation: int = 1) -> tuple[int, int, int]:
    """(Ho, Wo, M = N*Ho*Wo) of the forward conv, its pixel count checked (`check_pixels`)."""
    n, _, h, w = x_shape
    _, _, kh, kw = weight_shape
    ho = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    check_pixels(x_shape, (ho, wo))
    return ho, wo, n * ho * wo


def fwd_grid(m: int, c_out: int):
    """The forward's grid: a program per BLOCK_M x BLOCK_N tile of the (M, C_out) output."""
    return lambda meta: (cdiv(m, meta["BLOCK_M"]), cdiv(c_out, meta["BLOCK_N"]))


def kernel_dilation(dilation: int, kh: int, kw: int) -> int:
    """The DIL constexpr of a conv kernel: `dilation`, or 1 for a 1x1 kernel, which it does
    not change (one compiled variant, the undilated one, for every 1x1 conv)."""
    return 1 if kh == kw == 1 else dilation


def fwd_flags(dtype: torch.dtype, kh: int, kw: int, c_in: int, padding: int, *,
              device: torch.device, prologue: bool, in_relu: bool, bias: bool,
              residual: bool, relu: bool, stats: bool, dilation: int = 1,
              stats_only: bool = False, bn_out: bool = False, residual_bn: bool = False,
              write_bits: bool = False) -> dict:
    """The forward kernel's constexpr arguments for x of `dtype` on `device` and a
    (., c_in, kh, kw) weight dilated by `dilation`, and which prologue / epilogue parts the
    launch has."""
    return dict(
        KH=kh, KW=kw, DIL=kernel_dilation(dilation, kh, kw),
        FLAT_K=c_in if flat_k(c_in) else 0,  # the divisor, as a constexpr (module doc)
        GATHER_IN_REGS=gather_in_registers(dtype, c_in, device),
        PROLOGUE=prologue, PROLOGUE_RELU=in_relu,
        HAS_BIAS=bias, HAS_RES=residual, RELU=relu, STATS=stats, STATS_ONLY=stats_only,
        BN_OUT=bn_out, RES_BN=residual_bn, WRITE_BITS=write_bits, PADDED=padding > 0,
        SHIFT_BY_MEAN=dtype in (torch.float16, torch.bfloat16),
        UPCAST=dtype == torch.bfloat16 and interpreting(),
        ACC_FP64=acc_dtype(dtype) == torch.float64, PRECISION=input_precision(dtype),
        GROUP=STAT_ROWS)


def conv_fwd(
    x: Tensor,
    weight: Tensor,
    *,
    stride: int,
    padding: int,
    dilation: int = 1,
    in_scale: Optional[Tensor] = None,
    in_shift: Optional[Tensor] = None,
    in_relu: bool = False,
    bias: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    relu: bool = False,
    stats: bool = False,
    store: bool = True,
    out_affine: Optional[Tensor] = None,
    residual_affine: Optional[Tensor] = None,
    bits: Optional[Tensor] = None,
) -> tuple[Optional[Tensor], Optional[tuple[Tensor, Tensor, Tensor]]]:
    """out (N, C_out, Ho, Wo) channels_last in x's dtype (None without `store`), and with
    `stats` the partials (shift, mean - shift, m2), each (cdiv(N*Ho*Wo, STAT_ROWS), C_out), for
    `bn.bn_finalize`; mean - shift is None for fp16 / bf16 x (the shift is the group's mean:
    module doc).

    x: (N, C_in, H, W); weight: (C_out, C_in, kh, kw), any float dtype (cast to x's while
    laid out: an fp32 master weight needs no separate cast); in_scale / in_shift: (C_in,)
    prologue; bias: (C_out,); residual: out's shape, in x's dtype; dilation: the spacing of
    the kernel's taps, as torch's conv2d takes it. A training block's end in the epilogue
    (`block_end_bits_ok`): out_affine, the (rstd, scale, shift) rows (3, C_out) of the BN of
    y = conv(x), applied to y rounded to x's dtype (as a stored y is); residual_affine, the
    same of a projection's BN, applied to the residual; bits, a (N*Ho*Wo, cdiv(C_out, 32))
    int32 tensor that receives [out > 0] packed (`eltwise.pack_relu_bits`). Without `store`
    (statistics alone: `stats`) out is not written.
    """
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    ho, wo, m = fwd_output(x.shape, weight.shape, stride, padding, dilation)
    x = to_nhwc(x)
    if bits is not None and not block_end_bits_ok(c_out):
        raise ValueError(f"conv_fwd: the packed ReLU mask needs tiles of >= 32 channels or "
                         f"one tile holding all {c_out}; the pinned config's are narrower")
    out = torch.empty((n, c_out, ho, wo), device=x.device, dtype=x.dtype,
                      memory_format=torch.channels_last) if store else None
    acc = acc_dtype(x.dtype)
    groups = cdiv(m, STAT_ROWS)
    parts = None
    by_mean = x.dtype in (torch.float16, torch.bfloat16)
    if stats:
        shift, lo, m2 = (None if by_mean and i == 1 else
                         torch.empty((groups, c_out), device=x.device, dtype=acc)
                         for i in range(3))
        parts = (shift, lo, m2)
    # stands in for absent optional pointers (never read): a tensor the launch reads or
    # writes anyway, so that `launch_work` counts no bytes for it
    dummy = out if store else x

    def given(t: Optional[Tensor]) -> Tensor:
        return t if t is not None else dummy

    launch(
        _conv_fwd_kernel, fwd_grid(m, c_out),
        x, gemm_weight(weight, x.dtype), dummy, given(in_scale), given(in_shift), given(bias),
        to_nhwc(residual) if residual is not None else dummy, given(out_affine),
        given(residual_affine), given(bits),
        *(given(p) for p in parts or (None,) * 3), groups,
        h, w, c_in, ho, wo, c_out, m, stride, padding,
        **fwd_flags(x.dtype, kh, kw, c_in, padding, device=x.device,
                    prologue=in_scale is not None, in_relu=in_relu, bias=bias is not None,
                    residual=residual is not None, relu=relu, stats=stats,
                    dilation=dilation, stats_only=not store, bn_out=out_affine is not None,
                    residual_bn=residual_affine is not None, write_bits=bits is not None),
    )
    return out, parts


def block_end_bits_ok(c_out: int) -> bool:
    """Whether the forward's epilogue can write the packed ReLU mask of a C_out-channel output
    (`conv_fwd(bits=)`): every tile starts at a multiple of 32 channels or holds them all (the
    autotuner's tiles are 64 or more wide; a pinned config may be narrower)."""
    pinned = pinned_config()
    return pinned is None or pinned.block_n % 32 == 0 or pinned.block_n >= c_out
