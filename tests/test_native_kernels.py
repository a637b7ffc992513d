"""The `_C` BN kernels (bn_stats, bn_act_backward) against fp64 autograd, opcheck and errors."""

import pytest
import torch
import torch.nn.functional as F
from _backends import DEVICE, NATIVE

from fused_resnet.backend import unavailable_reason

REASON = unavailable_reason(NATIVE, torch.device(DEVICE))
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")
OPS = torch.ops.fused_resnet

# (N, C, H, W): C and H*W below, at and above the vector width, odd sizes for the tails.
SHAPES = [(2, 3, 5, 7), (4, 16, 4, 4), (3, 37, 3, 3), (2, 8, 1, 1), (1, 64, 9, 11)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
CASES = [(shape, dtype, channels_last) for i, shape in enumerate(SHAPES)
         for j, dtype in enumerate(DTYPES) for channels_last in ((i + j) % 2 == 0,)]


def _layout(t, channels_last):
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t.contiguous()


def _tolerance(dtype):
    return {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)


@pytest.mark.parametrize("shape, dtype, channels_last", CASES)
def test_bn_stats_match_fp64(shape, dtype, channels_last):
    y = _layout((torch.randn(shape, dtype=torch.float64) * 3 + 2).to(dtype), channels_last)
    mean, var = OPS.bn_stats(y.to(DEVICE))
    assert mean.dtype == var.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    y64 = y.double()
    tol = 1e-12 if dtype == torch.float64 else 1e-5  # exact inputs, fp32 math
    torch.testing.assert_close(mean.cpu().double(), y64.mean(dim=(0, 2, 3)), rtol=tol, atol=tol)
    torch.testing.assert_close(var.cpu().double(), y64.var(dim=(0, 2, 3), unbiased=False),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("channels_last", [False, True])
def test_bn_stats_of_large_mean_values_and_non_contiguous_input(channels_last):
    base = torch.randn(4, 8, 12, 10, dtype=torch.float64) + 1e4
    y = _layout(base.float(), channels_last)[:, :, ::2, 1:]  # a strided view
    mean, var = OPS.bn_stats(y.to(DEVICE))
    y64 = y.double()
    torch.testing.assert_close(var.cpu().double(), y64.var(dim=(0, 2, 3), unbiased=False),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mean.cpu().double(), y64.mean(dim=(0, 2, 3)), rtol=1e-6, atol=1e-3)


def _reference_backward(dz, y, gamma, beta, residual, relu):
    """d y, d gamma, d beta, d residual of z = act(batch_norm(y) + residual), fp64 autograd."""
    leaves = [t.double().detach().requires_grad_() for t in (y, gamma, beta, residual)]
    z = F.batch_norm(leaves[0], None, None, leaves[1], leaves[2], training=True, eps=1e-5)
    z = z + leaves[3]
    z = torch.relu(z) if relu else z
    z.backward(dz.double())
    return z.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("relu, write_dr", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("shape, dtype, channels_last", CASES)
def test_bn_act_backward_matches_autograd(shape, dtype, channels_last, relu, write_dr):
    c = shape[1]
    y = _layout((torch.randn(shape, dtype=torch.float64) * 2 - 1).to(dtype), channels_last)
    r = _layout(torch.randn(shape).to(dtype), channels_last)
    dz = _layout(torch.randn(shape).to(dtype), channels_last)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gamma, beta = torch.rand(c, dtype=acc) + 0.5, torch.randn(c, dtype=acc)
    z64, (dy_ref, dgamma_ref, dbeta_ref, dr_ref) = _reference_backward(dz, y, gamma, beta, r, relu)
    mean = y.double().mean(dim=(0, 2, 3))
    rstd = torch.rsqrt(y.double().var(dim=(0, 2, 3), unbiased=False) + 1e-5)
    z = _layout(z64.to(dtype), channels_last) if relu else None
    on = [t.to(DEVICE) if t is not None else None
          for t in (dz, z, y, mean.to(acc), rstd.to(acc), gamma)]
    dy, dgamma, dbeta, dr = (t.cpu() for t in OPS.bn_act_backward(*on, write_dr))
    assert dy.dtype == dtype and dgamma.dtype == acc
    assert dy.is_contiguous(memory_format=torch.channels_last if channels_last
                            else torch.contiguous_format)
    # Low precision: the mask from a rounded z and the rounded dy differ from fp64 by a few ulps
    # of the largest gradient.
    scale = dy_ref.abs().max().item() + 1
    tol = _tolerance(dtype) * (4 if dtype in (torch.float16, torch.bfloat16) else 1)
    mismatch = ((dy.double() - dy_ref).abs() > tol * scale).float().mean().item()
    assert mismatch <= (0.01 if relu and tol > 1e-3 else 0.0), f"dy mismatch {mismatch:.3%}"
    n = dy.numel() // c
    for name, got, ref in (("dgamma", dgamma, dgamma_ref), ("dbeta", dbeta, dbeta_ref)):
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * n ** 0.5 * scale,
                                   msg=name)
    if write_dr:
        assert dr.shape == y.shape
        mismatch = ((dr.double() - dr_ref).abs() > tol * scale).float().mean().item()
        assert mismatch <= (0.01 if tol > 1e-3 else 0.0), f"dr mismatch {mismatch:.3%}"
    else:
        assert dr.numel() == 0


@pytest.mark.parametrize("relu", [False, True])
def test_opcheck(relu):
    y = torch.randn(2, 8, 5, 3, device=DEVICE).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(OPS.bn_stats.default, (y,))
    mean, var = OPS.bn_stats(y)
    rstd = torch.rsqrt(var + 1e-5)
    z = torch.relu(y) if relu else None
    args = (torch.randn_like(y), z, y, mean, rstd, torch.rand(8, device=DEVICE), True)
    torch.library.opcheck(OPS.bn_act_backward.default, args)


@pytest.mark.parametrize("call, message", [
    (lambda y, v: OPS.bn_stats(y[0]), "bn_stats: y must be 4-D"),
    (lambda y, v: OPS.bn_stats(y[:, :, :0]), "at least one value per channel"),
    (lambda y, v: OPS.bn_stats(y.int()), "floating-point"),
    (lambda y, v: OPS.bn_act_backward(y[:1], None, y, v, v, v, False), "dz must have y's shape"),
    (lambda y, v: OPS.bn_act_backward(y, y.double(), y, v, v, v, False), "z dtype"),
    (lambda y, v: OPS.bn_act_backward(y, None, y, v[:3], v, v, False), "mean must have shape"),
    (lambda y, v: OPS.bn_act_backward(y, None, y, v, v.half(), v, False), "rstd must be float32"),
])
def test_bad_arguments_name_the_argument(call, message):
    y, v = torch.randn(2, 4, 3, 3, device=DEVICE), torch.rand(4, device=DEVICE)
    with pytest.raises(RuntimeError, match=message):
        call(y, v)
