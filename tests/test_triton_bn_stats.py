"""`triton.bn.bn_finalize`: the tree merge of the conv epilogue's per-group statistics
(shift k_g, lo_g = mean_g - k_g, M2_g) into the BN's mean, biased variance, rstd, scale and shift,
against the statistics of the whole tensor in fp64. The partials are built here the way the
conv epilogue writes them (groups of `rows` consecutive rows, the last one ragged), and the
merge tile is made small so that the tree has one, two and three levels."""

import pytest
import torch

from tests._backends import DEVICE, skip_without_triton


def _group_partials(y: torch.Tensor, rows: int):
    """(shift, mean - shift, M2) per group of `rows` rows of y (M, C), as the epilogue does."""
    shifts, los, m2s = [], [], []
    for start in range(0, y.shape[0], rows):
        grp = y[start:start + rows]
        k = grp[0]
        lo = (grp - k).mean(0)
        shifts.append(k)
        los.append(lo)
        m2s.append(((grp - k - lo) ** 2).sum(0))
    return tuple(torch.stack(t) for t in (shifts, los, m2s))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m, tile", [(37, 512), (32 * 61 + 5, 8), (32 * 200 + 31, 4)],
                         ids=["one-level", "two-levels", "three-levels"])
def test_tree_merge_matches_fp64_statistics(m, tile, dtype):
    skip_without_triton()
    from fused_resnet.triton.bn import bn_finalize

    c, rows, eps = 5, 32, 1e-5
    g = torch.Generator().manual_seed(m)
    # Per-channel means up to 1e4 with std ~1: the variance must not cancel.
    y64 = (torch.randn(m, c, generator=g, dtype=torch.float64) * torch.tensor([1, 2, 0.5, 1, 3])
           + torch.tensor([0.0, 1e4, -3e3, 7.0, 1e2]))
    y = y64.to(DEVICE, dtype)
    gamma = torch.randn(c, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    beta = torch.randn(c, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    mean, var, (rstd, scale, shift) = bn_finalize(*_group_partials(y, rows), rows, m, gamma,
                                                  beta, eps, tile=tile)
    exact = y.to(torch.float64)
    ref_mean, ref_var = exact.mean(0), exact.var(0, unbiased=False)
    ref_scale = gamma.double() / torch.sqrt(ref_var + eps)
    ref_shift = beta.double() - ref_mean * ref_scale
    rtol = 1e-12 if dtype == torch.float64 else 2e-5
    # A mean near 0 (channel 0) is bounded by the data's spread, not by its own size.
    torch.testing.assert_close(mean.double(), ref_mean, rtol=rtol,
                               atol=rtol * float(exact.std(0).max()))
    torch.testing.assert_close(var.double(), ref_var, rtol=rtol * 10, atol=0)
    torch.testing.assert_close(rstd.double(), 1 / torch.sqrt(ref_var + eps), rtol=rtol * 10,
                               atol=0)
    torch.testing.assert_close(scale.double(), ref_scale, rtol=rtol * 10, atol=0)
    # shift = beta - mean * scale cancels for the 1e4 means: bound it by mean * scale's size.
    torch.testing.assert_close(shift.double(), ref_shift, rtol=0,
                               atol=rtol * 10 * float((ref_mean * ref_scale).abs().max()))


def _mean_shift_partials(y: torch.Tensor, rows: int):
    """(group mean, None, M2) per group, in fp32, as the epilogue does for fp16 / bf16 y."""
    shifts, m2s = [], []
    for start in range(0, y.shape[0], rows):
        grp = y[start:start + rows].float()
        k = grp.sum(0) / grp.shape[0]
        shifts.append(k)
        m2s.append(((grp - k) ** 2).sum(0))
    return torch.stack(shifts), None, torch.stack(m2s)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m, tile", [(37, 512), (32 * 200 + 31, 4)],
                         ids=["one-level", "three-levels"])
def test_mean_shifted_partials_of_16_bit_y(m, tile, dtype):
    """fp16 / bf16 y: the group's fp32 mean is the shift and no mean - shift is stored. Means
    as large against the spread as 16-bit values can still resolve (bf16 keeps 8 bits)."""
    skip_without_triton()
    from fused_resnet.triton.bn import bn_finalize

    c, rows, eps = 5, 32, 1e-5
    g = torch.Generator().manual_seed(m)
    y64 = (torch.randn(m, c, generator=g, dtype=torch.float64)
           * torch.tensor([1, 2, 0.5, 1, 30]) + torch.tensor([0.0, 100.0, -30.0, 7.0, 3e3]))
    y = y64.to(dtype).to(DEVICE)
    one = torch.ones(c, device=DEVICE)
    mean, var, _ = bn_finalize(*_mean_shift_partials(y, rows), rows, m, one, one * 0, eps,
                               tile=tile)
    exact = y.double()
    torch.testing.assert_close(mean.double(), exact.mean(0), rtol=1e-6,
                               atol=1e-6 * float(exact.std(0).max()))
    torch.testing.assert_close(var.double(), exact.var(0, unbiased=False), rtol=1e-5, atol=0)


def test_merge_is_deterministic():
    skip_without_triton()
    from fused_resnet.triton.bn import bn_finalize

    m, c, rows = 32 * 40 + 3, 3, 32
    y = torch.randn(m, c, dtype=torch.float32, device=DEVICE) + 50
    parts = _group_partials(y, rows)
    one = torch.ones(c, device=DEVICE)
    first = bn_finalize(*parts, rows, m, one, one * 0, 1e-5, tile=4)
    again = bn_finalize(*parts, rows, m, one, one * 0, 1e-5, tile=4)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_a_tile_of_one_group_is_refused():
    skip_without_triton()
    from fused_resnet.triton.bn import bn_finalize

    y = torch.randn(70, 2, device=DEVICE)
    one = torch.ones(2, device=DEVICE)
    with pytest.raises(ValueError, match="tile must be at least 2"):
        bn_finalize(*_group_partials(y, 32), 32, 70, one, one, 1e-5, tile=1)


@pytest.mark.parametrize("mask", ["none", "z", "scale_shift", "bits"])
@pytest.mark.parametrize("shape, dtype", [((2, 5, 3, 3), torch.float64),
                                          ((3, 70, 5, 7), torch.float64),
                                          ((2, 16, 9, 9), torch.bfloat16)], ids=str)
def test_backward_sums_and_the_shortcut_gradient_in_one_pass(shape, dtype, mask):
    """bn_bwd_reduce: sum g and sum g * yhat per channel (g = dz * [z > 0]), and with
    write_g g itself, in dz's dtype and bit for bit (an identity shortcut's gradient)."""
    skip_without_triton()
    from fused_resnet.triton.bn import bn_bwd_reduce
    from fused_resnet.triton.eltwise import pack_relu_bits

    gen = torch.Generator().manual_seed(shape[1])
    cl = torch.channels_last
    dz, y, z = (torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
                .contiguous(memory_format=cl) for _ in range(3))
    c = shape[1]
    mean, rstd = torch.randn(c, generator=gen, dtype=torch.float64), \
        torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    ms, mh = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mean, rstd = mean.to(acc), rstd.to(acc)
    relu_mask = {"none": None, "z": z, "scale_shift": (ms.to(acc), mh.to(acc)),
                 "bits": pack_relu_bits(z)}[mask]
    sum_g, sum_gy, sum_gy2, g = bn_bwd_reduce(dz, relu_mask, y, mean, rstd, write_g=True)

    keep = {"none": torch.ones_like(dz, dtype=torch.bool), "z": z > 0, "bits": z > 0,
            "scale_shift": y.double() * ms.to(acc)[None, :, None, None].double()
            + mh.to(acc)[None, :, None, None].double() > 0}[mask]
    expected_g = dz * keep
    assert sum_gy2 is None and g.dtype == dtype and g.is_contiguous(memory_format=cl)
    torch.testing.assert_close(g, expected_g, rtol=0, atol=0)
    yhat = (y.double() - mean.double()[None, :, None, None]) * rstd.double()[None, :, None, None]
    tol = 1e-10 if dtype == torch.float64 else 1e-3
    torch.testing.assert_close(sum_g.double(), expected_g.double().sum((0, 2, 3)),
                               rtol=tol, atol=tol)
    torch.testing.assert_close(sum_gy.double(), (expected_g.double() * yhat).sum((0, 2, 3)),
                               rtol=tol, atol=tol)
    assert bn_bwd_reduce(dz, relu_mask, y, mean, rstd)[3] is None
    if mask != "scale_shift":  # without y: sum g and g only (a mask from y needs y)
        only_g, none, none2, g_again = bn_bwd_reduce(dz, relu_mask, None, None, None,
                                                     write_g=True)
        assert none is None and none2 is None
        assert torch.equal(only_g, sum_g) and torch.equal(g_again, g)
    else:
        with pytest.raises(ValueError, match="needs y"):
            bn_bwd_reduce(dz, relu_mask, None, None, None)
