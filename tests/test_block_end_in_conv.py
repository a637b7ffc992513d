"""A bottleneck that ends in conv 3's epilogue on Triton (`triton_block.unwritten_ys`): conv 3
runs once for y3's batch statistics alone and once more with bn3, the shortcut (x, or a
projection's bn_d(y_d)), the add and the ReLU in its epilogue, which writes z and its packed
ReLU mask; y3 is never written. Against the path that writes y3 and reads it back in one
elementwise pass (`eltwise.bn_act_fwd_bits`): the same z, mask and statistics."""

import pytest
import torch
from _backends import DEVICE, skip_without_triton
from _block_cases import block_args

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16}
ENDING_IN_CONV3 = ["bottleneck identity", "bottleneck projection",
                   "bottleneck projection stride 1", "bottleneck dilated"]


def _inputs(name: str, dtype: torch.dtype):
    """block_train's arguments for block `name`, x in `dtype` (channels_last), the weights
    and BN parameters in the dtype autocast would keep them in (fp32; fp64 for fp64)."""
    torch.manual_seed(5)
    x, weights, gammas, betas, *rest = block_args(name)
    master = torch.float64 if dtype == torch.float64 else torch.float32
    x = x.detach().to(dtype).contiguous(memory_format=torch.channels_last)
    params = [[t.detach().to(master) for t in ts] for ts in (weights, gammas, betas)]
    return x, params, rest


def _launches(labels: dict, kernel: str, *flags: str) -> int:
    """Launches of `kernel` (e.g. 'conv_fwd') whose profile label has every one of `flags`."""
    return sum(counts[0] for label, counts in labels.items()
               if label.split()[0] == f"fr::{kernel}" and set(flags) <= set(label.split()))


def _assert_same(got, expected, exact: bool):
    if exact:  # the interpreter: the same tiles, the same float operations in the same order
        assert torch.equal(got, expected)
    else:  # compiled: FMA contraction may differ between the two kernels in the last bit
        torch.testing.assert_close(got.double(), expected.double(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("name", ENDING_IN_CONV3)
def test_block_end_in_conv3_equals_the_elementwise_end(name, dtype, monkeypatch):
    skip_without_triton()
    from fused_resnet.ops import triton_block
    from fused_resnet.triton.config import interpreting, operands_mode
    from fused_resnet.triton.eltwise import pack_relu_bits
    from fused_resnet.triton.launch import counting_work

    x, (weights, gammas, betas), rest = _inputs(name, dtype)
    strides, paddings, _, _, shortcut, _ = rest
    args = (x, weights, gammas, betas, *rest)
    with operands_mode("on_load"):
        assert triton_block.unwritten_ys(weights, strides, paddings, shortcut) == [2]
        with counting_work() as work:
            z, bits, ys, means, variances, affines = triton_block.block_train(*args)
        labels = dict(work)
        monkeypatch.setattr(triton_block, "unwritten_ys", lambda *_: [])
        z0, bits0, ys0, means0, variances0, affines0 = triton_block.block_train(*args)
    # y3 not written, and no elementwise pass at the block's end
    assert ys[2].numel() == 0 and ys0[2].shape == z.shape
    assert _launches(labels, "bn_act_fwd") == 0
    assert _launches(labels, "conv_fwd", "1x1", "prologue", "stats", "stats_only") == 1
    end = ("1x1", "prologue", "bn_out", "has_res", "write_bits")
    assert _launches(labels, "conv_fwd", *end) == 1
    assert _launches(labels, "conv_fwd", "res_bn") == (shortcut == "projection")
    exact = interpreting()
    _assert_same(z, z0, exact)
    assert torch.equal(bits, pack_relu_bits(z))
    if exact:
        assert torch.equal(bits, bits0)
    for got, expected in zip([*means, *variances, *affines], [*means0, *variances0, *affines0]):
        _assert_same(got, expected, exact)
    for i in (0, 1, 3)[:len(ys) - 1]:
        _assert_same(ys[i], ys0[i], exact)


def test_narrow_pinned_tiles_end_the_block_elementwise():
    """The epilogue writes whole 32-channel words of the mask: a pinned config whose tiles
    are narrower than 32 channels, and narrower than C_out, keeps the elementwise end; one
    tile holding all channels, or tiles of 32 or more, end in conv 3."""
    skip_without_triton()
    from fused_resnet.ops import triton_block
    from fused_resnet.triton import config
    from fused_resnet.triton.conv import block_end_bits_ok, conv_fwd

    def weights(c_out):
        return [torch.empty(4, 16, 1, 1), torch.empty(4, 4, 3, 3), torch.empty(c_out, 4, 1, 1)]

    try:
        with config.operands_mode("on_load"):
            config.pin_config(config.TileConfig(32, 16, 16))
            assert block_end_bits_ok(16) and not block_end_bits_ok(48)
            assert triton_block.unwritten_ys(weights(16), [1, 1, 1], [0, 1, 0], "none") == [2]
            assert triton_block.unwritten_ys(weights(48), [1, 1, 1], [0, 1, 0], "none") == []
            x = torch.randn(1, 4, 2, 2, device=DEVICE)
            bits = torch.empty((4, 2), dtype=torch.int32, device=DEVICE)
            with pytest.raises(ValueError, match="packed ReLU mask needs tiles"):
                conv_fwd(x, torch.randn(48, 4, 1, 1, device=DEVICE), stride=1, padding=0,
                         bits=bits)
            config.pin_config(config.TileConfig(32, 32, 16))
            assert block_end_bits_ok(48)
            assert triton_block.unwritten_ys(weights(48), [1, 1, 1], [0, 1, 0], "none") == [2]
            # conv 3 strided or padded (a user's block): y3 written, the elementwise end
            assert triton_block.unwritten_ys(weights(48), [1, 1, 2], [0, 1, 0], "none") == []
            assert triton_block.unwritten_ys(weights(48), [1, 1, 1], [0, 1, 1], "none") == []
        with config.operands_mode("written"):
            assert triton_block.unwritten_ys(weights(48), [1, 1, 1], [0, 1, 0], "none") == []
    finally:
        config.pin_config(None)


@pytest.mark.parametrize("tile", [(32, 16, 16), (64, 64, 32)], ids=["one_tile_16", "64_wide"])
def test_block_end_with_a_pinned_tile(tile):
    """The bottleneck whose 16 output channels fit one 16-wide tile (the mask's one word
    written from its low 16 bits) and a 64-wide one: z, its mask and bn3's statistics as
    torch's conv and batch norm give them (fp64)."""
    skip_without_triton()
    from fused_resnet.ops import triton_block
    from fused_resnet.triton import config
    from fused_resnet.triton.eltwise import pack_relu_bits

    x, params, rest = _inputs("bottleneck identity", torch.float64)
    try:
        config.pin_config(config.TileConfig(*tile))
        with config.operands_mode("on_load"):
            z, bits, ys, means, variances, _ = triton_block.block_train(x, *params, *rest)
    finally:
        config.pin_config(None)
    assert ys[2].numel() == 0
    assert torch.equal(bits, pack_relu_bits(z))
    weights, gammas, betas = params
    out = x
    for i in range(3):
        y = torch.nn.functional.conv2d(out, weights[i], stride=rest[0][i], padding=rest[1][i])
        out = torch.nn.functional.batch_norm(y, None, None, gammas[i], betas[i], training=True,
                                             eps=1e-5)
        out = torch.relu(out + x) if i == 2 else torch.relu(out)
        if i == 2:
            torch.testing.assert_close(means[2], y.mean((0, 2, 3)))
            torch.testing.assert_close(variances[2], y.var((0, 2, 3), unbiased=False))
    torch.testing.assert_close(z, out)
