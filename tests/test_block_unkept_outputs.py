"""The block's backward without the conv outputs it does not keep on Triton (a bottleneck's
y3, a projection's y_d: `triton_block.unkept_ys`) against the chain that reads them, and a
backward run under another operand mode than its forward."""

import pytest
import torch
from _backends import DEVICE, skip_without_triton
from _block_cases import block_args

from fused_resnet.testing import assert_close

OPS = torch.ops.fused_resnet


@pytest.mark.parametrize("need_dx", [True, False], ids=["dx", "no_dx"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
@pytest.mark.parametrize("name, unkept", [
    ("bottleneck identity", [2]), ("bottleneck projection", [2]),
    ("bottleneck projection", [3]), ("bottleneck projection", [2, 3]),
    ("bottleneck projection stride 1", [2, 3]), ("basic projection", [2]),
    ("bottleneck projection dilated stride 2", [2, 3])])
def test_backward_without_y3_or_yd_equals_the_one_through_them(name, unkept, dtype, need_dx):
    """A bottleneck's backward without y3 (G = g^T a2, Gram = a2^T a2: the last
    BN's sums, dw3 and d a2 from them), and a projection's without y_d (the same with x at
    the shortcut's stride in the place of a2), against the chain that reads them (still
    the path where they are kept): the same gradients to fp64 rounding, and in bf16 to the
    y's own rounding (the chain reads y rounded, the other computes with a w^T unrounded)."""
    skip_without_triton()
    from fused_resnet.ops import triton_block
    from fused_resnet.triton.config import operands_mode
    from fused_resnet.triton.conv import conv_fwd

    torch.manual_seed(3)
    x, weights, gammas, betas, strides, paddings, dilations, eps, shortcut, s_stride = \
        block_args(name)
    master = torch.float64 if dtype == torch.float64 else torch.float32  # autocast's weights
    x, weights = x.detach().to(dtype).to(memory_format=torch.channels_last), \
        [w.detach().to(master) for w in weights]
    gammas, betas = [g.detach().to(master) for g in gammas], [b.detach().to(master) for b in betas]
    args = (weights, gammas, betas, strides, paddings, dilations, eps, shortcut, s_stride)
    proj = [len(weights) - 1] if shortcut == "projection" else []
    with operands_mode("on_load"):  # whatever FUSED_RESNET_OPERANDS says
        assert triton_block.unkept_ys(weights, strides, paddings, shortcut) == sorted(
            ([2] if len(weights) - len(proj) == 3 else []) + proj)
        assert triton_block.unkept_ys(weights, [1, 1, 2, 1], paddings, shortcut) == proj  # strided
        assert triton_block.unkept_ys(weights, strides, [0, 1, 1, 0], shortcut) == proj  # padded
        z, bits, ys, means, _, affines = triton_block.block_train(x, *args)
        unwritten = triton_block.unwritten_ys(weights, strides, paddings, shortcut)
    assert unwritten == ([2] if len(weights) - len(proj) == 3 else [])  # a bottleneck's y3
    if unwritten:  # y3 is never written: made here for the chain that reads it
        assert ys[2].numel() == 0
        ys[2] = conv_fwd(ys[1], weights[2], stride=1, padding=0, in_scale=affines[1][1],
                         in_shift=affines[1][2], in_relu=True)[0]
    with operands_mode("written"):
        assert triton_block.unkept_ys(weights, strides, paddings, shortcut) == []
        assert triton_block.unwritten_ys(weights, strides, paddings, shortcut) == []
    dz = torch.randn(z.shape, dtype=torch.float64, device=DEVICE).to(dtype).contiguous(
        memory_format=torch.channels_last)
    rest = (gammas, betas)
    through = triton_block.block_train_backward(dz, x, bits, weights, *rest, ys, means, affines,
                                                strides, paddings, dilations, eps, shortcut,
                                                s_stride, need_dx)
    without = triton_block.block_train_backward(
        dz, x, bits, weights, *rest, [y.new_empty(0) if i in unkept else y
                                      for i, y in enumerate(ys)], means,
        affines, strides, paddings, dilations, eps, shortcut, s_stride, need_dx)
    assert (through[0] is None) == (without[0] is None) == (not need_dx)
    tol = 1e-9 if dtype == torch.float64 else 3e-2  # bf16: ~1e-2 seen (Triton 3.6, 3.8)
    pairs = [(through[0], without[0])] if need_dx else []
    pairs += [(a, b) for i in (1, 2, 3) for a, b in zip(through[i], without[i])]
    for a, b in pairs:
        torch.testing.assert_close(b.double(), a.double(), rtol=tol,
                                   atol=tol * a.double().abs().max().item())


@pytest.mark.parametrize("name", ["bottleneck identity", "bottleneck projection"])
@pytest.mark.parametrize("modes", [("on_load", "written"), ("written", "on_load")],
                         ids=["fwd_on_load-bwd_written", "fwd_written-bwd_on_load"])
def test_operand_mode_changed_between_forward_and_backward(modes, name):
    """Whether y3 and y_d are kept is decided in forward (on load: not kept); a backward run
    under the other operand mode follows what was saved and gives the same gradients."""
    skip_without_triton()
    from fused_resnet.triton.config import operands_mode

    args = block_args(name)
    grads = []
    for forward_mode, backward_mode in (modes, (modes[0], modes[0])):
        leaves = [args[0].detach().clone().requires_grad_()] + [
            [t.detach().clone().requires_grad_() for t in ts] for ts in args[1:4]]
        with operands_mode(forward_mode):
            z = OPS.block_train(leaves[0], *leaves[1:], *args[4:], "triton")[0]
        with operands_mode(backward_mode):
            z.backward(torch.linspace(-1, 1, z.numel(), device=DEVICE).view_as(z))
        grads.append([leaves[0].grad] + [t.grad for ts in leaves[1:] for t in ts])
    for got, expected in zip(*grads):
        assert_close(got, expected, kind="grad")


@pytest.mark.parametrize("name", ["bottleneck identity", "bottleneck projection",
                                  "bottleneck plain padded 1x1"])
def test_bottleneck_trains_as_the_reference_whether_y3_is_kept_or_not(name):
    """fp64 on Triton against the reference backend: z, every gradient and the running
    statistics. The padded 1x1 conv 3 (a user's plain bottleneck) keeps and writes its y3:
    the backward without y3 assumes no padding (it gave gradients off by 10-60 before
    `unkept_ys` checked the padding)."""
    skip_without_triton()
    import fused_resnet as fr

    x, weights, gammas, betas, strides, paddings, dilations, eps, shortcut, s_stride = \
        block_args(name)
    dz = torch.linspace(-1, 1, 2 * 16 * 8 * 8, device=DEVICE, dtype=torch.float64)
    results = []
    for backend in ("triton", "reference"):
        leaves = [x.detach().double().requires_grad_()] + [
            [t.detach().double().requires_grad_() for t in ts] for ts in (weights, gammas, betas)]
        stats = [[torch.zeros(w.shape[0], dtype=torch.float64, device=DEVICE) for w in weights],
                 [torch.ones(w.shape[0], dtype=torch.float64, device=DEVICE) for w in weights]]
        z = fr.ops.residual_block_train(
            leaves[0], *leaves[1:], *stats, strides=strides, paddings=paddings,
            momenta=[0.1] * len(weights), eps=eps, shortcut=shortcut, shortcut_stride=s_stride,
            dilations=dilations, backend=backend)
        (z * dz[:z.numel()].view_as(z)).sum().backward()
        results.append([z.detach(), leaves[0].grad, *[t.grad for ts in leaves[1:] for t in ts],
                        *stats[0], *stats[1]])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
