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
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fused_resnet.triton.config import acc_dtype, cdiv
from fused_resnet.triton.launch import run

BLOCK_C = 64
BLOCK_P = 32  # pixels a program at least (more where there are few channels)


def _tiles(pixels: int, c: int) -> tuple[int, int, tuple[int, int]]:
    block_c = min(BLOCK_C, triton.next_power_of_2(c))
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
    x_ptr, out_ptr, arg_ptr, H, W, C, Ho, Wo, M,
    K: tl.constexpr, S: tl.constexpr, P: tl.constexpr, WRITE_ARG: tl.constexpr,
    ACC_FP64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pix, cols, p_ok, c_ok, img, oh, ow = _pixel_tile(M, C, Ho, Wo, BLOCK_P, BLOCK_C)  # outputs
    h0 = oh * S - P
    w0 = ow * S - P
    # ATen's starting guess: the window's first pixel inside the input, value -inf
    first = tl.maximum(-h0, 0) * K + tl.maximum(-w0, 0)
    # compared in fp32 (fp64 for fp64): exact for every input dtype
    best = tl.full((BLOCK_P, BLOCK_C), float("-inf"), tl.float64 if ACC_FP64 else tl.float32)
    arg = tl.zeros((BLOCK_P, BLOCK_C), tl.int32) + first[:, None]
    for r in tl.static_range(K):
        for s in tl.static_range(K):
            h = h0 + r
            w = w0 + s
            ok = p_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            row = ((img * H + h) * W + w).to(tl.int64) * C
            v = tl.load(x_ptr + row[:, None] + cols[None, :], mask=ok[:, None] & c_ok[None, :],
                        other=float("-inf")).to(best.dtype)
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
    dout_ptr, arg_ptr, dx_ptr, H, W, C, Ho, Wo, M,
    K: tl.constexpr, S: tl.constexpr, P: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
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
    tl.store(dx_ptr + out, acc.to(dx_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


def pool_output_size(size: int, kernel_size: int, stride: int, padding: int) -> int:
    """floor((size + 2 * padding - kernel_size) / stride) + 1 (ceil_mode off, dilation 1)."""
    return (size + 2 * padding - kernel_size) // stride + 1


def max_pool_fwd(x: Tensor, kernel_size: int, stride: int, padding: int,
                 write_arg: bool) -> tuple[Tensor, Optional[Tensor]]:
    """(out (N, C, Ho, Wo) channels_last in x's dtype, arg (N, C, Ho, Wo) channels_last int8
    or None without write_arg) for x (N, C, H, W); see the module docstring."""
    n, c, h, w = x.shape
    ho, wo = (pool_output_size(v, kernel_size, stride, padding) for v in (h, w))
    x = x.contiguous(memory_format=torch.channels_last)
    out = torch.empty((n, c, ho, wo), device=x.device, dtype=x.dtype,
                      memory_format=torch.channels_last)
    arg = torch.empty_like(out, dtype=torch.int8) if write_arg else None
    m = n * ho * wo
    if m == 0 or c == 0:
        return out, arg
    block_p, block_c, grid = _tiles(m, c)
    run(_max_pool_fwd_kernel, grid, x, out, arg if write_arg else out, h, w, c, ho, wo, m,
        K=kernel_size, S=stride, P=padding, WRITE_ARG=write_arg,
        ACC_FP64=x.dtype == torch.float64, BLOCK_P=block_p, BLOCK_C=block_c)
    return out, arg


def max_pool_bwd(dout: Tensor, arg: Tensor, x_shape, kernel_size: int, stride: int,
                 padding: int) -> Tensor:
    """dx (N, C, H, W) channels_last in dout's dtype, from dout and the forward's arg."""
    n, c, h, w = x_shape
    ho, wo = dout.shape[2], dout.shape[3]
    dout = dout.contiguous(memory_format=torch.channels_last)
    dx = torch.empty((n, c, h, w), device=dout.device, dtype=dout.dtype,
                     memory_format=torch.channels_last)
    m = n * h * w
    if m == 0 or c == 0:
        return dx
    block_p, block_c, grid = _tiles(m, c)
    run(_max_pool_bwd_kernel, grid, dout, arg, dx, h, w, c, ho, wo, m,
        K=kernel_size, S=stride, P=padding,
        ACC_FP64=acc_dtype(dout.dtype) == torch.float64, BLOCK_P=block_p, BLOCK_C=block_c)
    return dx
