"""The block op `fused_resnet::block_train` on both kernel sets: opcheck (schema, fake kernel,
autograd registration, both ops), what autograd saves (x, z or its ReLU mask as bits, the raw
conv outputs and the statistics, never an activated tensor) and the activation memory that
saves."""

import copy
import os
import sys

import pytest
import torch
import torch.utils._python_dispatch
import torchvision
from _backends import DEVICE, FUSED_BACKENDS, NATIVE, skip_without_triton
from _block_cases import BLOCKS, block_args, kernels_or_skip

import fused_resnet as fr
from fused_resnet.backend import unavailable_reason
from fused_resnet.bench.timing import activation_bytes
from fused_resnet.testing import assert_close, compare_norm

try:
    from fused_resnet.triton.eltwise import pack_relu_bits
except ImportError:  # no Triton: only the native kernels run
    pack_relu_bits = None

OPS = torch.ops.fused_resnet


@pytest.mark.parametrize("kernels", ["native", "triton"])
@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("need_dx", [True, False], ids=["dx", "no_dx"])
@pytest.mark.parametrize("frozen", [None, 0, -1], ids=["dw", "frozen_first", "frozen_last"])
def test_opcheck(name, kernels, need_dx, frozen):
    kernels_or_skip(kernels)
    args = (*block_args(name), kernels)
    torch.library.opcheck(OPS.block_train.default, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))
    z, mask, ys, means, _, affines = OPS.block_train(*args)
    if kernels == "triton":  # [z > 0] as bits, which backward reads instead of z
        assert torch.equal(mask, pack_relu_bits(z.detach()))
    else:  # the mask is read from z
        assert mask.numel() == 0
    x, weights, gammas, betas, *rest = (a.detach() if isinstance(a, torch.Tensor) else a
                                        for a in args)
    detach = [[t.detach() for t in ts] for ts in (weights, gammas, betas)]
    need_dw = [True] * len(weights)
    if frozen is not None:  # a frozen weight: its gradient is an empty tensor
        need_dw[frozen] = False
    bwd_args = (torch.randn_like(z), x, mask if mask.numel() else z.detach(), *detach, ys,
                means, affines, *rest, need_dx, need_dw)
    torch.library.opcheck(OPS.block_train_backward.default, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))
    dx, dws, _, _ = OPS.block_train_backward(*bwd_args)
    assert dx.shape == (x.shape if need_dx else (0,))
    assert [dw.shape for dw in dws] == [w.shape if need else (0,)
                                        for w, need in zip(weights, need_dw)]


@pytest.mark.parametrize("kernels", ["native", "triton"])
def test_eager_twin_matches_the_custom_op(kernels):
    """Eager calls skip the custom-op dispatch (`block_train_call`); torch.compile sees the
    op. Both give the same outputs and gradients."""
    kernels_or_skip(kernels)
    from fused_resnet.ops.block_ops import block_train_call

    args = block_args("bottleneck projection")
    results = []
    for call in (OPS.block_train, block_train_call):
        leaves = [args[0].detach().clone().requires_grad_()] + [
            [t.detach().clone().requires_grad_() for t in ts] for ts in args[1:4]]
        z, *rest = call(*leaves, *args[4:], kernels)
        ys, means, variances, affines = rest[-4:]  # the op's ReLU mask before them
        z.backward(torch.linspace(-1, 1, z.numel(), device=DEVICE).view_as(z))
        grads = [leaves[0].grad] + [t.grad for ts in leaves[1:] for t in ts]
        results.append((z, *ys, *means, *variances, *affines, *grads))
    for got, expected in zip(*results):
        assert_close(got, expected, kind="grad")


@pytest.mark.parametrize("kernels", ["native", "triton"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_no_data_gradient_for_an_input_without_grad(name, kernels, monkeypatch):
    """The first trainable block after frozen layers: x needs no gradient, so neither conv 1's
    nor the projection's data gradient is computed (no Triton dgrad with their weights; ATen's
    convolution_backward masks it), and the parameter gradients are those with x's."""
    kernels_or_skip(kernels)
    import fused_resnet.ops.native_block as native_block
    import fused_resnet.ops.triton_block as triton_block
    from fused_resnet.ops.block_ops import block_train_call

    dgrads = []  # (the conv's weight, whether its data gradient was computed)
    dgrad, aten_backward = triton_block.conv_dgrad, native_block.conv_backward
    args = block_args(name)

    def recording_dgrad(dy, weight, x_shape, **kwargs):
        # the projection's without y_d takes a * w_d as its weight, and a tap residual
        dgrads.append(("w_d" if kwargs.get("tap_residual") is not None else weight.data_ptr(),
                       True))
        return dgrad(dy, weight, x_shape, **kwargs)

    def recording_backward(dy, x, weight, stride, padding, dilation, groups, need_dx=True,
                           need_dw=True):
        dgrads.append((weight.data_ptr(), need_dx))
        return aten_backward(dy, x, weight, stride, padding, dilation, groups, need_dx, need_dw)

    monkeypatch.setattr(triton_block, "conv_dgrad", recording_dgrad)
    monkeypatch.setattr(native_block, "conv_backward", recording_backward)
    grads = []
    for x_grad in (True, False):
        x = args[0].detach().requires_grad_(x_grad)
        leaves = [[t.detach().clone().requires_grad_() for t in ts] for ts in args[1:4]]
        dgrads.clear()
        for call in (OPS.block_train, block_train_call):
            z = call(x, *leaves, *args[4:], kernels)[0]
            z.backward(torch.linspace(-1, 1, z.numel(), device=DEVICE).view_as(z))
        assert (x.grad is not None) == x_grad
        on_x = [leaves[0][0]] + ([leaves[0][-1]] if args[8] == "projection" else [])
        data_grads = [need for ptr, need in dgrads
                      if ptr == "w_d" or ptr in {w.data_ptr() for w in on_x}]
        expected = 2 * len(on_x)  # conv 1 (+ projection), two calls
        assert data_grads == ([True] * expected if x_grad else
                              [] if kernels == "triton" else [False] * expected), dgrads
        grads.append([t.grad for ts in leaves for t in ts])
    for got, expected in zip(*grads):
        assert_close(got, expected, kind="grad")


def _block_pair(backend, shortcut="identity"):
    """A torchvision Bottleneck (32 -> 32 with an identity shortcut, or 16 -> 32 at stride 2
    with a projection) and its fused twin, same weights."""
    def block():
        if shortcut == "identity":
            return torchvision.models.resnet.Bottleneck(32, 8)
        downsample = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 1, 2, bias=False),
                                         torch.nn.BatchNorm2d(32))
        return torchvision.models.resnet.Bottleneck(16, 8, stride=2, downsample=downsample)

    eager = torch.nn.Sequential(block()).to(DEVICE)
    fused = torch.nn.Sequential(block()).to(DEVICE)
    fused.load_state_dict(eager.state_dict())
    return eager.train(), fr.convert(fused, backend=backend).train()


@pytest.mark.parametrize("shortcut", ["identity", "projection"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_block_saves_no_activated_tensor(backend, shortcut):
    """Eager keeps x, y1, a1, y2, a2, y3 (, y_d) and z (conv inputs, BN inputs, ReLU
    outputs); the fused block keeps x, y1, y2, y3 (, y_d), z: exactly a1 and a2 fewer bytes.
    Per BN of C channels eager keeps the batch mean and 1 / std (2C floats), the fused block
    the mean and the (rstd, scale, shift) its forward applied (4C). On Triton the block keeps
    z's ReLU mask as bits (one int32 word per pixel and 32 channels) instead of z, and
    neither y3 nor y_d (its backward does without them:
    `triton_block._last_bn_backward_without_y`, `_shortcut_bn_backward_without_y`)."""
    eager, fused = _block_pair(backend, shortcut)
    c_in, s = (32, 1) if shortcut == "identity" else (16, 2)
    x = torch.randn(2, c_in, 6, 6, device=DEVICE)
    pixels, out_pixels = 2 * 6 * 6, 2 * (6 // s) * (6 // s)
    a_bytes = (pixels + out_pixels) * 8 * 4  # a1 and a2: 8 fp32 channels each
    bns = [8, 8, 32] + ([32] if shortcut == "projection" else [])
    stat_bytes = 2 * sum(bns) * 4  # 2C more fp32 per BN
    out_bytes = out_pixels * 32 * 4  # z, y3 and y_d each
    triton = backend == "triton"
    z_bytes = out_bytes - out_pixels * 4 if triton else 0  # z -> bits
    y_bytes = out_bytes * (len(bns) - 2) if triton else 0  # y3 (and y_d) not kept
    eager_bytes = activation_bytes(eager, lambda: eager(x))
    fused_bytes = activation_bytes(fused, lambda: fused(x))
    assert fused_bytes == eager_bytes - a_bytes + stat_bytes - z_bytes - y_bytes, (
        fused_bytes, eager_bytes)


def test_resnet50_on_the_native_backend_saves_less_activation_memory():
    """Measured on CPU (batch 8, 64x64, fp32): fused `_C` 45.6 MiB, eager 53.8 MiB."""
    if unavailable_reason(NATIVE, torch.device(DEVICE)) is not None:
        pytest.skip("needs the _C extension")
    eager = torchvision.models.resnet50().to(DEVICE).train()
    fused = fr.models.resnet50(backend=NATIVE).to(DEVICE).train()
    x = torch.randn(8, 3, 64, 64, device=DEVICE)
    ratio = (activation_bytes(fused, lambda: fused(x))
             / activation_bytes(eager, lambda: eager(x)))
    assert ratio < 0.9, f"fused / eager activation bytes = {ratio:.3f}"


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ATen ops (not views or allocations) that fused_resnet's own code calls."""

    FREE = {"view", "permute", "as_strided", "expand", "reshape", "select", "slice", "t",
            "transpose", "unsqueeze", "squeeze", "alias", "detach", "empty", "empty_like",
            "empty_strided", "new_empty", "new_empty_strided", "unbind", "_reshape_alias",
            "_unsafe_view", "lift_fresh", "is_same_size"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        if name not in self.FREE:
            frame = sys._getframe(1)
            while frame is not None and "/torch/" in frame.f_code.co_filename:
                frame = frame.f_back
            if frame is not None and "/fused_resnet/" in frame.f_code.co_filename:
                self.ops.append(f"{name} ({os.path.basename(frame.f_code.co_filename)}:"
                                f"{frame.f_lineno})")
        return func(*args, **(kwargs or {}))


def test_a_training_step_of_a_block_runs_few_aten_ops_between_its_kernels():
    """Each ATen op is a launch and host time on a GPU. A bottleneck with a projection (4
    convs, 4 BNs) in training, forward and backward, on the Triton kernels: 24 ops of ours
    (weight layouts, the deterministic sums of partials, the running-stat updates), where
    computing each BN's backward coefficients and affine with torch ops took ~80."""
    skip_without_triton()
    cl = torch.channels_last
    downsample = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 1, 2, bias=False),
                                     torch.nn.BatchNorm2d(32))
    block = torchvision.models.resnet.Bottleneck(16, 8, stride=2, downsample=downsample)
    block = fr.convert(torch.nn.Sequential(block), backend="triton").train().to(DEVICE)
    x = torch.randn(2, 16, 6, 6, device=DEVICE).to(memory_format=cl).requires_grad_()
    dz = torch.randn(2, 32, 3, 3, device=DEVICE).to(memory_format=cl)
    block(x).backward(dz)  # tunes / compiles outside the count
    with _CountOps() as counted:
        block(x).backward(dz)
    assert len(counted.ops) <= 28, "\n".join(counted.ops)


def test_under_autocast_the_triton_block_takes_the_fp32_weights_themselves():
    """The weights reach the block op uncast (the kernels cast them in the copy that lays out
    their GEMM operand): no cast node between a weight and the op, one ATen op fewer each way,
    and fp32 weight gradients straight from the fp32 wgrad, within the precision rule (2x
    eager autocast's error against an fp64 truth)."""
    skip_without_triton()
    downsample = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 1, 2, bias=False),
                                     torch.nn.BatchNorm2d(32))
    eager = torchvision.models.resnet.Bottleneck(16, 8, stride=2, downsample=downsample)
    fused = fr.convert(torch.nn.Sequential(copy.deepcopy(eager)), backend="triton")
    truth = copy.deepcopy(eager).double()
    x = torch.randn(2, 16, 6, 6, device=DEVICE).to(memory_format=torch.channels_last)
    dz = torch.randn(2, 32, 3, 3, device=DEVICE)
    outs = []
    for model in (eager.to(DEVICE).train(), fused.to(DEVICE).train()):
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
            out = model(x)
        out.backward(dz.to(out.dtype))
        outs.append(out)
    truth.to(DEVICE).train()(x.double()).backward(dz.double())
    assert outs[1].dtype == torch.bfloat16
    feeding = {id(fn.variable) for fn, _ in outs[1].grad_fn.next_functions
               if fn is not None and type(fn).__name__ == "AccumulateGrad"}

    def weights(m):
        return [c.weight for c in m.modules() if isinstance(c, torch.nn.Conv2d)]

    assert len(weights(fused)) == 4 and all(id(w) in feeding for w in weights(fused))
    for w, e, t in zip(weights(fused), weights(eager), weights(truth)):
        assert w.grad.dtype == torch.float32
        result = compare_norm(w.grad, t.grad, e.grad, kind="grad")
        assert result.ok, (tuple(w.shape), result)
