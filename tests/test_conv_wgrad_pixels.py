"""The weight gradient's walk over output pixels (`triton/conv_bwd.py`, `_conv_wgrad_kernel`):
each program divides its first BLOCK_K pixel indices into (img, oh, ow) once, then steps them
by BLOCK_K with carries. These cases put the output's width and height on every side of
BLOCK_K (32 under the pinned config the interpreter uses): rows shorter than a step (several
rows, or several images, per step), a row longer than a step, a row exactly one step, 1x1
outputs, in both column layouts (per tap, flattened for C_in < 32), each reduction cut into
several slices that start mid-row, in fp64 against torch (a wrong carry shows as a large
error); the slices added in a fixed order or by atomics, and through the autotuner, which
runs a kernel that adds into dw several times and must leave dw zeroed for the launch."""

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


def _wgrad_case(case, seed):
    """(x, dy, weight shape, conv arguments, torch's dw) in fp64, channels_last."""
    n, c_in, h, w, c_out, k, stride, padding = case
    g = torch.Generator().manual_seed(seed)
    cl = torch.channels_last
    x = torch.randn(n, c_in, h, w, generator=g, dtype=torch.float64).contiguous(memory_format=cl)
    ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    dy = torch.randn(n, c_out, ho, wo, generator=g, dtype=torch.float64).contiguous(
        memory_format=cl)
    expected = conv2d_weight(x, (c_out, c_in, k, k), dy, stride=stride, padding=padding)
    return x, dy, (c_out, c_in, k, k), dict(stride=stride, padding=padding), expected


@pytest.mark.parametrize(("split", "atomic"), [(1, False), (3, False), (7, False), (3, True),
                                               (7, True)],
                         ids=["1", "3", "7", "3-atomic", "7-atomic"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_wgrad_steps_through_every_pixel_once(case, split, atomic):
    skip_without_triton()
    from fused_resnet.triton.conv_bwd import conv_wgrad

    x, dy, shape, conv, expected = _wgrad_case(case, sum(case))
    dw = conv_wgrad(x, dy, shape, split=split, atomic=atomic, **conv)
    torch.testing.assert_close(dw, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("prologue", [False, True], ids=["plain_x", "prologue"])
@pytest.mark.parametrize("case", [CASES[1], (3, 40, 5, 5, 4, 1, 1, 0), (2, 36, 7, 6, 3, 1, 2, 0)],
                         ids=_case_id)
def test_wgrad_bn_grad_on_load_across_splits(case, prologue, split):
    """dy given as a BnGrad (a * dz * [z > 0] + b * y + d, which is d, not 0, where nothing
    was loaded) with and without the prologue relu(x * scale + shift) (relu(shift), not 0,
    where nothing was loaded): past a split's end and past the last pixel, one of the two
    tiles must still be zero (the kernel masks x, or dy where an unpadded prologue leaves x
    unmasked)."""
    skip_without_triton()
    from fused_resnet.reference import bn_backward_affine
    from fused_resnet.triton.conv_bwd import BnGrad, conv_wgrad
    from fused_resnet.triton.eltwise import BnBackward

    n, c_in, h, w, c_out, k, stride, padding = case
    g = torch.Generator().manual_seed(sum(case) + 1)
    cl = torch.channels_last
    f64 = torch.float64
    x = torch.randn(n, c_in, h, w, generator=g, dtype=f64).contiguous(memory_format=cl)
    ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    dz, z, y = (torch.randn(n, c_out, ho, wo, generator=g, dtype=f64).contiguous(
        memory_format=cl) for _ in range(3))
    bn = BnBackward(*(torch.randn(c_out, generator=g, dtype=f64) for _ in range(2)),
                    torch.rand(c_out, generator=g, dtype=f64) + 0.5,
                    *(torch.randn(c_out, generator=g, dtype=f64) * 20 for _ in range(2)), 29)
    scale = torch.randn(c_in, generator=g, dtype=f64)
    shift = torch.rand(c_in, generator=g, dtype=f64) + 0.5  # relu(shift) > 0: not masked by it
    pro = {"in_scale": scale, "in_shift": shift, "in_relu": True} if prologue else {}
    dw = conv_wgrad(x, BnGrad(dz, z, y, bn), (c_out, c_in, k, k), stride=stride,
                    padding=padding, split=split, atomic=split > 1, **pro)
    a, b, d = (t[None, :, None, None] for t in bn_backward_affine(*bn))
    dy = a * dz * (z > 0) + b * y + d
    x_in = torch.relu(x * scale[None, :, None, None] + shift[None, :, None, None]) if prologue \
        else x
    expected = conv2d_weight(x_in, (c_out, c_in, k, k), dy, stride=stride, padding=padding)
    torch.testing.assert_close(dw, expected, rtol=1e-10, atol=1e-10)


def test_wgrad_split_fills_the_gpu_for_few_output_tiles(monkeypatch):
    """On a GPU (not interpreting) the reduction is cut until ~WGRAD_PROGRAMS programs, at
    least WGRAD_MIN_ROWS pixels a slice, at most WGRAD_MAX_SPLIT slices: ResNet-50's stem
    (2 tiles at 128x128) gets 256 slices, not 64 (128 programs, under one wave)."""
    from fused_resnet.triton import config

    monkeypatch.setattr(config, "interpreting", lambda: False)
    stem = config.wgrad_tiles(64, 3, 7, 7)
    assert stem == 2  # 147 flattened columns: 2 blocks of 128
    assert config.wgrad_split(256 * 112 * 112, stem) == config.WGRAD_MAX_SPLIT
    layer4 = config.wgrad_tiles(512, 2048, 1, 1)  # 4 x 16 tiles
    split = config.wgrad_split(256 * 7 * 7, layer4)
    assert split * config.WGRAD_MIN_ROWS <= 256 * 7 * 7 and split * layer4 >= 2 * 132
    assert config.wgrad_tiles(64, 64, 3, 3) == 9  # per tap: 9 taps of one 128-column block
    assert config.wgrad_split(802816, 9) * 9 >= config.WGRAD_PROGRAMS
    assert config.wgrad_split(config.WGRAD_MIN_ROWS - 1, 1) == 1
    monkeypatch.setattr(config, "interpreting", lambda: True)
    assert config.wgrad_split(256 * 112 * 112, stem) == 1


def test_wgrad_slices_added_by_atomics_only_where_launches_are_tuned(monkeypatch):
    """Autotuned launches add the slices by atomics into one zeroed dw; where a config is
    pinned (deterministic mode, pin_config, the interpreter) each slice writes its own dw and
    they are summed in a fixed order: the same bits every run. Both equal torch's."""
    skip_without_triton()
    from fused_resnet.triton import config
    from fused_resnet.triton.conv_bwd import conv_wgrad

    monkeypatch.setattr(config, "_INTERPRETING", False)  # as compiled kernels see it
    monkeypatch.delenv("FUSED_RESNET_TRITON_PIN", raising=False)
    assert config.wgrad_atomic(3) and not config.wgrad_atomic(1)  # one slice: dw itself
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not config.wgrad_atomic(3)
    finally:
        torch.use_deterministic_algorithms(was)
    config.pin_config()
    try:
        assert not config.wgrad_atomic(3)
    finally:
        config.pin_config(None)
    monkeypatch.setattr(config, "_INTERPRETING", True)
    assert not config.wgrad_atomic(3)
    x, dy, shape, conv, expected = _wgrad_case(CASES[6], 7)
    dw = conv_wgrad(x, dy, shape, split=3, **conv)  # pinned here: the fixed order
    torch.testing.assert_close(dw, expected, rtol=1e-10, atol=1e-10)
    assert torch.equal(dw, conv_wgrad(x, dy, shape, split=3, **conv))


def test_wgrad_launch_that_tunes_adds_into_zeros(monkeypatch):
    """On a GPU the first launch per shape goes through Triton's autotuner, which runs the
    kernel once per candidate and repeatedly; with atomics each run adds into dw, so the
    autotuner must zero it before each run and after the last (`reset_to_zero`), or the
    gradient comes out several times too large. Driven here through the autotuner itself
    (the interpreter otherwise pins a config), with two candidates and a stand-in timer that
    runs each three times."""
    skip_without_triton()
    from fused_resnet.triton import conv_bwd, launch

    kernel = conv_bwd._conv_wgrad_kernel
    if not hasattr(kernel, "_do_bench"):
        pytest.skip("Triton < 3.3: the autotuner's timer is not replaceable")
    runs = []

    def timer(kernel_call, quantiles):
        for _ in range(3):
            kernel_call()
        runs.append(3)
        return [float(len(runs))] * len(quantiles)  # the first candidate wins

    small = [c for c in kernel.configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 8192]
    monkeypatch.setattr(kernel, "configs", small[:2])
    monkeypatch.setattr(kernel, "_do_bench", timer)
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(launch, "pinned_config", lambda: None)
    launch.clear_launch_cache()
    try:
        x, dy, shape, conv, expected = _wgrad_case(CASES[2], 5)
        dw = conv_bwd.conv_wgrad(x, dy, shape, split=3, atomic=True, **conv)
        assert len(runs) == 2  # it tuned
        torch.testing.assert_close(dw, expected, rtol=1e-10, atol=1e-10)
        again = conv_bwd.conv_wgrad(x, dy, shape, split=3, atomic=True, **conv)  # as chosen
        torch.testing.assert_close(again, expected, rtol=1e-10, atol=1e-10)
        assert len(runs) == 2
    finally:
        launch.clear_launch_cache()


@pytest.mark.parametrize(("split", "atomic"), [(1, False), (3, False), (3, True)],
                         ids=["1", "3", "3-atomic"])
@pytest.mark.parametrize("case", [(3, 40, 5, 5), (2, 7, 6, 9)], ids=str)
def test_wgrad_of_an_activation_with_itself_is_its_gram_matrix(case, split, atomic):
    """dy given as `Activated(y, scale, shift)` = relu(y * scale + shift) on load, x the same
    activation through the prologue: dw = a^T a over the pixels (what the bottleneck's last
    BN backward needs instead of its conv output); zero past a slice's end on both sides."""
    skip_without_triton()
    from fused_resnet.triton.conv_bwd import Activated, conv_wgrad

    n, c, h, w = case
    g = torch.Generator().manual_seed(sum(case))
    f64 = torch.float64
    cl = torch.channels_last
    y = torch.randn(n, c, h, w, generator=g, dtype=f64).contiguous(memory_format=cl)
    scale = torch.randn(c, generator=g, dtype=f64)
    shift = torch.rand(c, generator=g, dtype=f64)  # relu(shift) > 0 past the end: masked?
    gram = conv_wgrad(y, Activated(y, scale, shift), (c, c, 1, 1), stride=1, padding=0,
                      in_scale=scale, in_shift=shift, in_relu=True, split=split, atomic=atomic)
    a = torch.relu(y * scale[None, :, None, None] + shift[None, :, None, None])
    a = a.permute(0, 2, 3, 1).reshape(-1, c)
    torch.testing.assert_close(gram.reshape(c, c), a.T @ a, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="Activated"):
        from fused_resnet.triton.conv_bwd import conv_dgrad

        conv_dgrad(Activated(y, scale, shift), torch.ones(c, c, 1, 1, dtype=f64), y.shape,
                   stride=1, padding=0)


@pytest.mark.parametrize(("split", "atomic"), [(1, False), (3, False), (3, True)],
                         ids=["1", "3", "3-atomic"])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("case", [(3, 40, 7, 7), (2, 5, 6, 9)], ids=str)
def test_wgrad_of_a_strided_input_with_itself_is_its_gram_matrix(case, stride, split, atomic):
    """dy given as `Subsampled(x)`, x read at the conv's stride as the input tile is: dw =
    x_s^T x_s for x_s = x[:, :, ::stride, ::stride] (a projection's BN backward without y_d),
    odd sizes whose last row and column are read; x in NCHW or channels_last; a padded conv
    or a tensor of another shape is refused by name, as is a dgrad of it."""
    skip_without_triton()
    from fused_resnet.triton.conv_bwd import Subsampled, conv_dgrad, conv_wgrad

    n, c, h, w = case
    g = torch.Generator().manual_seed(sum(case) + stride)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    x_s = x[:, :, ::stride, ::stride].permute(0, 2, 3, 1).reshape(-1, c)
    for layout in (torch.channels_last, torch.contiguous_format):
        x = x.contiguous(memory_format=layout)
        gram = conv_wgrad(x, Subsampled(x), (c, c, 1, 1), stride=stride, padding=0,
                          split=split, atomic=atomic)
        torch.testing.assert_close(gram.reshape(c, c), x_s.T @ x_s, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="a Subsampled dy needs a tensor of x's shape"):
        conv_wgrad(x, Subsampled(x), (c, c, 1, 1), stride=stride, padding=1)
    with pytest.raises(ValueError, match="a Subsampled dy needs a tensor of x's shape"):
        conv_wgrad(x, Subsampled(x[:, :, 1:]), (c, c, 1, 1), stride=stride, padding=0)
    with pytest.raises(ValueError, match="not a Subsampled"):
        conv_dgrad(Subsampled(x), torch.ones(c, c, 1, 1, dtype=torch.float64), x.shape,
                   stride=1, padding=0)
