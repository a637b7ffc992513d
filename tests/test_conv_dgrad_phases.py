"""The Triton dgrad kernel split by stride phase (`triton/conv_bwd.py`) against torch's
conv2d_input, in fp64 (so any wrong tap, row or mask shows as a large error, not rounding):
strides 1-3 with kernels larger, equal to and smaller than the stride, paddings 0-3, odd and
even sizes, inputs whose last rows no output reads (dx = 0 there), dy given as a tensor or
implicitly (BnGrad), and the previous BN's backward sums of the epilogue (BnReduce)."""

import pytest
import torch
from torch.nn.grad import conv2d_input

from tests._backends import skip_without_triton

# (C_in, H, W, C_out, k, stride, padding)
CASES = [
    (3, 5, 5, 4, 3, 1, 1),
    (4, 8, 8, 5, 3, 2, 1),   # ResNet's stride-2 3x3
    (4, 7, 9, 3, 3, 2, 1),   # odd sizes: phase 1 has fewer rows than phase 0
    (5, 8, 6, 6, 1, 2, 0),   # the 1x1 stride-2 projection: 3 of 4 phases get no tap
    (3, 7, 7, 4, 1, 2, 0),
    (2, 11, 10, 3, 7, 2, 3),  # the stem
    (3, 9, 8, 2, 2, 2, 0),   # kernel = stride: one tap per phase
    (2, 10, 11, 3, 5, 3, 2),  # stride 3, 9 phases
    (3, 8, 8, 2, 3, 3, 0),   # the last input rows are read by no output
    (2, 6, 7, 3, 2, 3, 1),   # kernel < stride with padding
    (3, 3, 3, 2, 3, 2, 2),   # padding past the kernel's centre; a 2x2 output
    # C_out over one K slice (32 in the interpreter's pinned config): the slice wraps into
    # the next tap, the last slice of each tap ragged
    (3, 7, 6, 40, 3, 2, 1),
    (2, 5, 5, 70, 3, 1, 1),
    (3, 6, 5, 40, 1, 1, 0),
    (3, 5, 6, 4, 1, 2, 1),   # a padded 1x1: its one tap is still in range for every pixel
]


def _case_id(case):
    c_in, h, w, c_out, k, s, p = case
    return f"{c_in}x{h}x{w}-{c_out}-k{k}s{s}p{p}"


def _setup(case, batch=2):
    c_in, h, w, c_out, k, stride, padding = case
    g = torch.Generator().manual_seed(hash(case) % 2**31)
    x_shape = torch.Size((batch, c_in, h, w))
    weight = torch.randn(c_out, c_in, k, k, generator=g, dtype=torch.float64)
    ho = (h + 2 * padding - k) // stride + 1
    wo = (w + 2 * padding - k) // stride + 1
    dy = torch.randn(batch, c_out, ho, wo, generator=g, dtype=torch.float64)
    return x_shape, weight, dy.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_dgrad_matches_conv2d_input(case):
    skip_without_triton()
    from fused_resnet.triton.conv_bwd import conv_dgrad

    x_shape, weight, dy = _setup(case)
    stride, padding = case[5], case[6]
    dx = conv_dgrad(dy, weight, x_shape, stride=stride, padding=padding)
    expected = conv2d_input(x_shape, weight, dy, stride=stride, padding=padding)
    assert dx.shape == x_shape and dx.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(dx, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[7], CASES[11], CASES[13], CASES[14]],
                         ids=_case_id)
def test_dgrad_bn_grad_on_load_and_reduce_epilogue(case):
    """dy = a * (dz * [z > 0]) + b * y + d built on load, (a, b, d) computed in the kernel from
    the BN's statistics and sums, and the epilogue's sums for the BN + ReLU that made the
    input: sum g and sum g * yhat, g = dx * [y_in * scale + shift > 0]."""
    skip_without_triton()
    from fused_resnet.reference import bn_backward_affine
    from fused_resnet.triton.conv_bwd import BnGrad, BnReduce, conv_dgrad
    from fused_resnet.triton.eltwise import BnBackward

    x_shape, weight, dz = _setup(case)
    stride, padding = case[5], case[6]
    g = torch.Generator().manual_seed(7)
    c_out, c_in = weight.shape[:2]
    cl = torch.channels_last
    z = torch.randn(dz.shape, generator=g, dtype=torch.float64).contiguous(memory_format=cl)
    y = torch.randn(dz.shape, generator=g, dtype=torch.float64).contiguous(memory_format=cl)
    bn = BnBackward(*(torch.randn(c_out, generator=g, dtype=torch.float64) for _ in range(2)),
                    torch.rand(c_out, generator=g, dtype=torch.float64) + 0.5,
                    *(torch.randn(c_out, generator=g, dtype=torch.float64) * 50
                      for _ in range(2)), 37)
    a, b, d = bn_backward_affine(*bn)
    y_in = torch.randn(x_shape, generator=g, dtype=torch.float64).contiguous(memory_format=cl)
    scale, shift, mean = (torch.randn(c_in, generator=g, dtype=torch.float64) for _ in range(3))
    rstd = torch.rand(c_in, generator=g, dtype=torch.float64) + 0.5

    dx, (sum_g, sum_gy) = conv_dgrad(BnGrad(dz, z, y, bn), weight, x_shape, stride=stride,
                                     padding=padding,
                                     reduce=BnReduce(y_in, scale, shift, mean, rstd))

    per_channel = lambda t: t[None, :, None, None]  # noqa: E731
    dy = per_channel(a) * dz * (z > 0) + per_channel(b) * y + per_channel(d)
    expected = conv2d_input(x_shape, weight, dy, stride=stride, padding=padding)
    torch.testing.assert_close(dx, expected, rtol=1e-10, atol=1e-10)
    g_in = expected * (y_in * per_channel(scale) + per_channel(shift) > 0)
    yhat = (y_in - per_channel(mean)) * per_channel(rstd)
    torch.testing.assert_close(sum_g, g_in.sum((0, 2, 3)), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sum_gy, (g_in * yhat).sum((0, 2, 3)), rtol=1e-10, atol=1e-10)


def test_dgrad_with_many_row_blocks_per_phase():
    """More slots per phase than one BLOCK_M tile (the interpreter's pinned config), so the
    phase-local row index and the per-phase statistics groups both span several programs."""
    skip_without_triton()
    from fused_resnet.triton.conv_bwd import BnReduce, conv_dgrad

    case = (2, 21, 19, 3, 3, 2, 1)
    x_shape, weight, dy = _setup(case, batch=3)
    g = torch.Generator().manual_seed(3)
    y_in = torch.randn(x_shape, generator=g, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last)
    ones, zeros = torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    dx, (sum_g, sum_gy) = conv_dgrad(dy, weight, x_shape, stride=2, padding=1,
                                     reduce=BnReduce(y_in, ones, zeros, zeros, ones))
    expected = conv2d_input(x_shape, weight, dy, stride=2, padding=1)
    torch.testing.assert_close(dx, expected, rtol=1e-10, atol=1e-10)
    g_in = expected * (y_in > 0)
    torch.testing.assert_close(sum_g, g_in.sum((0, 2, 3)), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sum_gy, (g_in * y_in).sum((0, 2, 3)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_dgrad_reduces_the_activation_too_with_a_residual(dtype):
    """reduce_act: beside the BN backward sums, sum relu(y * scale + shift) per channel (the
    activation, rounded to y's dtype as the conv prologue rounds it), over several row
    blocks, with a residual added first (the bottleneck's last BN backward without y3)."""
    skip_without_triton()
    from fused_resnet.triton.conv_bwd import BnReduce, conv_dgrad

    g = torch.Generator().manual_seed(11)
    cl = torch.channels_last
    n, c_in, c_out, h, w = 3, 6, 5, 9, 7
    weight = torch.randn(c_out, c_in, 1, 1, generator=g, dtype=torch.float64)
    dy, res = (torch.randn(n, c, h, w, generator=g, dtype=torch.float64).to(dtype)
               .contiguous(memory_format=cl) for c in (c_out, c_in))
    y = torch.randn(n, c_in, h, w, generator=g, dtype=torch.float64).to(dtype).contiguous(
        memory_format=cl)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale, shift, mean = (torch.randn(c_in, generator=g, dtype=torch.float64).to(acc)
                          for _ in range(3))
    rstd = (torch.rand(c_in, generator=g, dtype=torch.float64) + 0.5).to(acc)
    dx, (sum_g, sum_gy, sum_act) = conv_dgrad(
        dy, weight, y.shape, stride=1, padding=0, residual=res, reduce_act=True,
        reduce=BnReduce(y, scale, shift, mean, rstd))
    expected = conv2d_input(y.shape, weight, dy.double(), stride=1, padding=0) + res.double()
    tol = 1e-10 if dtype == torch.float64 else 2e-2
    torch.testing.assert_close(dx.double(), expected, rtol=tol, atol=tol)
    v = y.to(acc) * scale[None, :, None, None] + shift[None, :, None, None]
    act = torch.relu(v).to(dtype).double()
    keep = v > 0
    yhat = (y.double() - mean.double()[None, :, None, None]) * rstd.double()[None, :, None, None]
    # bf16: each activation rounded (the interpreter's cast truncates: up to 2^-8 relative)
    tol = 1e-10 if dtype == torch.float64 else 1e-2
    torch.testing.assert_close(sum_act.double(), act.sum((0, 2, 3)), rtol=tol, atol=tol)
    torch.testing.assert_close(sum_g.double(), (dx.double() * keep).sum((0, 2, 3)),
                               rtol=tol, atol=tol)
    torch.testing.assert_close(sum_gy.double(), (dx.double() * keep * yhat).sum((0, 2, 3)),
                               rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="reduce_act needs reduce"):
        conv_dgrad(dy, weight, y.shape, stride=1, padding=0, reduce_act=True)


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[7], CASES[13]], ids=_case_id)
@pytest.mark.parametrize("res_dtype", [torch.float64, torch.float32])
def test_dgrad_adds_a_residual_gradient_in_its_epilogue(case, res_dtype):
    """dx = conv2d_input(dy) + residual, the residual (another path's gradient at x, in any
    float dtype, any layout) added before dx is written: on every pixel, also those of the
    phases that get no tap (1x1 stride 2: dx = residual there); its shape is checked."""
    skip_without_triton()
    from fused_resnet.triton.conv_bwd import conv_dgrad

    x_shape, weight, dy = _setup(case)
    stride, padding = case[5], case[6]
    residual = torch.randn(x_shape, dtype=res_dtype)  # NCHW: laid out by the call
    dx = conv_dgrad(dy, weight, x_shape, stride=stride, padding=padding, residual=residual)
    expected = conv2d_input(x_shape, weight, dy, stride=stride, padding=padding) + residual
    assert dx.dtype == dy.dtype and dx.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(dx, expected, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        conv_dgrad(dy, weight, x_shape, stride=stride, padding=padding,
                   residual=residual[:, :1])


@pytest.mark.parametrize("case", [CASES[3], CASES[4], CASES[13], (4, 9, 8, 3, 1, 3, 0)],
                         ids=_case_id)
@pytest.mark.parametrize("with_residual", [True, False], ids=["res", "no_res"])
def test_dgrad_adds_a_tap_residual_where_the_taps_land(case, with_residual):
    """tap_residual t (dy's pixels, x's channels; 1x1 convs without padding): dx =
    conv2d_input(dy) (+ residual) with t added at the strided pixels only,
    dx[:, :, ::s, ::s] += t (a projection's gradient without y_d); odd sizes, whose last
    row and column of phase 0 still get a tap, and stride 3. Other kernels, a padding or a
    wrong shape are refused by name."""
    skip_without_triton()
    from fused_resnet.triton.conv_bwd import conv_dgrad

    x_shape, weight, dy = _setup(case)
    stride = case[5]
    g = torch.Generator().manual_seed(5)
    t = torch.randn(dy.shape[0], x_shape[1], *dy.shape[2:], generator=g, dtype=torch.float64)
    residual = torch.randn(x_shape, generator=g, dtype=torch.float64) if with_residual else None
    dx = conv_dgrad(dy, weight, x_shape, stride=stride, padding=0, residual=residual,
                    tap_residual=t)
    expected = conv2d_input(x_shape, weight, dy, stride=stride, padding=0)
    if with_residual:
        expected += residual
    expected[:, :, ::stride, ::stride] += t
    torch.testing.assert_close(dx, expected, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="tap_residual must have shape"):
        conv_dgrad(dy, weight, x_shape, stride=stride, padding=0, tap_residual=t[:, 1:])
    x3, w3, dy3 = _setup(CASES[1])
    with pytest.raises(ValueError, match="tap_residual needs a 1x1 conv without padding"):
        conv_dgrad(dy3, w3, x3, stride=2, padding=1, tap_residual=dy3[:, :4])


def test_the_conv_loops_refuse_a_relu_mask_given_as_bits():
    """The conv loops read [z > 0] from z or recompute it from (scale, shift); the packed
    bits (`eltwise.bn_act_fwd_bits`) are for the elementwise kernels: a BnGrad holding them
    is an error naming the field, not a mask silently skipped."""
    skip_without_triton()
    from fused_resnet.triton.conv_bwd import BnGrad, conv_dgrad, conv_wgrad
    from fused_resnet.triton.eltwise import BnBackward, pack_relu_bits

    x_shape, weight, dy = _setup(CASES[1])
    c = dy.shape[1]
    ones = torch.ones(c, dtype=dy.dtype)
    grad = BnGrad(dy, pack_relu_bits(dy), dy, BnBackward(ones, ones, ones, ones, ones, 4))
    with pytest.raises(ValueError, match="BnGrad.z: the conv loops take the ReLU mask"):
        conv_dgrad(grad, weight, x_shape, stride=CASES[1][5], padding=CASES[1][6])
    with pytest.raises(ValueError, match="BnGrad.z: the conv loops take the ReLU mask"):
        conv_wgrad(torch.randn(x_shape, dtype=dy.dtype), grad, weight.shape,
                   stride=CASES[1][5], padding=CASES[1][6])


@pytest.mark.parametrize("stride", [1, 2, 3, 4])
def test_every_phase_tapped_is_the_phase_rule(stride):
    """`every_phase_tapped` (which lets the dgrad's loop run max(n, 1) steps, `k_steps`)
    against counting each phase's taps, for every padding: never true where a phase has
    none (it would run a step its loads do not mask)."""
    pytest.importorskip("triton")
    from fused_resnet.triton.conv_bwd import every_phase_tapped
    from fused_resnet.triton.dot_work import ConvShape, _phase_taps

    for k in range(1, 8):
        for dilation in range(1, 5):
            for padding in range(0, 4):
                s = ConvShape(1, 1, 9, 9, 1, k, stride, padding, dilation)
                tapped = all(_phase_taps(s, phase) for phase in range(stride))
                assert every_phase_tapped(k, k, dilation, stride) == tapped, (k, dilation,
                                                                                padding)
    assert not every_phase_tapped(3, 1, 1, 2)  # rows tapped, columns not
