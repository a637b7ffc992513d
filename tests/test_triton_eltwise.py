"""`triton.eltwise`: the block-end kernels over (rows, channels) tiles of NHWC tensors, against
torch in fp64. Channel counts on both sides of a tile's width (one partial block, several
blocks of MAX_BLOCK_C with a ragged last one), rows on both sides of a tile's height, every
ReLU-mask mode, and the BN backward coefficients computed in the kernel from a BnBackward."""

import pytest
import torch

from tests._backends import DEVICE, skip_without_triton

CL = torch.channels_last
# (N, C, H, W): C below / at / above one tile (MAX_BLOCK_C = 256: 300 and 520 take 2 and 3
# channel blocks, the last one partial); N*H*W rows not a multiple of the tile's rows.
SHAPES = [(1, 3, 5, 7), (2, 64, 3, 3), (1, 300, 2, 3), (3, 520, 1, 1), (2, 16, 9, 9)]


def _rand(shape, gen, scale=1.0, shift=0.0):
    t = torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift
    return t.to(DEVICE).contiguous(memory_format=CL)


def _vec(c, gen, low=None):
    v = torch.randn(c, generator=gen, dtype=torch.float64)
    return (v.abs() + low if low is not None else v).to(DEVICE)


def _per_channel(t):
    return t[None, :, None, None]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("shortcut", ["none", "residual", "bn2"])
def test_bn_act_fwd(shape, shortcut):
    skip_without_triton()
    from fused_resnet.triton.eltwise import bn_act_fwd

    gen = torch.Generator().manual_seed(shape[1])
    c = shape[1]
    y, r, y2 = _rand(shape, gen), _rand(shape, gen), _rand(shape, gen, 2.0, -1.0)
    scale, shift, scale2, shift2 = (_vec(c, gen) for _ in range(4))
    kwargs = {"residual": r} if shortcut == "residual" else (
        {"y2": y2, "scale2": scale2, "shift2": shift2} if shortcut == "bn2" else {})
    z = bn_act_fwd(y, scale, shift, relu=True, **kwargs)
    expected = y * _per_channel(scale) + _per_channel(shift)
    if shortcut == "residual":
        expected = expected + r
    elif shortcut == "bn2":
        expected = expected + y2 * _per_channel(scale2) + _per_channel(shift2)
    assert z.is_contiguous(memory_format=CL)
    torch.testing.assert_close(z, torch.relu(expected), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mask", ["none", "z", "scale_shift", "bits"])
def test_bn_act_bwd(shape, mask):
    """dy = a * g + b * y + d and dy2 likewise for a second BN, dr = g, with g = dz * [z > 0]
    and (a, b, d) those of `reference.bn_backward_affine`."""
    skip_without_triton()
    from fused_resnet.reference import bn_backward_affine
    from fused_resnet.triton.eltwise import BnBackward, bn_act_bwd, pack_relu_bits

    gen = torch.Generator().manual_seed(7 * shape[1])
    c = shape[1]
    m = shape[0] * shape[2] * shape[3]
    dz, y, y2, z = (_rand(shape, gen) for _ in range(4))
    ms, mh = _vec(c, gen), _vec(c, gen)
    sums = [_vec(c, gen) * m for _ in range(3)]
    bn = BnBackward(_vec(c, gen), _vec(c, gen), _vec(c, gen, 0.5), sums[0], sums[1], m)
    bn2 = BnBackward(_vec(c, gen), _vec(c, gen), _vec(c, gen, 0.5), sums[0], sums[2], m)
    relu_mask = {"none": None, "z": z, "scale_shift": (ms, mh), "bits": pack_relu_bits(z)}[mask]
    dy, dy2, dr = bn_act_bwd(dz, relu_mask, y, bn, y2=y2, bn2=bn2, write_dr=True)

    g = dz
    if mask in ("z", "bits"):
        g = dz * (z > 0)
    elif mask == "scale_shift":
        g = dz * (y * _per_channel(ms) + _per_channel(mh) > 0)
    for got, t, b in ((dy, y, bn), (dy2, y2, bn2)):
        a_, b_, d_ = (_per_channel(v) for v in bn_backward_affine(*b))
        assert got.is_contiguous(memory_format=CL)
        torch.testing.assert_close(got, a_ * g + b_ * t + d_, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dr, g, rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES + [(2, 40, 3, 1), (1, 96, 2, 2)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
def test_bn_act_fwd_bits_packs_the_relu_mask_of_the_stored_z(shape, dtype):
    """bn_act_fwd_bits: z as bn_act_fwd writes it, and [z > 0] of that stored z packed 32
    channels a word (`pack_relu_bits`; channel counts below 32, ragged, over several words and
    tiles). NaN passes, -0 and -inf do not, as threshold_backward decides at z; a shift of
    1e-9 makes y = 0 positive in fp32 but 0 once stored in fp16: masked there."""
    skip_without_triton()
    from fused_resnet.triton.eltwise import bn_act_fwd, bn_act_fwd_bits, pack_relu_bits

    gen = torch.Generator().manual_seed(3 * shape[1])
    c = shape[1]
    y = _rand(shape, gen).to(dtype)
    flat = y.permute(0, 2, 3, 1).reshape(-1)  # a view (y is channels_last): writes land in y
    special = [float("nan"), -0.0, float("-inf"), 0.0, 5.0, -3.0]
    flat[0:7 * len(special):7] = torch.tensor(special, dtype=dtype, device=DEVICE)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = (_vec(c, gen).abs() + 0.5).to(acc)
    shift = torch.full((c,), 1e-9, dtype=acc, device=DEVICE)
    z, bits = bn_act_fwd_bits(y, scale, shift)
    torch.testing.assert_close(z, bn_act_fwd(y, scale, shift, relu=True), rtol=0, atol=0,
                               equal_nan=True)
    m = shape[0] * shape[2] * shape[3]
    assert bits.shape == (m, (c + 31) // 32) and bits.dtype == torch.int32
    assert torch.equal(bits, pack_relu_bits(z))
    # the packing itself: unpacked, bit c % 32 of word c // 32 is [z > 0] (NaN passes)
    words = bits.cpu().to(torch.int64) % 2**32
    unpacked = (words[:, torch.arange(c) // 32] >> (torch.arange(c) % 32)) & 1
    keep = ~(z.permute(0, 2, 3, 1).reshape(m, c) <= 0)
    assert torch.equal(unpacked.bool(), keep.cpu())


def test_bn_act_bwd_without_dy_needs_no_bn_and_checks_its_arguments():
    skip_without_triton()
    from fused_resnet.triton.eltwise import bn_act_bwd

    gen = torch.Generator().manual_seed(1)
    dz, z = _rand((2, 5, 3, 3), gen), _rand((2, 5, 3, 3), gen)
    dy, dy2, dr = bn_act_bwd(dz, z, dz, None, write_dy=False, write_dr=True)
    assert dy is None and dy2 is None
    torch.testing.assert_close(dr, dz * (z > 0), rtol=0, atol=0)
    with pytest.raises(ValueError, match="write_dy needs the BN backward bn"):
        bn_act_bwd(dz, z, dz, None)
    with pytest.raises(ValueError, match="y2 needs its BN backward bn2"):
        bn_act_bwd(dz, z, dz, None, y2=dz, write_dy=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_relu_keeps_nan_and_infinities_as_torch_does(dtype):
    """`eltwise.relu` (a NaN-propagating max): NaN stays NaN, -inf and negatives become 0,
    +inf stays, as torch.relu; a max that drops NaN (fmax) would output 0 for it."""
    skip_without_triton()
    from fused_resnet.triton.eltwise import bn_act_fwd

    values = [float("nan"), float("-inf"), float("inf"), -2.0, -0.0, 0.0, 3.0, 1e-30]
    y = torch.tensor(values, dtype=dtype).reshape(1, 8, 1, 1).repeat(2, 1, 3, 1)
    y = y.to(DEVICE).contiguous(memory_format=CL)
    ones = torch.ones(8, dtype=torch.float32, device=DEVICE)
    zeros = torch.zeros(8, dtype=torch.float32, device=DEVICE)
    z = bn_act_fwd(y, ones, zeros, relu=True)
    expected = torch.relu(y.float()).to(dtype)
    assert torch.equal(z.isnan(), expected.isnan())
    torch.testing.assert_close(z[~z.isnan()], expected[~expected.isnan()], rtol=0, atol=0)
