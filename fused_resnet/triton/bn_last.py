"""The per-channel work of a bottleneck's last BN backward without its conv output
y3 (`ops.triton_block._last_bn_backward_without_y`), in one launch.

With pixels as rows, y3 = a2 w^T for the activation a2 (P x K) and the 1x1 conv weight w
(C x K, rounded to the activations' dtype, as the forward's conv took it); g = dz * [z > 0];
G = g^T a2 (C x K, a weight gradient of g). Per output channel c:
    sum_p g * y3  = sum_k w[c, k] G[c, k]
    sum g * yhat  = rstd (sum_p g * y3 - mean sum g)
    a = gamma rstd,  b = -a rstd (sum g * yhat) / n,  d = -a (sum g) / n - b mean
(`reference.bn_backward_affine`: dy3 = a g + b y3 + d). One program per BLOCK_C channels
reads its rows of w and G once for the sum and writes what the later GEMMs take: a * w (the
dgrad's weight), a * G (the first term of dw3), [b * w | d] (C x (K + 1): its transpose
times w gives M = w^T diag(b) w and e = w^T d in one matrix product) and w itself as rounded.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from fused_resnet.triton.config import cdiv
from fused_resnet.triton.launch import run


@triton.jit
def _last_bn_coefficients_kernel(
    w_ptr, gg_ptr, gamma_ptr, mean_ptr, rstd_ptr, sum_g_ptr,
    sum_gy_ptr, wr_ptr, aw_ptr, ag_ptr, bwd_ptr, n, C, K,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    rstd = tl.load(rstd_ptr + offs_c, mask=c_ok, other=0.0)
    acc_ty = rstd.dtype
    gamma = tl.load(gamma_ptr + offs_c, mask=c_ok, other=0.0).to(acc_ty)
    mean = tl.load(mean_ptr + offs_c, mask=c_ok, other=0.0)
    sum_g = tl.load(sum_g_ptr + offs_c, mask=c_ok, other=0.0)
    a = gamma * rstd
    dot = tl.zeros((BLOCK_C,), dtype=acc_ty)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ok = c_ok[:, None] & (offs_k < K)[None, :]
        offs = offs_c[:, None] * K + offs_k[None, :]
        w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(acc_ty)
        gg = tl.load(gg_ptr + offs, mask=ok, other=0.0)
        dot += tl.sum(w * gg, axis=1)
        tl.store(wr_ptr + offs, w, mask=ok)
        tl.store(aw_ptr + offs, a[:, None] * w, mask=ok)
        tl.store(ag_ptr + offs, a[:, None] * gg, mask=ok)
    sum_gy = rstd * (dot - mean * sum_g)
    b = -a * rstd * sum_gy / n
    d = -a * sum_g / n - b * mean
    tl.store(sum_gy_ptr + offs_c, sum_gy, mask=c_ok)
    for k0 in range(0, K, BLOCK_K):  # [b * w | d], rows of K + 1 (w loaded again: wr's
        offs_k = k0 + tl.arange(0, BLOCK_K)  # values may sit in other threads' registers)
        ok = c_ok[:, None] & (offs_k < K)[None, :]
        w = tl.load(w_ptr + offs_c[:, None] * K + offs_k[None, :], mask=ok, other=0.0)
        w = w.to(acc_ty)
        tl.store(bwd_ptr + offs_c[:, None] * (K + 1) + offs_k[None, :], b[:, None] * w,
                 mask=ok)
    tl.store(bwd_ptr + offs_c * (K + 1) + K, d, mask=c_ok)


def last_bn_coefficients(
    weight: Tensor, dtype: torch.dtype, gg: Tensor, gamma: Tensor, mean: Tensor, rstd: Tensor,
    sum_g: Tensor, n: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(sum g * yhat (C,), w rounded, a * w, a * G (C, K each), [b * w | d] (C, K + 1)), all
    in the statistics' dtype (module doc). weight: the 1x1 conv's (C, K, 1, 1), any float
    dtype, rounded to `dtype` (the activations') first, by torch as the conv kernels round it;
    gg: G, (C, K, 1, 1) or (C, K)."""
    c, k = weight.shape[:2]
    acc = rstd.dtype
    w = weight.reshape(c, k).to(dtype).contiguous()  # rounded as the conv kernels' layout did
    gg = gg.reshape(c, k).contiguous()
    sum_gy = torch.empty(c, device=w.device, dtype=acc)
    wr, aw, ag = (torch.empty((c, k), device=w.device, dtype=acc) for _ in range(3))
    bwd = torch.empty((c, k + 1), device=w.device, dtype=acc)
    block_c = 32
    block_k = min(64, triton.next_power_of_2(k))
    run(_last_bn_coefficients_kernel, (cdiv(c, block_c),),
        w, gg, gamma, mean, rstd, sum_g, sum_gy, wr, aw, ag, bwd, n, c, k,
        BLOCK_C=block_c, BLOCK_K=block_k)
    return sum_gy, wr, aw, ag, bwd
