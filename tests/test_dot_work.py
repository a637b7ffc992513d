"""`triton/dot_work.py` against the interpreter's own tally of tl.dot work (exact, with the
pinned tile), and what it says of ResNet-50: every conv has a tile config that wastes little
in fwd, dgrad and wgrad. The second part is the guard against the regressions fixed before
it existed: the stem's 3 channels padded to a 32-wide K slice (10.7x its forward MACs), its
wgrad to 64-wide column blocks (21x), every stride-2 dgrad visiting all taps (4x)."""

import pytest
import torch

from tests._backends import skip_without_triton

# (n, c_in, h, w, c_out, k, stride, padding[, dilation])
SHAPES = [
    (2, 3, 11, 10, 8, 7, 2, 3),    # stem-like: flattened K and columns
    (1, 40, 6, 5, 70, 3, 2, 1),    # per tap, several K and column blocks, 4 phases
    (2, 16, 7, 7, 8, 1, 2, 0),     # 1x1 stride 2: 3 of 4 phases without a tap
    (1, 8, 9, 8, 4, 5, 3, 2),      # stride 3
    (3, 33, 5, 5, 65, 3, 1, 1),
    (1, 8, 9, 8, 4, 3, 2, 2, 2),   # dilated: the phases with (ph + pad) odd take no tap
    (2, 3, 10, 9, 4, 3, 3, 2, 2),  # dilation 2 at stride 3, flattened K
]


@pytest.fixture
def dot_tally(monkeypatch):
    """Sums M*K*N over every tl.dot the interpreter runs."""
    skip_without_triton()
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "create_dot"):
        pytest.skip("this Triton's interpreter has no InterpreterBuilder.create_dot")
    tally = [0]
    real = builder.create_dot

    def counting(self, a, b, *args, **kwargs):
        m, k = a.data.shape[-2:]
        tally[0] += m * k * b.data.shape[-1]
        return real(self, a, b, *args, **kwargs)

    monkeypatch.setattr(builder, "create_dot", counting)
    return tally


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_counts_equal_the_interpreters_tally(shape, dot_tally):
    from fused_resnet.triton import dot_work
    from fused_resnet.triton.config import PINNED
    from fused_resnet.triton.conv import conv_fwd
    from fused_resnet.triton.conv_bwd import conv_dgrad, conv_wgrad

    s = dot_work.ConvShape(*shape)
    tile = (PINNED.block_m, PINNED.block_n, PINNED.block_k)
    cl = torch.channels_last
    x = torch.randn(s.n, s.c_in, s.h, s.w).contiguous(memory_format=cl)
    weight = torch.randn(s.c_out, s.c_in, s.k, s.k)
    dy = torch.randn(s.n, s.c_out, *s.out_hw).contiguous(memory_format=cl)

    def tallied(run):
        dot_tally[0] = 0
        run()
        return dot_tally[0]

    geometry = {"stride": s.stride, "padding": s.padding, "dilation": s.dilation}
    assert tallied(lambda: conv_fwd(x, weight, **geometry)) == dot_work.fwd_macs(s, *tile)
    assert tallied(lambda: conv_dgrad(dy, weight, x.shape, **geometry)) \
        == dot_work.dgrad_macs(s, *tile)
    for split in (1, 3):
        assert tallied(lambda split=split: conv_wgrad(x, dy, weight.shape, **geometry,
                                                      split=split)) \
            == dot_work.wgrad_macs(s, *tile, split=split)


def _resnet50_convs(batch=256, size=224):
    """Every conv of ResNet-50 v1.5 as a ConvShape; input sizes are output x stride (every
    ResNet conv pads to 'same' on even sizes)."""
    import fused_resnet as fr
    from fused_resnet.triton.dot_work import ConvShape

    model = fr.models.resnet50(backend="reference")
    report = fr.count_flops(model, (1, 3, size, size), training=False)
    shapes = []
    for row in report.rows:
        if row.kind == "conv":
            conv = model.get_submodule(row.name)
            stride, h, w = conv.stride[0], row.output_shape[2], row.output_shape[3]
            shapes.append(ConvShape(batch, conv.in_channels, h * stride, w * stride,
                                    conv.out_channels, conv.kernel_size[0], stride,
                                    conv.padding[0]))
    return shapes


def test_resnet50_has_a_tile_that_wastes_little_for_every_conv():
    """Over the autotuner's configs, the least executed / useful MACs of each conv's fwd,
    dgrad (not for the stem, whose input needs no gradient) and wgrad at batch 256, 224x224;
    and the training step with each conv's best tiles. Measured: 1.09x for the stem's forward
    (160 of 147 K), 1.31x for its wgrad (192 of 147 columns), 1.0 for every other conv, and
    1.004x for the whole step: 12.19 G MACs per image for 12.14 G (it was 27.72 G, 2.28x)."""
    skip_without_triton()  # FWD_CONFIGS lives with the kernels
    from fused_resnet.triton import dot_work
    from fused_resnet.triton.autotune import FWD_CONFIGS

    tiles = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"])
             for c in FWD_CONFIGS]
    convs = _resnet50_convs()
    assert len(convs) == 53
    useful = executed = 0
    for i, s in enumerate(convs):
        kernels = [dot_work.fwd_macs, dot_work.wgrad_macs] + ([dot_work.dgrad_macs] if i else [])
        for kernel in kernels:
            best = min(kernel(s, *tile) for tile in tiles)
            ratio = best / dot_work.useful_macs(s)
            bound = 1.35 if i == 0 else 1.001  # the stem's 147 K / columns in 32 / 64 tiles
            assert ratio <= bound, f"{kernel.__name__} of conv {i} {s}: {ratio:.3f}x"
            useful += dot_work.useful_macs(s)
            executed += best
    assert executed / useful <= 1.005
