"""Fused conv + BN + add + ReLU ops against the reference, on Triton (TRITON_INTERPRET=1 on
CPU) and on the `_C` kernels ("cpu" here, "cuda" on a GPU machine)."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from _backends import DEVICE, FUSED_BACKENDS, NATIVE, skip_without_triton

from fused_resnet import ops, reference
from fused_resnet.backend import unavailable_reason
from fused_resnet.testing import assert_close, compare

# Pairwise spread of the grid: kernel 1/3/7 x stride 1/2 x padding 0/1/3 x C_in 3/16/24 x
# C_out 16/32 x residual x ReLU x train/eval; every pair of values of two parameters occurs.
GRID = [
    # kernel, stride, padding, c_in, c_out, residual, relu, training
    (1, 1, 0, 3, 16, False, True, True),
    (1, 2, 0, 16, 32, True, False, False),
    (1, 1, 1, 24, 16, True, True, False),
    (1, 2, 3, 3, 32, False, False, False),
    (1, 2, 0, 16, 32, True, True, True),  # 1x1 training: BN backward applied on load,
    (1, 1, 0, 24, 32, False, False, True),  # from g (residual) or dz (no ReLU)
    (3, 1, 1, 3, 32, True, True, True),
    (3, 2, 1, 16, 16, False, True, False),
    (3, 2, 0, 24, 32, True, False, True),
    (3, 1, 3, 16, 16, False, False, True),
    (3, 1, 0, 24, 16, False, True, True),
    (7, 2, 3, 3, 16, False, True, True),
    (7, 1, 3, 24, 32, True, True, False),
    (7, 2, 0, 16, 16, True, False, True),
]
# The full product of the same values (864 cases): on the `_C` backend everywhere (a few
# seconds on CPU; a GPU test on a GPU machine), on Triton only in the GPU machine's slow run
# (the interpreter takes about a second per case).
EXHAUSTIVE = list(itertools.product(*(sorted(set(column)) for column in zip(*GRID))))


def _exhaustive_marks(param):
    """Triton: the GPU machine's slow run; `_C`: every run, a GPU test where it is CUDA."""
    if param.id == "triton":
        return [*param.marks, pytest.mark.gpu, pytest.mark.slow]
    return [*param.marks, pytest.mark.gpu] if DEVICE == "cuda" else list(param.marks)


EXHAUSTIVE_BACKENDS = [pytest.param(*p.values, id=p.id, marks=_exhaustive_marks(p))
                       for p in FUSED_BACKENDS]


def _params(c_out, dtype=torch.float32, device=DEVICE):
    gamma = (torch.rand(c_out, device=device) + 0.5).to(dtype)
    beta = (torch.randn(c_out, device=device) * 0.5).to(dtype)
    mean = (torch.randn(c_out, device=device) * 0.2).to(dtype)
    var = (torch.rand(c_out, device=device) + 0.5).to(dtype)
    return gamma, beta, mean, var


def _run(backend, x, w, gamma, beta, mean, var, residual, relu_mask=None, **kwargs):
    """Output, gradients of (x, w, gamma, beta, residual) and the updated running stats.
    relu_mask: a 0/1 tensor that replaces the ReLU in the backward; the output returned is
    then the pre-activation (see `_reference_at_kinks`)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, gamma, beta)]
    r = residual.detach().clone().requires_grad_() if residual is not None else None
    stats = (mean.clone(), var.clone())
    if relu_mask is not None:
        kwargs = {**kwargs, "relu": False}
    out = ops.conv_bn_act(*leaves, *stats, residual=r, backend=backend, **kwargs)
    torch.manual_seed(1)
    (out if relu_mask is None else out * relu_mask).backward(torch.randn_like(out))
    grads = [t.grad for t in leaves] + ([r.grad] if r is not None else [])
    return out, grads, stats


def _reference_at_kinks(out, x, w, params, residual, **kwargs):
    """The reference's output, and its gradients and running stats taken at the ReLU kink
    decisions of the candidate's output `out`. Where the two pre-activations straddle 0 within
    rounding (|z| ~ 1e-7 of its scale: about one element in a million at ResNet sizes, seen on
    an H200 and reproduced in the interpreter), ReLU passes dz on one side and 0 on the other,
    and every gradient differs by that element's whole dz: the reference's backward then
    multiplies by `out > 0` instead of its own ReLU's mask. The output returned is still the
    reference's own ReLU (F.relu of its pre-activation, as the reference op computes it), so a
    wrong kink in the candidate's forward cannot hide behind the mask. One reference run."""
    if not kwargs.get("relu", True):
        return _run("reference", x, w, *params, residual, **kwargs)
    mask = (out.detach() > 0).to(out.dtype)
    pre, ref_grads, ref_stats = _run("reference", x, w, *params, residual, relu_mask=mask,
                                     **kwargs)
    return torch.relu(pre.detach()), ref_grads, ref_stats


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("kernel, stride, padding, c_in, c_out, residual, relu, training", GRID)
def test_matches_reference(kernel, stride, padding, c_in, c_out, residual, relu, training,
                           backend):
    x = torch.randn(2, c_in, 8, 8, device=DEVICE)
    w = torch.randn(c_out, c_in, kernel, kernel, device=DEVICE) * 0.2
    params = _params(c_out)
    size = (8 + 2 * padding - kernel) // stride + 1
    r = torch.randn(2, c_out, size, size, device=DEVICE) if residual else None
    kwargs = {"stride": stride, "padding": padding, "training": training, "relu": relu}
    out, grads, stats = _run(backend, x, w, *params, r, **kwargs)
    ref_out, ref_grads, ref_stats = _reference_at_kinks(out, x, w, params, r, **kwargs)
    assert_close(out, ref_out, name="output")
    for name, g, ref in zip(("x", "weight", "bn_weight", "bn_bias", "residual"), grads, ref_grads):
        assert_close(g, ref, kind="grad", name=f"d{name}")
    for name, s, ref in zip(("running_mean", "running_var"), stats, ref_stats):
        assert_close(s, ref, name=name)


@pytest.mark.parametrize("kernel, stride, padding, c_in, c_out, residual, relu, training",
                         [case for case in GRID if case[0] == 1 and case[-1]])
def test_1x1_training_with_written_dy(kernel, stride, padding, c_in, c_out, residual, relu,
                                      training):
    """`config.operands() == "written"`: a 1x1 conv's backward writes its dy once instead of
    applying the BN backward on load."""
    skip_without_triton()
    from fused_resnet.triton.config import operands_mode

    with operands_mode("written"):
        test_matches_reference(kernel, stride, padding, c_in, c_out, residual, relu, training,
                               "triton")


@pytest.mark.parametrize("backend", EXHAUSTIVE_BACKENDS)
@pytest.mark.parametrize("kernel, stride, padding, c_in, c_out, residual, relu, training",
                         EXHAUSTIVE)
def test_matches_reference_exhaustive(kernel, stride, padding, c_in, c_out, residual, relu,
                                      training, backend):
    test_matches_reference(kernel, stride, padding, c_in, c_out, residual, relu, training,
                           backend)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_output_follows_the_input_memory_format(channels_last, backend):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 16, 6, 6, device=DEVICE).contiguous(memory_format=fmt)
    w = torch.randn(16, 16, 3, 3, device=DEVICE).contiguous(memory_format=fmt)
    for training in (True, False):
        out = ops.conv_bn_act(x, w, *_params(16), padding=1, training=training,
                              backend=backend)
        assert out.is_contiguous(memory_format=fmt)
        ref = reference.conv_bn_act(x, w, *_params(16), padding=1, training=training)
        assert out.shape == ref.shape


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_batch_variance_of_large_mean_activations(backend):
    """Mean 1e4, std 1: the shifted / Chan-merged statistics keep the variance exact."""
    x = torch.randn(2, 16, 8, 8, device=DEVICE, dtype=torch.float32) + 1e4
    w = torch.zeros(16, 16, 1, 1, device=DEVICE)
    w[:, :, 0, 0] = torch.eye(16, device=DEVICE)  # identity conv: y = x
    gamma, beta, mean, var = _params(16)
    mean.zero_()
    var.fill_(1.0)
    ops.conv_bn_act(x, w, gamma, beta, mean, var, momentum=1.0, backend=backend)
    x64 = x.double()
    expected_var = x64.var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(var.double(), expected_var, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mean.double(), x64.mean(dim=(0, 2, 3)), rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_fp64(training, backend):
    if backend == "cuda":
        pytest.skip("fp64 gradcheck runs on CPU tensors")
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    gamma, beta, mean, var = (t.double() for t in _params(3, device="cpu"))
    gamma.requires_grad_()
    beta.requires_grad_()
    r = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)

    def fn(x, w, gamma, beta, r):
        return ops.conv_bn_act(x, w, gamma, beta, mean.clone(), var.clone(), stride=2,
                               padding=1, training=training, residual=r, relu=False,
                               backend=backend)

    assert torch.autograd.gradcheck(fn, (x, w, gamma, beta, r), fast_mode=True)


@pytest.mark.parametrize("kernels", ["triton", "native"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("need_dx", [True, False], ids=["dx", "no_dx"])
@pytest.mark.parametrize("need_dw", [True, False], ids=["dw", "no_dw"])
def test_opcheck(training, kernels, need_dx, need_dw):
    reason = unavailable_reason("triton" if kernels == "triton" else NATIVE, torch.device(DEVICE))
    if reason is not None:
        pytest.skip(reason)
    # stride 1, padding 2, dilation 2 (the fake kernels' output shape of a dilated conv)
    x = torch.randn(2, 4, 5, 5, device=DEVICE)
    w = torch.randn(8, 4, 3, 3, device=DEVICE, requires_grad=True)
    gamma, beta, _, _ = _params(8)
    r = torch.randn(2, 8, 5, 5, device=DEVICE)
    if training:
        op = torch.ops.fused_resnet.conv_bn_train.default
        args = (x, w, gamma.requires_grad_(), beta, r, 1, 2, 2, 1, 1e-5, True, kernels)
    else:
        op = torch.ops.fused_resnet.conv_bias_act.default
        args = (x, w, beta.requires_grad_(), r, 1, 2, 2, 1, True, kernels)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor",
                                                "test_autograd_registration"))
    # The backward ops, called as autograd calls them.
    outputs = op(*args)
    z = outputs[0] if training else outputs
    dz = torch.randn_like(z)
    if training:
        _, y, mean, var = outputs
        backward = torch.ops.fused_resnet.conv_bn_train_backward.default
        bwd_args = (dz, x, w.detach(), gamma.detach(), y, z, mean, var, 1, 2, 2, 1, 1e-5,
                    True, True, kernels, need_dx, need_dw)
    else:
        backward = torch.ops.fused_resnet.conv_bias_act_backward.default
        bwd_args = (dz, x, w.detach(), z.detach(), beta.detach(), 1, 2, 2, 1, True, True,
                    kernels, need_dx, need_dw)
    torch.library.opcheck(backward, bwd_args, test_utils=("test_schema", "test_faketensor"))
    dx, dw = backward(*bwd_args)[:2]
    assert dx.shape == (x.shape if need_dx else (0,))
    assert dw.shape == (w.shape if need_dw else (0,))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_no_data_gradient_for_an_input_without_grad(training, backend, monkeypatch):
    """A stem's input image needs no gradient: the backward skips the data gradient (Triton's
    dgrad kernel is not launched; ATen's convolution_backward gets a mask without it) and the
    weight, BN and residual gradients are those of the reference."""
    import fused_resnet.ops.native_kernels as native
    import fused_resnet.ops.triton_kernels as triton_kernels

    def no_dgrad(*args, **kwargs):
        raise AssertionError("the data gradient was computed")

    monkeypatch.setattr(triton_kernels, "conv_dgrad", no_dgrad)
    aten_backward = native.conv_backward
    masks = []

    def recording_backward(*args):
        masks.append(args[7:])
        return aten_backward(*args)

    monkeypatch.setattr(native, "conv_backward", recording_backward)
    x = torch.randn(2, 3, 9, 9, device=DEVICE)
    w = (torch.randn(8, 3, 7, 7, device=DEVICE) * 0.1).requires_grad_()
    gamma, beta, mean, var = _params(8)
    r = torch.randn(2, 8, 5, 5, device=DEVICE, requires_grad=True)
    kwargs = {"stride": 2, "padding": 3, "training": training, "relu": True}
    out = ops.conv_bn_act(x, w, gamma.requires_grad_(), beta.requires_grad_(), mean.clone(),
                          var.clone(), residual=r, backend=backend, **kwargs)
    out.backward(torch.ones_like(out))
    assert x.grad is None
    if backend != "triton":
        assert masks == [(False, True)]
    leaves = [t.detach().clone().requires_grad_() for t in (w, gamma, beta, r)]
    ref = ops.conv_bn_act(x, *leaves[:3], mean.clone(), var.clone(), residual=leaves[3],
                          backend="reference", **kwargs)
    ref.backward(torch.ones_like(ref))
    for name, t, leaf in zip(("weight", "bn_weight", "bn_bias", "residual"), (w, gamma, beta, r),
                             leaves):
        assert_close(t.grad, leaf.grad, kind="grad", name=f"d{name}")


def test_block_end_with_a_projection_shortcut_bn():
    """z = relu(bn(y) + bn_ds(y2)) forward and backward, against autograd in fp64."""
    skip_without_triton()
    from fused_resnet.triton.bn import bn_bwd_reduce
    from fused_resnet.triton.eltwise import BnBackward, bn_act_bwd, bn_act_fwd

    cl = torch.channels_last
    y = (torch.randn(2, 8, 4, 4, device=DEVICE) * 2 + 1).contiguous(memory_format=cl)
    y2 = (torch.randn(2, 8, 4, 4, device=DEVICE) - 3).contiguous(memory_format=cl)
    g1, b1, _, _ = _params(8)
    g2, b2, _, _ = _params(8)
    leaves = [t.double().requires_grad_() for t in (y, y2, g1, b1, g2, b2)]

    def bn(t, g, b):
        return F.batch_norm(t, None, None, g, b, training=True, eps=1e-5)

    z_ref = torch.relu(bn(leaves[0], *leaves[2:4]) + bn(leaves[1], *leaves[4:6]))
    dz = torch.randn_like(z_ref).contiguous(memory_format=cl)
    z_ref.backward(dz)

    def stats(t):
        mean = t.mean(dim=(0, 2, 3))
        var = t.var(dim=(0, 2, 3), unbiased=False)
        return mean, torch.rsqrt(var + 1e-5)

    (m1, r1), (m2, r2) = stats(y), stats(y2)
    z = bn_act_fwd(y, g1 * r1, b1 - m1 * g1 * r1, y2=y2, scale2=g2 * r2,
                   shift2=b2 - m2 * g2 * r2)
    assert_close(z, z_ref.float(), name="z")
    dzf = dz.float().contiguous(memory_format=cl)
    sum_g, sum_gy, sum_gy2, _ = bn_bwd_reduce(dzf, z, y, m1, r1, y2, m2, r2)
    n = y.numel() // 8
    dy, dy2, _ = bn_act_bwd(dzf, z, y, BnBackward(g1, m1, r1, sum_g, sum_gy, n),
                            y2=y2, bn2=BnBackward(g2, m2, r2, sum_g, sum_gy2, n))
    for name, got, leaf in (("dy", dy, 0), ("dy2", dy2, 1), ("dgamma", sum_gy, 2),
                            ("dbeta", sum_g, 3), ("dgamma2", sum_gy2, 4)):
        assert_close(got, leaves[leaf].grad.float(), kind="grad", name=name)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_eager_error(dtype, backend):
    """fp16 / bf16 against an fp64 truth, bounded by 2x eager PyTorch's error in that dtype
    (bf16 dots are upcast to fp32 in the interpreter, where bf16 tl.dot is unreliable)."""
    x = torch.randn(2, 16, 8, 8, device=DEVICE)
    w = torch.randn(32, 16, 3, 3, device=DEVICE) * 0.1
    params = _params(32)
    r = torch.randn(2, 32, 8, 8, device=DEVICE)
    kwargs = {"padding": 1, "training": True}
    truth, truth_grads, _ = _run("reference", x.double(), w.double(),
                                 *(p.double() for p in params), r.double(), **kwargs)
    low = [t.to(dtype) for t in (x, w)]
    eager, eager_grads, _ = _run("reference", *low, *params, r.to(dtype), **kwargs)
    fused, fused_grads, _ = _run(backend, *low, *params, r.to(dtype), **kwargs)
    assert fused.dtype == dtype
    assert_close(fused, truth, baseline=eager, name="output")
    for name, got, ref, base in zip(("x", "weight", "bn_weight", "bn_bias", "residual"),
                                    fused_grads, truth_grads, eager_grads):
        assert_close(got, ref, kind="grad", baseline=base, compute_dtype=dtype, name=f"d{name}")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_grouped_conv_runs_natively_and_is_refused_by_triton(backend):
    x = torch.randn(2, 4, 6, 6, device=DEVICE)
    w = torch.randn(8, 2, 3, 3, device=DEVICE)
    if backend == "triton":
        with pytest.raises(NotImplementedError, match="groups=2"):
            ops.conv_bn_act(x, w, *_params(8), padding=1, groups=2, backend="triton")
        backend = "auto"  # falls back to the next backend that runs grouped convs
    params = _params(8)
    for training in (True, False):
        out, grads, stats = _run(backend, x, w, *params, None, padding=1, groups=2,
                                 training=training)
        ref, ref_grads, ref_stats = _run("reference", x, w, *params, None, padding=1, groups=2,
                                         training=training)
        assert_close(out, ref)
        for s, r in zip(stats, ref_stats):
            assert_close(s, r)
        for g, r in zip(grads, ref_grads):
            assert_close(g, r, kind="grad")


@pytest.mark.parametrize("overrides, message", [
    ({"weight": torch.randn(8, 5, 3, 3)}, "channels"),
    ({"x": torch.randn(1, 4, 1, 1), "weight": torch.randn(8, 4, 1, 1), "padding": 0},
     "more than 1 value per channel"),
    ({"x": torch.randn(2, 4, 6, 6, dtype=torch.float16)}, "weight dtype"),
])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_bad_input_leaves_running_stats_unchanged(overrides, message, backend):
    args = {"x": torch.randn(2, 4, 6, 6), "weight": torch.randn(8, 4, 3, 3), "padding": 1}
    args.update(overrides)
    gamma, beta, mean, var = _params(8, device="cpu")
    before = (mean.clone(), var.clone())
    with pytest.raises(ValueError, match=message):
        ops.conv_bn_act(args.pop("x"), args.pop("weight"), gamma, beta, mean, var,
                        backend=backend, **args)
    assert torch.equal(mean, before[0]) and torch.equal(var, before[1])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("c_in, c_out, kernel, stride, size", [
    (64, 64, 1, 1, 56), (64, 64, 3, 1, 56), (256, 128, 1, 1, 56), (128, 128, 3, 2, 56),
    (512, 1024, 1, 2, 28), (3, 64, 7, 2, 224),
])
def test_resnet50_shapes_on_cuda(dtype, c_in, c_out, kernel, stride, size, backend):
    x = torch.randn(32, c_in, size, size, device="cuda").contiguous(
        memory_format=torch.channels_last)
    w = torch.randn(c_out, c_in, kernel, kernel, device="cuda") * (2.0 / (c_in * kernel**2)) ** 0.5
    params = _params(c_out)
    kwargs = {"stride": stride, "padding": kernel // 2, "training": True}
    if dtype == torch.float32:
        out, grads, stats = _run(backend, x, w, *params, None, **kwargs)
        ref, ref_grads, ref_stats = _reference_at_kinks(out, x, w, params, None, **kwargs)
        assert_close(out, ref)
        for name, g, r in zip(("x", "weight", "bn_weight", "bn_bias"), grads, ref_grads):
            # Sums over N*Ho*Wo = 25k-100k pixels: their rounding grows with the terms, not
            # with a result that cancels to near 0, so the bound is on the error relative to
            # the tensor's largest magnitude (H200: up to 9e-6 for cuDNN's wgrad against
            # itself; the interpreter: 1e-6), not element by element.
            result = compare(g, r, kind="grad")
            assert result.max_rel <= 1e-4, f"d{name}: {result}"
        for name, s, r in zip(("running_mean", "running_var"), stats, ref_stats):
            assert_close(s, r, name=name)
        return
    truth, truth_grads, _ = _run("reference", x.double(), w.double(),
                                 *(p.double() for p in params), None, **kwargs)
    eager, eager_grads, _ = _run("reference", x.to(dtype), w.to(dtype), *params, None, **kwargs)
    out, grads, _ = _run(backend, x.to(dtype), w.to(dtype), *params, None, **kwargs)
    assert_close(out, truth, baseline=eager)
    for g, t, e in zip(grads, truth_grads, eager_grads):
        assert_close(g, t, kind="grad", baseline=e, compute_dtype=dtype)
