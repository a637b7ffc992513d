"""The weight gradient's walk over output pixels (`triton/conv_bwd.py`, `_conv_wgrad_kernel`):
each program divides its first BLOCK_K pixel indices into (img, oh, ow) once, then steps them
by BLOCK_K with carries. These cases put the output's width and height on every side of
BLOCK_K (32 under the pinned config the interpreter uses): rows shorter than a step (several
rows, or several images, per step), a row longer than a step, a row exactly one step, 1x1
outputs, in both column layouts (per tap, flattened for C_in < 32), each reduction cut into
several slices that start mid-row, in fp64 against torch (a wrong carry shows as a large
error)."""

import pytest
import torch
from torch.nn.grad import conv2d_weight

from tests._backends import skip_without_triton

# (N, C_in, H, W, C_out, k, stride, padding): the output is (Ho, Wo)
CASES = [
    (3, 4, 3, 5, 3, 3, 1, 1),     # 3x5 outputs: two images and more per step of 32
    (2, 4, 7, 7, 2, 3, 1, 1),     # 7x7: 4 rows and 4 pixels per step, the height wraps
    (2, 3, 2, 40, 2, 1, 1, 0),    # rows of 40: a step within a row, or across two
    (2, 33, 3, 32, 2, 1, 1, 0),   # rows of exactly one step; per-tap columns
    (5, 33, 3, 3, 3, 3, 2, 1),    # 2x2 outputs: 8 images per step
    (40, 4, 1, 1, 2, 1, 1, 0),    # 1x1 outputs: 32 images per step
    (2, 33, 13, 11, 3, 3, 2, 1),  # stride 2, 7x6 outputs
]


def _case_id(case):
    n, c_in, h, w, c_out, k, s, p = case
    return f"n{n}-{c_in}x{h}x{w}-{c_out}-k{k}s{s}p{p}"


@pytest.mark.parametrize("split", [1, 3, 7])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_wgrad_steps_through_every_pixel_once(case, split):
    skip_without_triton()
    from fused_resnet.triton.conv_bwd import conv_wgrad

    n, c_in, h, w, c_out, k, stride, padding = case
    g = torch.Generator().manual_seed(sum(case))
    cl = torch.channels_last
    x = torch.randn(n, c_in, h, w, generator=g, dtype=torch.float64).contiguous(memory_format=cl)
    ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    dy = torch.randn(n, c_out, ho, wo, generator=g, dtype=torch.float64).contiguous(
        memory_format=cl)
    dw = conv_wgrad(x, dy, (c_out, c_in, k, k), stride=stride, padding=padding, split=split)
    expected = conv2d_weight(x, (c_out, c_in, k, k), dy, stride=stride, padding=padding)
    torch.testing.assert_close(dw, expected, rtol=1e-10, atol=1e-10)
