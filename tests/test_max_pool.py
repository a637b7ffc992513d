"""`ops.max_pool2d` / `nn.FusedMaxPool2d` on the Triton kernels (`triton.pool`) against ATen's
max_pool2d: forward values, and the gradient routed exactly where ATen routes it (ties to the
window's first maximum, NaN to its last NaN, a window of -inf to its first pixel), over
kernel sizes, strides, paddings, layouts and dtypes; no window positions written in
inference; the custom ops' schema, fake kernels and autograd; argument errors."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from _backends import DEVICE, skip_without_triton

import fused_resnet as fr

CL = torch.channels_last
# (N, C, H, W), kernel, stride, padding: the stem's 3/2/1 on odd and even sizes, a C over one
# channel block (64) and a ragged one, windows that do not overlap (2/2/0) and that overlap
# more (3/1/1), a 5x5 window with padding 2.
CASES = [((2, 5, 9, 11), 3, 2, 1), ((1, 70, 8, 8), 3, 2, 1), ((2, 3, 7, 7), 2, 2, 0),
         ((1, 8, 6, 5), 3, 1, 1), ((1, 4, 10, 9), 5, 3, 2), ((3, 2, 3, 3), 3, 2, 1)]


def _case_id(case):
    return f"{'x'.join(map(str, case[0]))}-k{case[1]}s{case[2]}p{case[3]}"


def _pool(x, case, backend="triton"):
    return fr.ops.max_pool2d(x, case[1], case[2], case[3], backend=backend)


def _pair(x, case, dout):
    """(out, dx) of the fused pool and of ATen's, for the same x and dout."""
    results = []
    for fn in (lambda t: _pool(t, case), lambda t: F.max_pool2d(t, case[1], case[2], case[3])):
        leaf = x.detach().clone().requires_grad_()
        out = fn(leaf)
        out.backward(dout)
        results.append((out, leaf.grad))
    return results


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_and_gradient_equal_aten_with_ties(case, layout):
    """Integer-valued x with many ties (a ReLU's zeros and repeated values) and an
    integer-valued dout: the sums are exact, so the gradients must be equal bit for bit; a
    tie sent to another pixel than ATen's choice would show."""
    skip_without_triton()
    gen = torch.Generator().manual_seed(case[0][1])
    x = torch.randint(-3, 4, case[0], generator=gen).double().relu().to(DEVICE)
    x = x.contiguous(memory_format=CL) if layout == "channels_last" else x.contiguous()
    ref = F.max_pool2d(x, case[1], case[2], case[3])
    dout = torch.randint(1, 9, ref.shape, generator=gen).double().to(DEVICE)
    (out, dx), (ref_out, ref_dx) = _pair(x, case, dout)
    assert torch.equal(out, ref_out)
    assert torch.equal(dx, ref_dx)
    assert out.is_contiguous(memory_format=CL) == (layout == "channels_last")
    assert dx.is_contiguous(memory_format=CL) == (layout == "channels_last")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES[:3], ids=_case_id)
def test_random_values_in_each_dtype(case, dtype):
    """The values are ATen's exactly (a max rounds nothing); the gradient, up to four
    windows summed in fp32 and rounded once, is the fp64 gradient within that rounding and
    the fp32 sum's (ATen's bf16 / fp16 CPU kernel adds in the dtype, a rounding a term)."""
    skip_without_triton()
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(case[0], generator=gen).to(DEVICE, dtype).contiguous(memory_format=CL)
    dout = torch.randn(F.max_pool2d(x, case[1], case[2], case[3]).shape, generator=gen)
    (out, dx), (ref_out, _) = _pair(x, case, dout.to(DEVICE, dtype))
    (_, truth), _ = _pair(x.double(), case, dout.to(DEVICE, dtype).double())
    assert out.dtype == dtype and dx.dtype == dtype
    assert torch.equal(out, ref_out)
    # the fp32 sum of at most 4 terms: off by 3 fp32 roundings of their magnitudes at most
    atol = 3 * torch.finfo(torch.float32).eps * 4 * dout.abs().max().item()
    torch.testing.assert_close(dx.double(), truth, rtol=torch.finfo(dtype).eps, atol=atol)


def test_nan_and_infinite_windows_route_as_aten_does():
    """A NaN wins its window (and the last NaN takes the gradient); a window of -inf sends
    its gradient to its first pixel inside the input, not to the padding."""
    skip_without_triton()
    x = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    x[0, 0, 0:3, 0:3] = float("-inf")  # the first window: -inf and padding only
    x[0, 0, 1, 3] = float("nan")
    x[0, 0, 2, 4] = float("nan")  # two NaNs in one window
    x[0, 0, 4, 4] = float("inf")
    x = x.to(DEVICE).contiguous(memory_format=CL)
    case = ((1, 1, 5, 5), 3, 2, 1)
    dout = torch.arange(1.0, 10.0, dtype=torch.float64).view(1, 1, 3, 3).to(DEVICE)
    (out, dx), (ref_out, ref_dx) = _pair(x, case, dout)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(dx, ref_dx), (dx, ref_dx)


def test_inference_writes_no_window_positions_and_training_one_byte_each():
    """Without autograd the forward launch writes only the output; with it an int8 position
    per output element, which is all backward keeps (ATen: an int64 index, written in
    inference too, and x). Launches told apart by `triton.launch.counting_work`'s labels."""
    skip_without_triton()
    from fused_resnet.bench.timing import activation_bytes
    from fused_resnet.triton.launch import counting_work

    x = torch.randn(2, 8, 9, 9, device=DEVICE).contiguous(memory_format=CL)
    with torch.no_grad(), counting_work() as counts:
        fr.ops.max_pool2d(x, backend="triton")
    assert set(counts) == {"fr::max_pool_fwd"}
    leaf = x.clone().requires_grad_()
    with counting_work() as counts:
        fr.ops.max_pool2d(leaf, backend="triton")
    assert set(counts) == {"fr::max_pool_fwd write_arg"}
    pool = fr.nn.FusedMaxPool2d(backend="triton")
    assert activation_bytes(pool, lambda: pool(leaf)) == 2 * 8 * 5 * 5  # int8 positions


def test_the_custom_ops_pass_opcheck():
    skip_without_triton()
    from fused_resnet.ops.max_pool import max_pool, max_pool_backward

    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, device=DEVICE).requires_grad_()
    torch.library.opcheck(max_pool, (x, 3, 2, 1),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))
    out, arg = max_pool(x.detach(), 3, 2, 1)
    torch.library.opcheck(max_pool_backward, (torch.randn_like(out), arg, [2, 3, 7, 6], False,
                                              3, 2, 1),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_other_backends_run_atens_pool(backend, monkeypatch):
    """Only Triton has a pool of its own: the other backends call F.max_pool2d."""
    if backend == "cpu" and fr.backend.unavailable_reason("cpu", torch.device("cpu")):
        pytest.skip("needs the _C extension")
    calls = []
    monkeypatch.setattr(F, "max_pool2d", lambda *a, **k: calls.append(a) or torch.zeros(1))
    fr.ops.max_pool2d(torch.randn(1, 2, 5, 5), backend=backend)
    assert len(calls) == 1


def test_the_module_and_the_model_use_it():
    pool = fr.nn.FusedMaxPool2d(3, 2, 1, backend="reference")
    x = torch.randn(2, 4, 9, 9)
    assert torch.equal(pool(x), F.max_pool2d(x, 3, 2, 1))
    assert "backend='reference'" in repr(pool) and not list(pool.parameters())
    model = fr.models.resnet18(backend="reference")
    assert isinstance(model.maxpool, fr.nn.FusedMaxPool2d)
    assert fr.models.set_backend(model, "cpu").maxpool.backend == "cpu"
    assert set(model.state_dict()) == set(torchvision.models.resnet18().state_dict())


@pytest.mark.parametrize("kwargs, message", [
    ({"kernel_size": 0}, "kernel_size must be an int >= 1, got 0"),
    ({"kernel_size": 12}, "kernel_size must be in \\[1, 11\\], got 12"),
    ({"kernel_size": (3, 3)}, r"kernel_size must be an int >= 1, got \(3, 3\)"),
    ({"stride": 0}, "stride must be an int >= 1, got 0"),
    ({"stride": 1.5}, "stride must be an int >= 1, got 1.5"),
    ({"padding": 2}, "padding must be in \\[0, kernel_size // 2 = 1\\], got 2"),
    ({"backend": "gpu"}, "backend must be one of"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fr.ops.max_pool2d(torch.randn(1, 2, 5, 5), **kwargs)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="x must be 4-D"):
        fr.ops.max_pool2d(torch.randn(2, 5, 5))
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        fr.ops.max_pool2d(torch.ones(1, 1, 5, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="x's spatial size \\(1, 1\\) with padding 1 is "
                       "smaller than kernel_size \\(5\\)"):
        fr.ops.max_pool2d(torch.randn(1, 1, 1, 1), 5, 1, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_the_resnet_stem_pool_compiled(dtype):
    """The ResNet-50 stem's pool (64 channels at 112x112 -> 56x56) in compiled Triton: the
    ReLU's zeros make ties everywhere, and with small integer dout every gradient sum is exact
    in each dtype, so values and gradients must equal ATen's bit for bit."""
    case = ((8, 64, 112, 112), 3, 2, 1)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(case[0], generator=gen).relu().to(DEVICE, dtype)
    x = x.contiguous(memory_format=CL)
    dout = torch.randint(1, 5, (8, 64, 56, 56), generator=gen).to(DEVICE, dtype)
    (out, dx), (ref_out, ref_dx) = _pair(x, case, dout.contiguous(memory_format=CL))
    assert torch.equal(out, ref_out)
    assert torch.equal(dx, ref_dx)
