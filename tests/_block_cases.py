"""The blocks the block-op tests run (`fused_resnet::block_train` and
`ops.residual_block_eval`): small shapes of every kind, and their arguments on DEVICE."""

import pytest
import torch
from _backends import DEVICE, NATIVE

from fused_resnet.backend import unavailable_reason

# (input channels, [(c_out, kernel, stride, padding[, dilation]) of the main path, then the
#  projection], shortcut, shortcut stride)
BLOCKS = {
    "basic identity": (8, [(8, 3, 1, 1), (8, 3, 1, 1)], "identity", 1),
    "basic option A": (4, [(8, 3, 2, 1), (8, 3, 1, 1)], "zero_pad", 2),
    # on Triton both backward without the projection's y_d (not kept), and the bottleneck
    # without y3
    "basic projection": (4, [(8, 3, 2, 1), (8, 3, 1, 1), (8, 1, 2, 0)], "projection", 2),
    "bottleneck projection": (8, [(4, 1, 1, 0), (4, 3, 2, 1), (16, 1, 1, 0), (16, 1, 2, 0)],
                              "projection", 2),
    "bottleneck projection stride 1": (8, [(4, 1, 1, 0), (4, 3, 1, 1), (16, 1, 1, 0),
                                           (16, 1, 1, 0)], "projection", 1),
    # its last conv is 1x1: on Triton its backward does without y3 (not kept), with or without
    # x's gradient
    "bottleneck identity": (16, [(4, 1, 1, 0), (4, 3, 1, 1), (16, 1, 1, 0)], "identity", 1),
    "plain": (4, [(8, 3, 1, 1), (8, 3, 1, 1)], "none", 1),
    # a user's plain bottleneck whose last 1x1 conv pads (z is 8x8 for a 6x6 x): on Triton its
    # y3 is written and kept, the backward without y3 assuming no padding
    "bottleneck plain padded 1x1": (8, [(4, 1, 1, 0), (4, 3, 1, 1), (16, 1, 1, 1)], "none", 1),
    # torchvision's dilated bottlenecks (replace_stride_with_dilation): the 3x3 dilated and
    # padded by 2; the first block of a stage that follows a strided one keeps the stride
    "bottleneck dilated": (16, [(4, 1, 1, 0), (4, 3, 1, 2, 2), (16, 1, 1, 0)], "identity", 1),
    "bottleneck projection dilated stride 2": (
        8, [(4, 1, 1, 0), (4, 3, 2, 2, 2), (16, 1, 1, 0), (16, 1, 2, 0)], "projection", 2),
}


def kernels_or_skip(kernels):
    reason = unavailable_reason("triton" if kernels == "triton" else NATIVE, torch.device(DEVICE))
    if reason is not None:
        pytest.skip(reason)


def block_args(name):
    c_in, convs, shortcut, shortcut_stride = BLOCKS[name]
    x = torch.randn(2, c_in, 6, 6, device=DEVICE)
    weights, inp = [], c_in
    for i, (c_out, k, *_) in enumerate(convs):
        source = c_in if shortcut == "projection" and i == len(convs) - 1 else inp
        weights.append((torch.randn(c_out, source, k, k, device=DEVICE) * 0.3).requires_grad_())
        inp = c_out
    gammas = [(torch.rand(w.shape[0], device=DEVICE) + 0.5).requires_grad_() for w in weights]
    betas = [torch.randn(w.shape[0], device=DEVICE).requires_grad_() for w in weights]
    return (x.requires_grad_(), weights, gammas, betas, [c[2] for c in convs],
            [c[3] for c in convs], [c[4] if len(c) > 4 else 1 for c in convs],
            [1e-5] * len(convs), shortcut, shortcut_stride)
