"""Max-pool over NHWC tensors (the ResNet stem's 3x3 stride-2 pool), forward and backward,
as tiles of (pixels, channels) so that a window's loads are contiguous channel rows.

Forward, for a K x K window at stride S with P rows / columns of padding (-inf there):
    out[n, oh, ow, c] = max_{r, s < K} x[n, oh * S - P + r, ow * S - P + s, c]
and, where a backward needs it, the window position of the maximum as one int8 per output
element, arg = r * K + s (8x fewer bytes than ATen's int64 indices, and nothing at all in
inference, where ATen writes them too). The position is the one ATen picks: the window is
scanned row by row and a value replaces the maximum when it is greater or NaN, so ties go to
the first, a NaN to the last NaN, and a window of -inf (or padding and -inf) to its first
pixel inside the input.

Backward, gathered per input pixel (no atomics: deterministic): the pixel (h, w) lies in the
windows oh = (h + P) // S - i, i < cdiv(K, S) (those with 0 <= oh < Ho and h + P - oh * S <
K), likewise ow; it receives dout of each such window whose arg is its own position there,
    dx[n, h, w, c] = sum_{windows} dout[n, oh, ow, c] * [arg[n, oh, ow, c] == r * K + s],
summed in fp32 (fp64 for fp64) in a fixed order.

The stem in training (`ops.stem`): the pool's input is x = relu(y * scale + shift) of the
stem conv's output y, never written. The forward applies it to each loaded y (rounded to y's
dtype, as the BN pass wrote it) before the max. The backward gathers dx as above and goes on
through the ReLU and the BN: g = dx * [y * scale + shift > 0], in two launches, the first
summing (sum g, sum g * yhat) per program over its pixels (`max_pool_bn_bwd_sums`), the
second writing dy = a g + b y + d (`max_pool_bn_bwd`, (a, b, d) from those sums): dx and g
are never written, each launch reading dout, arg and y.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fused_resnet.triton.config import acc_dtype, cdiv
from fused_resnet.triton.eltwise import relu
from fused_resnet.triton.launch import run

BLOCK_C = 64
BLOCK_P = 32  # pixels a program at least (more where there are few channels)


def _tiles(pixels: int, c: int) -> tuple[int, int, tuple[int, int]]:
    block_c = min(BLOCK_C, triton.next_power_of_2(max(c, 1)))  # an empty x launches nothing
    block_p = max(BLOCK_P, 2048 // block_c // 2)  # ~1-2k elements a program
    return block_p, block_c, (cdiv(pixels, block_p), cdiv(c, block_c))


@triton.jit
def _pixel_tile(M, C, H, W, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's BLOCK_P pixels of an (M = N*H*W, C) NHWC matrix (M < 2^31) and BLOCK_C
    channels, their masks, and each pixel's (image, row, column)."""
    pix = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return pix, cols, pix < M, cols < C, pix // (W * H), (pix // W) % H, pix % W


@triton.jit
def _max_pool_fwd_kernel(
    x_ptr, sc_ptr, sh_ptr, out_ptr, arg_ptr, H, W, C, Ho, Wo, M,
    K: tl.constexpr, S: tl.constexpr, P: tl.constexpr, PROLOGUE: tl.constexpr,
    WRITE_ARG: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pix, cols, p_ok, c_ok, img, oh, ow = _pixel_tile(M, C, Ho, Wo, BLOCK_P, BLOCK_C)  # outputs
    h0 = oh * S - P
    w0 = ow * S - P
    # ATen's starting guess: the window's first pixel inside the input, value -inf
    first = tl.maximum(-h0, 0) * K + tl.maximum(-w0, 0)
    # compared in fp32 (fp64 for fp64): exact for every input dtype
    best = tl.full((BLOCK_P, BLOCK_C), float("-inf"), tl.float64 if ACC_FP64 else tl.float32)
    arg = tl.zeros((BLOCK_P, BLOCK_C), tl.int32) + first[:, None]
    if PROLOGUE:
        sc = tl.load(sc_ptr + cols, mask=c_ok, other=0.0)[None, :].to(best.dtype)
        sh = tl.load(sh_ptr + cols, mask=c_ok, other=0.0)[None, :].to(best.dtype)
    for r in tl.static_range(K):
        for s in tl.static_range(K):
            h = h0 + r
            w = w0 + s
            ok = p_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            row = ((img * H + h) * W + w).to(tl.int64) * C
            v_ok = ok[:, None] & c_ok[None, :]
            v = tl.load(x_ptr + row[:, None] + cols[None, :], mask=v_ok,
                        other=float("-inf")).to(best.dtype)
            if PROLOGUE:  # relu(y * scale + shift) rounded as the BN pass would write it
                v = relu(v * sc + sh).to(x_ptr.dtype.element_ty).to(best.dtype)
                v = tl.where(v_ok, v, float("-inf"))
            take = (v > best) | (v != v)  # greater, or NaN (ATen's rule)
            best = tl.where(take, v, best)
            arg = tl.where(take, r * K + s, arg)
    out = pix.to(tl.int64)[:, None] * C + cols[None, :]
    ok = p_ok[:, None] & c_ok[None, :]
    tl.store(out_ptr + out, best.to(out_ptr.dtype.element_ty), mask=ok)
    if WRITE_ARG:
        tl.store(arg_ptr + out, arg.to(tl.int8), mask=ok)


@triton.jit
def _max_pool_bwd_kernel(
    dout_ptr, arg_ptr, dx_ptr, y_ptr, sc_ptr, sh_ptr, mean_ptr, rstd_ptr, coef_ptr,
    part_g_ptr, part_gy_ptr, H, W, C, Ho, Wo, M,
    K: tl.constexpr, S: tl.constexpr, P: tl.constexpr, REDUCE: tl.constexpr,
    WRITE_DY: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    pix, cols, p_ok, c_ok, img, h, w = _pixel_tile(M, C, H, W, BLOCK_P, BLOCK_C)  # inputs
    acc = tl.zeros((BLOCK_P, BLOCK_C), acc_ty)
    WINDOWS: tl.constexpr = (K + S - 1) // S  # windows a pixel lies in, per dimension
    for i in tl.static_range(WINDOWS):
        oh = (h + P) // S - i
        r = h + P - oh * S  # the pixel's row in that window: (h + P) % S + i * S >= 0
        for j in tl.static_range(WINDOWS):
            ow = (w + P) // S - j
            s = w + P - ow * S
            ok = p_ok & (oh >= 0) & (oh < Ho) & (r < K) & (ow >= 0) & (ow < Wo) & (s < K)
            o = ((img * Ho + oh) * Wo + ow).to(tl.int64)[:, None] * C + cols[None, :]
            o_ok = ok[:, None] & c_ok[None, :]
            a = tl.load(arg_ptr + o, mask=o_ok, other=-1).to(tl.int32)
            g = tl.load(dout_ptr + o, mask=o_ok, other=0.0).to(acc_ty)
            acc += tl.where(a == (r * K + s)[:, None], g, 0.0)
    out = pix.to(tl.int64)[:, None] * C + cols[None, :]
    out_ok = p_ok[:, None] & c_ok[None, :]
    if REDUCE or WRITE_DY:  # through relu(y * scale + shift): g = dx * [y * scale + shift > 0]
        yv = tl.load(y_ptr + out, mask=out_ok, other=0.0).to(acc_ty)
        sc = tl.load(sc_ptr + cols, mask=c_ok, other=0.0)[None, :]
        sh = tl.load(sh_ptr + cols, mask=c_ok, other=0.0)[None, :]
        g = tl.where(yv * sc + sh <= 0, 0.0, acc)  # as relu_grad: a NaN lets g through
        if REDUCE:  # this program's (sum g, sum g * yhat), yhat = (y - mean) * rstd
            mean = tl.load(mean_ptr + cols, mask=c_ok, other=0.0)[None, :]
            rstd = tl.load(rstd_ptr + cols, mask=c_ok, other=0.0)[None, :]
            part = tl.program_id(0) * C + cols
            tl.store(part_g_ptr + part, tl.sum(g, axis=0), mask=c_ok)
            tl.store(part_gy_ptr + part, tl.sum(g * (yv - mean) * rstd, axis=0), mask=c_ok)
        if WRITE_DY:  # dy = a g + b y + d (`eltwise.bn_bwd_coefficient_rows`)
            a = tl.load(coef_ptr + cols, mask=c_ok, other=0.0)[None, :]
            b = tl.load(coef_ptr + C + cols, mask=c_ok, other=0.0)[None, :]
            d = tl.load(coef_ptr + 2 * C + cols, mask=c_ok, other=0.0)[None, :]
            tl.store(dx_ptr + out, (a * g + b * yv + d).to(dx_ptr.dtype.element_ty),
                     mask=out_ok)
    else:
        tl.store(dx_ptr + out, acc.to(dx_ptr.dtype.element_ty), mask=out_ok)


def pool_output_size(size: int, kernel_size: int, stride: int, padding: int) -> int:
    """floor((size + 2 * padding - kernel_size) / stride) + 1 (ceil_mode off, dilation 1)."""
    return (size + 2 * padding - kernel_size) // stride + 1


def _fwd_launch(x_shape, dtype: torch.dtype, kernel_size: int, stride: int, padding: int,
                prologue: bool, write_arg: bool) -> tuple:
    """(out shape, grid, integer arguments, constexprs) of the forward launch."""
    n, c, h, w = x_shape
    ho, wo = (pool_output_size(v, kernel_size, stride, padding) for v in (h, w))
    m = n * ho * wo
    block_p, block_c, grid = _tiles(m, c)
    constexprs = dict(K=kernel_size, S=stride, P=padding, PROLOGUE=prologue,
                      WRITE_ARG=write_arg, ACC_FP64=dtype == torch.float64, BLOCK_P=block_p,
                      BLOCK_C=block_c)
    return (n, c, ho, wo), grid, (h, w, c, ho, wo, m), constexprs


def max_pool_fwd(x: Tensor, kernel_size: int, stride: int, padding: int, write_arg: bool,
                 scale: Optional[Tensor] = None,
                 shift: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """(out (N, C, Ho, Wo) channels_last in x's dtype, arg (N, C, Ho, Wo) channels_last int8
    or None without write_arg) for x (N, C, H, W); see the module docstring. With scale and
    shift ((C,), fp32 or fp64): the max-pool of relu(x * scale + shift)."""
    prologue = scale is not None
    out_shape, grid, ints, constexprs = _fwd_launch(x.shape, x.dtype, kernel_size, stride,
                                                    padding, prologue, write_arg)
    x = x.contiguous(memory_format=torch.channels_last)
    out = torch.empty(out_shape, device=x.device, dtype=x.dtype,
                      memory_format=torch.channels_last)
    arg = torch.empty_like(out, dtype=torch.int8) if write_arg else None
    if out.numel():
        run(_max_pool_fwd_kernel, grid, x, scale if prologue else x, shift if prologue else x,
            out, arg if write_arg else out, *ints, **constexprs)
    return out, arg


class PreparedMaxPoolFwd:
    """`max_pool_fwd(x, kernel_size, stride, padding, write_arg=False)[0]` for x of shape
    `x_shape` and `dtype` stored channels_last (the caller keeps to that): the output shape,
    grid and launch arguments worked out once (the inference stem's plan,
    `ops.eval_plan.StemEvalPlan`)."""

    __slots__ = ("out_shape", "dtype", "grid", "ints", "constexprs")

    def __init__(self, x_shape: tuple, dtype: torch.dtype, kernel_size: int, stride: int,
                 padding: int) -> None:
        self.out_shape, self.grid, self.ints, self.constexprs = _fwd_launch(
            x_shape, dtype, kernel_size, stride, padding, prologue=False, write_arg=False)
        self.dtype = dtype

    def __call__(self, x: Tensor) -> Tensor:
        out = torch.empty(self.out_shape, device=x.device, dtype=self.dtype,
                          memory_format=torch.channels_last)
        if out.numel():  # x stands in for the absent scale, shift and positions (never read)
            run(_max_pool_fwd_kernel, self.grid, x, x, x, out, out, *self.ints,
                **self.constexprs)
        return out


def _bwd(dout: Tensor, arg: Tensor, x_shape, kernel_size: int, stride: int, padding: int,
         bn: tuple = (), coef: Optional[Tensor] = None, reduce: bool = False):
    """The backward launch: dx (no bn), dy (bn = (y, scale, shift, ...), coef) or the
    per-program partial sums (bn = (y, scale, shift, mean, rstd), reduce)."""
    n, c, h, w = x_shape
    ho, wo = dout.shape[2], dout.shape[3]
    dout = dout.contiguous(memory_format=torch.channels_last)
    m = n * h * w
    block_p, block_c, grid = _tiles(m, c)
    acc = acc_dtype(dout.dtype)
    dx = dout if reduce else torch.empty((n, c, h, w), device=dout.device, dtype=dout.dtype,
                                         memory_format=torch.channels_last)
    parts = [torch.empty((grid[0], c), device=dout.device, dtype=acc) for _ in range(2)] \
        if reduce else [dx, dx]
    if m == 0 or c == 0:
        return parts if reduce else dx
    y, scale, shift, mean, rstd = (*bn, dx, dx)[:5] if bn else (dx,) * 5
    if bn:
        y = y.contiguous(memory_format=torch.channels_last)
    run(_max_pool_bwd_kernel, grid, dout, arg, dx, y, scale, shift, mean, rstd,
        coef if coef is not None else dx, *parts, h, w, c, ho, wo, m,
        K=kernel_size, S=stride, P=padding, REDUCE=reduce, WRITE_DY=coef is not None,
        ACC_FP64=acc == torch.float64, BLOCK_P=block_p, BLOCK_C=block_c)
    return parts if reduce else dx


def max_pool_bwd(dout: Tensor, arg: Tensor, x_shape, kernel_size: int, stride: int,
                 padding: int) -> Tensor:
    """dx (N, C, H, W) channels_last in dout's dtype, from dout and the forward's arg."""
    return _bwd(dout, arg, x_shape, kernel_size, stride, padding)


def max_pool_bn_bwd_sums(dout: Tensor, arg: Tensor, y: Tensor, scale: Tensor, shift: Tensor,
                         mean: Tensor, rstd: Tensor, kernel_size: int, stride: int,
                         padding: int) -> tuple[Tensor, Tensor]:
    """(sum g, sum g * yhat), (C,) in the statistics' dtype, of g = dx * [y * scale + shift
    > 0] for the pool's dx of dout, and yhat = (y - mean) * rstd: the backward sums of the
    BN whose relu(y * scale + shift) the pool took (`max_pool_fwd` with scale, shift). The
    per-program partials are summed in a fixed order."""
    parts = _bwd(dout, arg, y.shape, kernel_size, stride, padding,
                 bn=(y, scale, shift, mean, rstd), reduce=True)
    return parts[0].sum(0), parts[1].sum(0)


def max_pool_bn_bwd(dout: Tensor, arg: Tensor, y: Tensor, scale: Tensor, shift: Tensor,
                    coef: Tensor, kernel_size: int, stride: int, padding: int) -> Tensor:
    """dy = a g + b y + d (N, C, H, W) channels_last in dout's dtype, g as in
    `max_pool_bn_bwd_sums`; coef: the (3, C) rows (a, b, d) of
    `eltwise.bn_bwd_coefficient_rows`."""
    return _bwd(dout, arg, y.shape, kernel_size, stride, padding, bn=(y, scale, shift),
                coef=coef)
