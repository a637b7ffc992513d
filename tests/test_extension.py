"""fused_resnet._C: its bn_add_relu op against the reference, opcheck, and what was built."""

import os
import subprocess

import pytest
import torch

from fused_resnet import ops, reference
from fused_resnet.backend import load_extension, unavailable_reason

ext = load_extension()
pytestmark = pytest.mark.skipif(ext is None, reason="fused_resnet._C is not built")

NVCC = "/usr/local/cuda/bin/nvcc"


def _nvcc_matches_torch() -> bool:
    """nvcc's CUDA major is torch's: the condition (beside FORCE / SKIP) of setup.py's CUDA part."""
    if not os.path.exists(NVCC) or torch.version.cuda is None:
        return False
    out = subprocess.run([NVCC, "--version"], capture_output=True, text=True).stdout
    return f"release {torch.version.cuda.split('.')[0]}." in out


CUDA_REQUESTED = os.environ.get("FUSED_RESNET_SKIP_CUDA", "0") != "1" and (
    os.environ.get("FUSED_RESNET_FORCE_CUDA") == "1" or _nvcc_matches_torch()
)


def _inputs(dtype, channels_last, residual, device="cpu"):
    y = torch.randn(2, 8, 5, 3, device=device).to(dtype)
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    scale = torch.rand(8, device=device) + 0.5
    shift = torch.randn(8, device=device)
    r = torch.randn(2, 8, 5, 3, device=device).to(dtype) if residual else None
    return y, scale, shift, r


LAYOUTS = [(False, False, True), (True, True, True), (False, True, False), (True, False, False)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TRITON_ON_CPU = unavailable_reason("triton", torch.device("cpu"))  # None: the interpreter runs


@pytest.mark.parametrize("backend, dtype, channels_last, residual, relu", [
    pytest.param(backend, dtype, *layout, marks=pytest.mark.skipif(
        backend == "triton" and TRITON_ON_CPU is not None, reason=str(TRITON_ON_CPU)))
    for backend in ("cpu", "triton") for dtype in DTYPES for layout in LAYOUTS
])
def test_kernels_match_reference(backend, dtype, channels_last, residual, relu):
    y, scale, shift, r = _inputs(dtype, channels_last, residual)
    out = ops.bn_add_relu(y, scale, shift, r, relu, backend=backend)
    expected = reference.bn_add_relu(y, scale, shift, r, relu)
    assert out.dtype == dtype
    assert out.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # The C++ kernel rounds as the reference does; the Triton interpreter may round a
    # half-precision result the other way (one ulp).
    one_ulp = backend == "triton" and dtype in (torch.float16, torch.bfloat16)
    rtol = torch.finfo(dtype).eps if one_ulp else 0
    torch.testing.assert_close(out, expected, rtol=rtol,
                               atol=0 if dtype == torch.float64 else 1e-6)


def test_cpu_kernel_takes_non_contiguous_input():
    y = torch.randn(2, 8, 6, 6)[:, :, ::2, 1:]
    scale, shift = torch.rand(8), torch.randn(8)
    torch.testing.assert_close(ops.bn_add_relu(y, scale, shift, backend="cpu"),
                               reference.bn_add_relu(y, scale, shift))


@pytest.mark.parametrize("residual", [False, True])
def test_opcheck(residual):
    y, scale, shift, r = _inputs(torch.float32, True, residual)
    torch.library.opcheck(torch.ops.fused_resnet.bn_add_relu.default, (y, scale, shift, r, True))


BAD_ARGS = [
    (lambda y, s, b, r: (y[0], s, b, r), "4-D", "4-D"),
    (lambda y, s, b, r: (y, s[:4], b, r), "scale must have shape", "scale must be float32"),
    (lambda y, s, b, r: (y, s, b.double(), r), "float32", "shift must be float32"),
    (lambda y, s, b, r: (y, s, b, r[:, :4]), "residual must have y's shape",
     "residual must match y"),
    (lambda y, s, b, r: (y, s, b, r.double()), "residual dtype", "residual must match y"),
]


@pytest.mark.parametrize("args, cpp_message, py_message", BAD_ARGS)
def test_bad_arguments_are_named_by_the_op_and_the_kernel(args, cpp_message, py_message):
    y, scale, shift, r = _inputs(torch.float32, False, True)
    with pytest.raises(ValueError, match=py_message):
        ops.bn_add_relu(*args(y, scale, shift, r), backend="cpu")
    with pytest.raises(RuntimeError, match=cpp_message):
        torch.ops.fused_resnet.bn_add_relu(*args(y, scale, shift, r), True)


@pytest.mark.parametrize("op", ["bn_add_relu", "bn_stats", "bn_act_backward"])
def test_extension_registers_cuda_kernels_when_cuda_was_requested(op):
    for key in ("CPU", "CUDA"):
        has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_resnet::{op}", key)
        assert has_kernel == (key == "CPU" or ext.has_cuda_kernels()), key
    if CUDA_REQUESTED and torch.version.cuda is not None:
        assert ext.has_cuda_kernels(), "nvcc of torch's CUDA major was found, _C has no CUDA"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_kernel_matches_reference(dtype, channels_last):
    y, scale, shift, r = _inputs(dtype, channels_last, True, device="cuda")
    out = ops.bn_add_relu(y, scale, shift, r, backend="cuda")
    torch.testing.assert_close(out, reference.bn_add_relu(y, scale, shift, r))
