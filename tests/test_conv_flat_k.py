"""The forward and weight-gradient Triton kernels on both of their K layouts (`triton/conv.py`):
per tap over channel slices, and flattened (r, s, c) for inputs with few channels (the stem).
`FLAT_K_BELOW` picks the layout by C_in; each case runs with it forced either way, in fp64
against torch (a wrong tap, channel or padding mask shows as a large error), with and
without the prologue relu(x * scale + shift) applied on load."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_weight

from tests._backends import skip_without_triton

# (C_in, H, W, C_out, k, stride, padding)
CASES = [
    (3, 11, 10, 8, 7, 2, 3),   # the stem: 147 flattened K, 5 slices of 32
    (3, 6, 7, 5, 3, 1, 1),
    (16, 6, 6, 8, 3, 1, 1),    # a CIFAR net's first stage: K 144 (flat) or 9 half-empty taps
    (24, 5, 7, 6, 1, 2, 0),
    (5, 7, 5, 4, 2, 2, 0),
    (40, 5, 5, 4, 3, 2, 1),    # channels over one K slice: per tap by default
    (70, 4, 5, 3, 3, 1, 1),    # three slices per tap, the last ragged, wrapping to the next
]
LAYOUTS = {"flat": 10_000, "per_tap": 0}  # FLAT_K_BELOW forcing each layout


def _case_id(case):
    c_in, h, w, c_out, k, s, p = case
    return f"{c_in}x{h}x{w}-{c_out}-k{k}s{s}p{p}"


def _inputs(case, seed=0):
    c_in, h, w, c_out, k, stride, padding = case
    g = torch.Generator().manual_seed(seed)
    cl = torch.channels_last
    x = torch.randn(2, c_in, h, w, generator=g, dtype=torch.float64).contiguous(memory_format=cl)
    weight = torch.randn(c_out, c_in, k, k, generator=g, dtype=torch.float64)
    scale = torch.randn(c_in, generator=g, dtype=torch.float64)
    shift = torch.randn(c_in, generator=g, dtype=torch.float64)
    return x, weight, scale, shift


def _grad_output(x, weight, stride, padding, seed=1):
    """A random fp64 dy of the conv's output shape, channels_last."""
    out_shape = F.conv2d(x, weight, stride=stride, padding=padding).shape
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_shape, generator=g, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last)


def _prologue(x, scale, shift):
    return torch.relu(x * scale[None, :, None, None] + shift[None, :, None, None])


@pytest.fixture(params=list(LAYOUTS), ids=list(LAYOUTS))
def layout(request, monkeypatch):
    from fused_resnet.triton import config

    monkeypatch.setattr(config, "FLAT_K_BELOW", LAYOUTS[request.param])
    return request.param


@pytest.mark.parametrize("with_prologue", [False, True], ids=["plain", "prologue"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_on_both_k_layouts(case, with_prologue, layout):
    skip_without_triton()
    from fused_resnet.triton.config import flat_k
    from fused_resnet.triton.conv import conv_fwd

    assert flat_k(case[0]) == (layout == "flat")
    x, weight, scale, shift = _inputs(case)
    stride, padding = case[5], case[6]
    pro = {"in_scale": scale, "in_shift": shift, "in_relu": True} if with_prologue else {}
    out, _ = conv_fwd(x, weight, stride=stride, padding=padding, **pro)
    # The prologue is applied before zero padding: the padding stays zero.
    x_in = _prologue(x, scale, shift) if with_prologue else x
    expected = F.conv2d(x_in, weight, stride=stride, padding=padding)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("with_prologue", [False, True], ids=["plain", "prologue"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_weight_gradient_on_both_column_layouts(case, with_prologue, layout):
    skip_without_triton()
    from fused_resnet.triton.conv_bwd import conv_wgrad

    x, weight, scale, shift = _inputs(case)
    stride, padding = case[5], case[6]
    dy = _grad_output(x, weight, stride, padding)
    pro = {"in_scale": scale, "in_shift": shift, "in_relu": True} if with_prologue else {}
    dw = conv_wgrad(x, dy, weight.shape, stride=stride, padding=padding, split=2, **pro)
    x_in = _prologue(x, scale, shift) if with_prologue else x
    expected = conv2d_weight(x_in, weight.shape, dy, stride=stride, padding=padding)
    assert dw.shape == weight.shape
    torch.testing.assert_close(dw, expected, rtol=1e-10, atol=1e-10)


def test_the_stem_takes_flattened_k_and_wide_inputs_do_not():
    """Flat below the narrowest K slice / column block any config or PINNED can take."""
    skip_without_triton()
    from fused_resnet.triton.autotune import FWD_CONFIGS
    from fused_resnet.triton.config import FLAT_K_BELOW, PINNED, flat_k

    assert flat_k(3) and flat_k(16) and not flat_k(64)
    narrowest = min(min(c.kwargs["BLOCK_K"], c.kwargs["BLOCK_N"]) for c in FWD_CONFIGS)
    assert FLAT_K_BELOW <= min(narrowest, PINNED.block_k, PINNED.block_n)


# The inputs that take flattened K by default (C_in < FLAT_K_BELOW).
FLAT_CASES = [case for case in CASES if case[0] < 32]


@pytest.fixture
def gathered_in_registers(monkeypatch):
    """GATHER_IN_REGS forced on for every flattened conv: on a GPU only sm_90 builds in bf16 /
    fp16 with C_in odd take it (`config.gather_in_registers`), so the interpreter would never
    run its select or the weight gradient's transposed product without a prologue."""
    from fused_resnet.triton import conv, conv_wgrad
    from fused_resnet.triton.config import flat_k

    asked = []

    def forced(dtype, c_in, device):
        asked.append(c_in)
        return flat_k(c_in)

    monkeypatch.setattr(conv, "gather_in_registers", forced)
    monkeypatch.setattr(conv_wgrad, "gather_in_registers", forced)
    return asked


@pytest.mark.parametrize("case", FLAT_CASES, ids=_case_id)
def test_forward_with_the_gathered_tile_in_registers(case, gathered_in_registers):
    skip_without_triton()
    from fused_resnet.triton.conv import conv_fwd

    x, weight, _, _ = _inputs(case)
    stride, padding = case[5], case[6]
    out, _ = conv_fwd(x, weight, stride=stride, padding=padding)
    assert gathered_in_registers == [case[0]]
    expected = F.conv2d(x, weight, stride=stride, padding=padding)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", FLAT_CASES, ids=_case_id)
def test_weight_gradient_with_the_gathered_tile_in_registers(case, gathered_in_registers):
    """The product taken transposed (dw^T = x^T dy) with x only selected, not transformed."""
    skip_without_triton()
    from fused_resnet.triton.conv_bwd import conv_wgrad

    x, weight, _, _ = _inputs(case)
    stride, padding = case[5], case[6]
    dy = _grad_output(x, weight, stride, padding)
    for atomic in (True, False):
        dw = conv_wgrad(x, dy, weight.shape, stride=stride, padding=padding, split=2,
                        atomic=atomic)
        expected = conv2d_weight(x, weight.shape, dy, stride=stride, padding=padding)
        torch.testing.assert_close(dw, expected, rtol=1e-10, atol=1e-10)
    assert gathered_in_registers == [case[0]] * 2


def test_the_stem_in_bf16_with_the_gathered_tile_in_registers(gathered_in_registers):
    """The dtype the path is for: the forward's output is within a bf16 ulp (2^-7 relative:
    the interpreter's rounding to bf16 gives up to one, forced or not); the weight gradient
    sums exact bf16 products in fp32."""
    skip_without_triton()
    from fused_resnet.triton.conv import conv_fwd
    from fused_resnet.triton.conv_bwd import conv_wgrad

    x, weight, _, _ = _inputs(CASES[0])
    x, weight = x.bfloat16(), weight.bfloat16()
    out, _ = conv_fwd(x, weight, stride=2, padding=3)
    expected = F.conv2d(x.double(), weight.double(), stride=2, padding=3)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, rtol=2**-7, atol=1e-6)
    dy = torch.randn(out.shape, dtype=torch.float64).bfloat16().contiguous(
        memory_format=torch.channels_last)
    dw = conv_wgrad(x, dy, weight.shape, stride=2, padding=3, split=2)
    expected = conv2d_weight(x.double(), weight.shape, dy.double(), stride=2, padding=3)
    torch.testing.assert_close(dw.double(), expected, rtol=1e-5, atol=1e-5)
    assert gathered_in_registers == [3, 3]


def test_only_odd_2_byte_gathers_for_sm90_stay_in_registers(monkeypatch):
    from fused_resnet.triton import config

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    take, real_capability = config.gather_in_registers, config._capability
    monkeypatch.setattr(config, "_capability", lambda index: (9, 0))
    assert take(torch.bfloat16, 3, gpu) and take(torch.float16, 3, gpu)
    assert not take(torch.float32, 3, gpu)  # 4-byte runs: cp.async copies them
    assert not take(torch.bfloat16, 16, gpu)  # even C_in: runs of 4 bytes or more
    assert not take(torch.bfloat16, 33, gpu)  # not flattened
    assert not take(torch.bfloat16, 3, cpu)  # the interpreter
    for other in ((8, 0), (8, 9), (10, 0)):  # no wgmma (or not sm_90's)
        monkeypatch.setattr(config, "_capability", lambda index, cc=other: cc)
        assert not take(torch.bfloat16, 3, gpu)
    # ROCm: torch names its devices "cuda" too (an MI200 reports capability (9, 0))
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert real_capability.__wrapped__(0) is None  # the uncached function
    monkeypatch.setattr(config, "_capability", real_capability.__wrapped__)
    assert not take(torch.bfloat16, 3, gpu)
    # compiling without a GPU (`aot.compile_only`): its arch decides, on any device
    monkeypatch.setattr(config, "_compile_only_arch", 90)
    assert take(torch.bfloat16, 3, cpu)
    monkeypatch.setattr(config, "_compile_only_arch", 80)
    assert not take(torch.bfloat16, 3, gpu)
