"""Pure-PyTorch reference ops: the ground truth every kernel is compared to, and the fallback.

Every function here is plain `torch` / `torch.nn.functional` so that autograd, every device,
every dtype and every memory format work. Tensors are (N, C, H, W) in logical shape; their
memory format (NCHW or channels_last) is whatever the caller passes and is preserved.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def conv_bn_act(
    x: Tensor,
    weight: Tensor,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    *,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: Optional[Tensor] = None,
    relu: bool = True,
    dilation: int = 1,
) -> Tensor:
    """out = act(BN(conv(x, weight)) + residual), the conv dilated by `dilation`.

    x: (N, C_in, H, W); weight: (C_out, C_in / groups, kh, kw); bn_*: (C_out,);
    residual: (N, C_out, H_out, W_out) or None; act is ReLU when `relu` else the identity.

    BN with `training=True` normalizes with the batch mean and biased variance over
    (N, H_out, W_out) and, when running stats are given, updates them in place as
    running = (1 - momentum) * running + momentum * batch (the variance term unbiased,
    multiplied by n / (n - 1)). With `training=False` it uses the running stats.
    `momentum` is the averaging factor of this one update (a caller implementing
    `momentum=None` passes 1 / num_batches_tracked).
    """
    y = conv2d(x, weight, None, stride, padding, groups, dilation)
    out = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    if residual is not None:
        out = out + residual
    return F.relu(out) if relu else out


def strided_1x1_on_cpu(x: Tensor, weight: Tensor, stride: int, padding: int) -> bool:
    """Whether conv(x, weight) is a 1x1 conv at a stride > 1 without padding on CPU, whose
    weight gradient ATen must not compute as such: oneDNN's (torch 2.11 to 2.14 on x86-64)
    is wrong in about 2% of calls for a channels_last fp32 x with a few input channels (2 to
    7 seen; 2 x 4 x 8 x 8 at stride 2, say, some entries off by their own size) and can
    corrupt the heap ("free(): invalid next size"): its AVX2 1x1 kernel copies the strided
    input into a workspace sized for a whole channel block (8) and writes past it when there
    are fewer channels (oneDNN issue 6035). At stride 1 there is no copy, and a 1x1 conv at
    stride s is the stride-1 conv of x[:, :, ::s, ::s]: the same products and sums. Only
    under 16 input channels (the block is 8 channels with AVX2, 16 with AVX-512): the
    ResNets' widths keep ATen's conv, and so torchvision's results bit for bit."""
    return (x.device.type == "cpu" and stride > 1 and padding == 0
            and tuple(weight.shape[2:]) == (1, 1) and weight.shape[1] < 16)


def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: int = 1,
           padding: int = 0, groups: int = 1, dilation: int = 1) -> Tensor:
    """F.conv2d(x, weight, bias, stride, padding, dilation, groups), a strided 1x1 conv on
    CPU computed as the stride-1 conv of the strided view of x (`strided_1x1_on_cpu`), so
    that autograd's weight gradient is right (and x's gradient keeps x's memory format)."""
    if strided_1x1_on_cpu(x, weight, stride, padding):
        x, stride = x[:, :, ::stride, ::stride], 1
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def bn_add_relu(
    y: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor] = None, relu: bool = True
) -> Tensor:
    """out = act(y * scale[c] + shift[c] + residual), the block end of an inference BN.

    y: (N, C, H, W); scale, shift: (C,) fp32; residual: y's shape or None. Computed in fp32
    (fp64 for fp64 inputs) and returned in y's dtype and memory format.
    """
    acc = torch.promote_types(y.dtype, torch.float32)
    out = y.to(acc) * scale.to(acc).view(1, -1, 1, 1) + shift.to(acc).view(1, -1, 1, 1)
    if residual is not None:
        out = out + residual.to(acc)
    if relu:
        out = F.relu(out)
    return out.to(y.dtype)


def batch_norm_affine(
    mean: Tensor, var: Tensor, bn_weight: Tensor, bn_bias: Tensor, eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(rstd, scale, shift) of a training BN with batch statistics (mean, biased var):
    rstd = 1 / sqrt(var + eps) and BN(y) = y * scale + shift, scale = gamma * rstd,
    shift = beta - mean * scale, in the statistics' dtype."""
    rstd = torch.rsqrt(var + eps)
    scale = bn_weight.to(rstd.dtype) * rstd
    return rstd, scale, bn_bias.to(rstd.dtype) - mean * scale


def bn_backward_affine(
    gamma: Tensor, mean: Tensor, rstd: Tensor, sum_g: Tensor, sum_gy: Tensor, n: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of a training BN (batch statistics over n rows) as a per-channel affine
    map: dy = a * g + b * y + d for g the gradient at its output, with yhat = (y - mean) *
    rstd, a = gamma * rstd, b = -a * rstd * sum(g * yhat) / n, d = -a * sum(g) / n - b * mean
    (the fused kernels compute the same from these inputs: `triton.eltwise.BnBackward`)."""
    a = gamma.to(rstd.dtype) * rstd
    b = -a * rstd * sum_gy / n
    return a, b, -a * sum_g / n - b * mean


def fold_bn(
    running_mean: Tensor, running_var: Tensor, bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor], eps: float,
) -> tuple[Tensor, Tensor]:
    """Eval BN as an affine map: BN(y) = y * scale + shift with
    scale = gamma / sqrt(running_var + eps) and shift = beta - running_mean * scale, in fp32
    (fp64 for fp64 statistics). Differentiable in gamma and beta."""
    acc = torch.promote_types(running_var.dtype, torch.float32)
    scale = torch.rsqrt(running_var.to(acc) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(acc)
    shift = -running_mean.to(acc) * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(acc)
    return scale, shift


def zero_pad_shortcut(x: Tensor, out_channels: int, stride: int) -> Tensor:
    """The paper's option-A shortcut: identity subsampled by `stride` (x[:, :, ::s, ::s]), with
    zero channels appended so channels [C_in, out_channels) are 0. No parameters."""
    in_channels = x.shape[1]
    if out_channels < in_channels:
        raise ValueError(
            f"zero_pad_shortcut: out_channels ({out_channels}) must be >= the input's "
            f"channels ({in_channels})"
        )
    if stride != 1:
        x = x[:, :, ::stride, ::stride]
    if out_channels == in_channels:
        return x
    return F.pad(x, (0, 0, 0, 0, 0, out_channels - in_channels))
