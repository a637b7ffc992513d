"""Rules shared by every op: the output follows the input's layout; per-channel statistics and
the math are fp32, fp64 for fp64 activations."""

from __future__ import annotations

import torch
from torch import Tensor


def check_int(name: str, value, minimum: int) -> None:
    """An int argument (a bool or a float, a tuple or a tensor is not one) of at least
    `minimum`; else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_flags(**flags) -> None:
    """Bool arguments (`relu`, `training`): True or False, not None or 0 (which a fused
    kernel would read as False, where torch's batch_norm refuses None); else a ValueError
    naming the first that is not."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")


def output_memory_format(x: Tensor) -> torch.memory_format:
    """channels_last iff x is stored NHWC and not (also) NCHW-contiguous."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def conv_output_shape(x: Tensor, weight: Tensor, stride: int, padding: int,
                      dilation: int = 1) -> tuple[int, ...]:
    """(N, C_out, Ho, Wo) of the conv: Ho = floor((H + 2p - d (kh - 1) - 1) / s) + 1."""
    return conv_output_size(x.shape, weight.shape, stride, padding, dilation)


def conv_output_size(x_shape, weight_shape, stride: int, padding: int,
                     dilation: int = 1) -> tuple[int, ...]:
    """`conv_output_shape` from the shapes alone."""
    n, _, h, w = x_shape
    c_out, _, kh, kw = weight_shape
    return (n, c_out, (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1,
            (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1)


def conv_dilations(dilations, count: int) -> list[int]:
    """A block's per-conv dilations as a list: `dilations`, or 1 for each of its `count`
    convs where None is given (the block ops' default)."""
    return [1] * count if dilations is None else list(dilations)


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of per-channel stats and BN math for activations of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def bn_params(bn_weight: Tensor | None, bn_bias: Tensor | None, channels: int,
              like: Tensor) -> tuple[Tensor, Tensor]:
    """(gamma, beta) of a BN, the identity's (ones, zeros) in `stat_dtype` on like's device
    where it has no affine parameters."""
    dtype = stat_dtype(like.dtype)
    return (bn_weight if bn_weight is not None else like.new_ones(channels, dtype=dtype),
            bn_bias if bn_bias is not None else like.new_zeros(channels, dtype=dtype))


def inference_weight(weight: Tensor, kernels: str) -> Tensor:
    """`weight` (C_out, C_in, kh, kw) stored the way `kernels` read it, same shape and values,
    for a weight laid out once and used by many calls (a folded inference weight): for
    "triton" in the implicit GEMM's operand order (`triton.gemm_layout.gemm_ordered`), so that each
    conv finds it as a view instead of copying it, 53 copies per ResNet-50 call; for ATen's
    convs (cuDNN, oneDNN) as it is."""
    if kernels != "triton":
        return weight
    from fused_resnet.triton.gemm_layout import gemm_ordered  # Triton is installed: chosen

    return gemm_ordered(weight)
