"""Inference bottleneck with identity shortcut in one launch (BN folded into every conv).

    z = relu(conv3(a2) + b3 + x),  a2 = relu(conv2_3x3(a1) + b2),  a1 = relu(conv1_1x1(x) + b1)

for stride 1 and C_in == C_out. Each program owns BLOCK_M output pixels and keeps a1 / a2 on
chip: for each of the 9 taps of the 3x3 it recomputes a1 at the shifted pixels (the halo) in
chunks of BLOCK_K mid channels and accumulates conv2 into a [BLOCK_M, BLOCK_MID] tile; then
conv3 + bias + shortcut + ReLU is stored BLOCK_N output channels at a time. Conv1 is
recomputed 9 times (about 2.9x the block's MACs for a ResNet-50 bottleneck), traded for never
writing or reading a1 and a2: worth it where launches and HBM traffic dominate (small
batches). Mid widths up to 256 (BLOCK_MID tile in registers).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from fused_resnet.triton.config import (
    BOTTLENECK_EVAL_MAX_MID,
    acc_dtype,
    cdiv,
    input_precision,
    interpreting,
)
from fused_resnet.triton.conv import check_pixels, dot_acc, to_nhwc
from fused_resnet.triton.eltwise import relu
from fused_resnet.triton.gemm_layout import gemm_weight
from fused_resnet.triton.launch import run


@triton.jit
def _bottleneck_eval_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, z_ptr,
    H, W, C, C_mid, M,
    UPCAST: tl.constexpr, ACC_FP64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_MID: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    dtype = x_ptr.dtype.element_ty
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    m64 = offs_m.to(tl.int64)
    w = offs_m % W  # int32 division (M < 2^31); 64-bit division is a slow subroutine
    h = (offs_m // W) % H
    img = (offs_m // (W * H)).to(tl.int64)
    mid = tl.arange(0, BLOCK_MID)
    mid_ok = mid < C_mid
    offs_k = tl.arange(0, BLOCK_K)
    acc2 = tl.zeros((BLOCK_M, BLOCK_MID), dtype=acc_ty)
    for r in range(3):
        for s in range(3):
            hh = h + r - 1
            ww = w + s - 1
            tap_ok = m_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            row = ((img * H + hh) * W + ww) * C
            for j0 in range(0, C_mid, BLOCK_K):  # a chunk of a1's channels at this tap
                j = j0 + offs_k
                j_ok = j < C_mid
                acc1 = tl.zeros((BLOCK_M, BLOCK_K), dtype=acc_ty)
                for k0 in range(0, C, BLOCK_K):
                    k = k0 + offs_k
                    k_ok = k < C
                    a = tl.load(x_ptr + row[:, None] + k[None, :],
                                mask=tap_ok[:, None] & k_ok[None, :], other=0.0)
                    b = tl.load(w1_ptr + k[:, None] * C_mid + j[None, :],
                                mask=k_ok[:, None] & j_ok[None, :], other=0.0)
                    acc1 = dot_acc(a, b, acc1, UPCAST, PRECISION)
                b1 = tl.load(b1_ptr + j, mask=j_ok, other=0.0).to(acc_ty)
                a1 = relu(acc1 + b1[None, :])
                a1 = tl.where(tap_ok[:, None] & j_ok[None, :], a1, 0.0).to(dtype)  # zero pad
                w2 = tl.load(w2_ptr + ((r * 3 + s) * C_mid + j)[:, None] * C_mid + mid[None, :],
                             mask=j_ok[:, None] & mid_ok[None, :], other=0.0)
                acc2 = dot_acc(a1, w2, acc2, UPCAST, PRECISION)
    b2 = tl.load(b2_ptr + mid, mask=mid_ok, other=0.0).to(acc_ty)
    a2 = tl.where(mid_ok[None, :], relu(acc2 + b2[None, :]), 0.0).to(dtype)
    for n0 in range(0, C, BLOCK_N):
        co = n0 + tl.arange(0, BLOCK_N)
        co_ok = co < C
        w3 = tl.load(w3_ptr + mid[:, None] * C + co[None, :],
                     mask=mid_ok[:, None] & co_ok[None, :], other=0.0)
        acc3 = dot_acc(a2, w3, tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_ty), UPCAST, PRECISION)
        ok = m_ok[:, None] & co_ok[None, :]
        offs = m64[:, None] * C + co[None, :]
        acc3 += tl.load(b3_ptr + co, mask=co_ok, other=0.0).to(acc_ty)[None, :]
        acc3 += tl.load(x_ptr + offs, mask=ok, other=0.0).to(acc_ty)
        tl.store(z_ptr + offs, relu(acc3).to(dtype), mask=ok)


def bottleneck_eval(x: Tensor, weights: list[Tensor], biases: list[Tensor]) -> Tensor:
    """z (N, C, H, W) channels_last for x (N, C, H, W) and folded (w1 1x1, w2 3x3, w3 1x1)
    in x's dtype with biases (C_mid,), (C_mid,), (C,). Stride 1, identity shortcut."""
    w1, w2, w3 = weights
    n, c, h, w = x.shape
    c_mid = w1.shape[0]
    if w3.shape[0] != c or w2.shape[2:] != (3, 3) or c_mid > BOTTLENECK_EVAL_MAX_MID:
        shapes = [tuple(t.shape) for t in weights]
        raise ValueError(f"bottleneck_eval needs C_out == C_in, a 3x3 middle conv and at most "
                         f"{BOTTLENECK_EVAL_MAX_MID} mid channels; got weights {shapes}")
    check_pixels(x.shape, (h, w))
    x = to_nhwc(x)
    z = torch.empty_like(x, memory_format=torch.channels_last)
    m = n * h * w
    block_m = 32
    block_mid = max(16, triton.next_power_of_2(c_mid))
    # Shared memory of the fp32 (tf32) build at BLOCK_MID 256, by software-pipelining stages
    # (`python -m fused_resnet compile`, sm_80 and sm_90 alike): 3 -> 164 KiB, over the A100's
    # 163 KiB per block; 2 -> 100 KiB, over sm_86 / sm_89's 99 KiB; 1 -> 96 KiB, fits all.
    # 16-bit builds need half as much and keep 3 stages.
    stages = 1 if x.element_size() >= 4 and block_mid >= 256 else 3
    run(_bottleneck_eval_kernel, (cdiv(m, block_m),),
        x, gemm_weight(w1), biases[0], gemm_weight(w2), biases[1], gemm_weight(w3), biases[2], z,
        h, w, c, c_mid, m,
        UPCAST=x.dtype == torch.bfloat16 and interpreting(),
        ACC_FP64=acc_dtype(x.dtype) == torch.float64, PRECISION=input_precision(x.dtype),
        BLOCK_M=block_m, BLOCK_MID=block_mid, BLOCK_K=32, BLOCK_N=64, num_warps=4,
        num_stages=stages,
    )
    return z
