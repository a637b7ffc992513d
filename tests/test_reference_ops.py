"""The reference op and the module wrapper against nn.Conv2d + nn.BatchNorm2d (+ add + ReLU)."""

import itertools

import pytest
import torch
from torch import nn

from fused_resnet import ops, reference
from fused_resnet.nn import conv_bn_act as module_conv_bn_act
from fused_resnet.testing import assert_close

# Pairwise-style spread: each kernel size meets each stride, padding and channel count.
CASES = [
    # (c_in, c_out, kernel, stride, padding, residual, relu)
    (3, 16, 7, 2, 3, False, True),
    (16, 32, 3, 1, 1, True, True),
    (24, 16, 1, 2, 0, True, False),
    (16, 16, 3, 2, 0, False, False),
    (3, 32, 1, 1, 0, True, True),
    (24, 32, 7, 1, 3, False, True),
]


def _eager(c_in, c_out, kernel, stride, padding, dtype=torch.float64):
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False).to(dtype)
    bn = nn.BatchNorm2d(c_out).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return conv, bn


@pytest.mark.parametrize("c_in, c_out, kernel, stride, padding, residual, relu", CASES)
@pytest.mark.parametrize("training", [True, False])
def test_op_matches_eager_modules(c_in, c_out, kernel, stride, padding, residual, relu, training):
    conv, bn = _eager(c_in, c_out, kernel, stride, padding, torch.float32)
    conv_ref, bn_ref = _eager(c_in, c_out, kernel, stride, padding, torch.float32)
    conv_ref.load_state_dict(conv.state_dict())
    bn_ref.load_state_dict(bn.state_dict())
    for m in (bn, bn_ref):
        m.train(training)
        with torch.no_grad():
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    bn_ref.load_state_dict(bn.state_dict())
    x = torch.randn(2, c_in, 8, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y_shape = conv_ref(x_ref).shape
    r = torch.randn(y_shape) if residual else None
    out = ops.conv_bn_act(x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                          stride=stride, padding=padding, training=training, residual=r,
                          relu=relu)
    expected = bn_ref(conv_ref(x_ref)) + (r if residual else 0)
    expected = torch.relu(expected) if relu else expected
    assert_close(out, expected, name="output")
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    assert_close(x.grad, x_ref.grad, kind="grad", name="x.grad")
    assert_close(conv.weight.grad, conv_ref.weight.grad, kind="grad", name="weight.grad")
    assert_close(bn.weight.grad, bn_ref.weight.grad, kind="grad", name="bn_weight.grad")
    assert_close(bn.bias.grad, bn_ref.bias.grad, kind="grad", name="bn_bias.grad")
    assert_close(bn.running_mean, bn_ref.running_mean, name="running_mean")
    assert_close(bn.running_var, bn_ref.running_var, name="running_var")


def test_reference_gradcheck_fp64():
    conv, bn = _eager(3, 4, 3, 2, 1)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)

    def fn(x, w, g, b, r):
        return reference.conv_bn_act(x, w, g, b, None, None, stride=2, padding=1, residual=r)

    assert torch.autograd.gradcheck(fn, (x, conv.weight, bn.weight, bn.bias, r))


@pytest.mark.parametrize("momentum, track, affine", list(itertools.product(
    [0.1, None], [True, False], [True, False])))
def test_module_wrapper_keeps_batchnorm_semantics(momentum, track, affine):
    """Running stats, num_batches_tracked and eval behaviour over 3 steps, as nn.BatchNorm2d."""
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    bn = nn.BatchNorm2d(8, momentum=momentum, track_running_stats=track, affine=affine)
    bn_ref = nn.BatchNorm2d(8, momentum=momentum, track_running_stats=track, affine=affine)
    bn_ref.load_state_dict(bn.state_dict())
    for _ in range(3):
        x = torch.randn(2, 4, 6, 6) * 3 + 1
        out = module_conv_bn_act(x, conv, bn, relu=False, backend="reference")
        assert_close(out, bn_ref(conv(x)))
    for key, value in bn_ref.state_dict().items():
        assert_close(bn.state_dict()[key].double(), value.double(), name=key)
    bn.eval()
    bn_ref.eval()
    x = torch.randn(2, 4, 6, 6)
    assert_close(module_conv_bn_act(x, conv, bn, relu=False), bn_ref(conv(x)))


def test_autocast_runs_the_conv_in_low_precision_and_bn_stats_stay_fp32():
    conv, bn = _eager(4, 8, 3, 1, 1, torch.float32)
    x = torch.randn(2, 4, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module_conv_bn_act(x, conv, bn)
        expected = torch.relu(bn(conv(x)))
    assert out.dtype == expected.dtype == torch.bfloat16
    assert bn.running_mean.dtype == torch.float32
    torch.testing.assert_close(out, expected)


def _args(**overrides):
    base = {
        "x": torch.randn(2, 4, 6, 6), "weight": torch.randn(8, 4, 3, 3),
        "bn_weight": torch.ones(8), "bn_bias": torch.zeros(8),
        "running_mean": torch.zeros(8), "running_var": torch.ones(8),
    }
    kwargs = {"padding": 1}
    for key, value in overrides.items():
        (base if key in base else kwargs)[key] = value
    return base, kwargs


@pytest.mark.parametrize("overrides, message", [
    ({"x": torch.randn(4, 6, 6)}, "x must be 4-D"),
    ({"weight": torch.randn(8, 4, 3)}, "weight must be 4-D"),
    ({"weight": torch.randn(8, 4, 3, 3, dtype=torch.float64)}, "weight dtype"),
    ({"weight": torch.randn(8, 5, 3, 3)}, "channels"),
    ({"bn_weight": torch.ones(7)}, "bn_weight must have shape"),
    ({"running_var": None}, "running_mean and running_var"),
    ({"residual": torch.randn(2, 8, 5, 5)}, "residual must have shape"),
    ({"residual": torch.randn(2, 8, 6, 6, dtype=torch.float64)}, "residual must match"),
    ({"x": torch.randn(2, 4, 1, 1), "padding": 0}, "smaller than the kernel"),
    ({"stride": 0}, "stride"),
    ({"x": torch.randint(0, 3, (2, 4, 6, 6))}, "floating-point"),
    ({"backend": "gpu"}, "backend must be one of"),
    ({"x": torch.randn(1, 4, 1, 1), "weight": torch.randn(8, 4, 1, 1), "padding": 0},
     "more than 1 value per channel"),
])
def test_bad_input_is_named_and_changes_no_state(overrides, message):
    tensors, kwargs = _args(**overrides)
    stats = {k: tensors[k].clone() for k in ("running_mean", "running_var")
             if tensors[k] is not None}
    with pytest.raises((ValueError, RuntimeError), match=message):
        ops.conv_bn_act(*tensors.values(), **kwargs)
    for key, value in stats.items():
        assert torch.equal(tensors[key], value), key


def test_failed_module_call_keeps_num_batches_tracked():
    conv = nn.Conv2d(4, 8, 1, bias=False)
    bn = nn.BatchNorm2d(8, momentum=None)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        module_conv_bn_act(torch.randn(1, 4, 1, 1), conv, bn)
    assert int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.running_mean, torch.zeros(8))


def test_fold_bn_is_eval_batchnorm():
    bn = nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    scale, shift = reference.fold_bn(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    y = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        assert_close(y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), bn(y))


def _strided_1x1_case(seed=0):
    """2 x 4 x 8 x 8 channels_last fp32 into a 1x1 conv at stride 2: oneDNN's weight gradient
    of it (torch 2.11 - 2.14, x86-64) is wrong in ~2% of calls (`reference.strided_1x1_on_cpu`)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 4, 1, 1, generator=g)
    dy = torch.randn(2, 4, 4, 4, generator=g)
    # dw[o, i] = sum over (n, oh, ow) of dy[n, o, oh, ow] * x[n, i, 2 oh, 2 ow], in fp64
    dw = torch.einsum("nohw,nihw->oi", dy.double(), x[:, :, ::2, ::2].double())
    dx = torch.zeros(x.shape, dtype=torch.float64)
    dx[:, :, ::2, ::2] = torch.einsum("nohw,oi->nihw", dy.double(), w.double().view(4, 4))
    return x, w, dy, dw.view(4, 4, 1, 1), dx


@pytest.mark.parametrize("path", ["reference", "cpu"])
def test_strided_1x1_weight_gradient_on_cpu_is_right_every_call(path):
    """300 calls (ATen's direct weight gradient fails this ~99.8% of the time): the
    reference's conv and the `cpu` backend's backward take it from the stride-1 conv of
    x[:, :, ::2, ::2]; dx keeps x's memory format."""
    if path == "cpu":
        pytest.importorskip("fused_resnet._C")
        from fused_resnet.ops.native_kernels import conv_backward
    x, w, dy, dw_exact, dx_exact = _strided_1x1_case()
    wrong = 0
    for _ in range(300):
        if path == "reference":
            xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
            y = reference.conv2d(xs, ws, None, 2, 0)
            assert y.shape == dy.shape
            y.backward(dy)
            dx, dw = xs.grad, ws.grad
        else:
            dx, dw = conv_backward(dy, x, w, 2, 0, 1, 1)
        wrong += not torch.allclose(dw.double(), dw_exact, rtol=1e-5, atol=1e-5)
        assert torch.allclose(dx.double(), dx_exact, rtol=1e-5, atol=1e-5)
        assert dx.is_contiguous(memory_format=torch.channels_last)
    assert wrong == 0, f"{wrong} of 300 weight gradients wrong"
    if path == "cpu":
        assert conv_backward(dy, x, w, 2, 0, 1, 1, need_dx=False)[0] is None


def test_strided_1x1_on_cpu_names_only_that_conv():
    x = torch.empty(1, 4, 8, 8)
    assert reference.strided_1x1_on_cpu(x, torch.empty(4, 4, 1, 1), 2, 0)
    assert not reference.strided_1x1_on_cpu(x, torch.empty(4, 4, 1, 1), 1, 0)
    assert not reference.strided_1x1_on_cpu(x, torch.empty(4, 4, 1, 1), 2, 1)
    wide = torch.empty(1, 16, 8, 8)  # ResNet widths: ATen's conv, as torchvision runs it
    assert not reference.strided_1x1_on_cpu(wide, torch.empty(4, 16, 1, 1), 2, 0)
    assert not reference.strided_1x1_on_cpu(x, torch.empty(4, 4, 3, 3), 2, 0)
    assert not reference.strided_1x1_on_cpu(x.to("meta"), torch.empty(4, 4, 1, 1), 2, 0)
