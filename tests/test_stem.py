"""The ResNet stem (conv -> BN -> ReLU -> max-pool) as one training op on Triton
(`ops.stem`, `triton.pool`'s BN prologue and BN-backward modes) against the unfused chain:
the pool of relu(y * scale + shift) with ATen's window choice (ties among the ReLU's zeros
included), the BN backward sums and dy through the pool's gradient, the op's output,
gradients and running stats against the reference backend, what autograd keeps (not the
activation), the dispatch (inference, other backends, sync BN, another pool), the custom ops'
registration and argument errors that change no state."""

import pytest
import torch
import torch.nn.functional as F
from _backends import DEVICE, skip_without_triton

import fused_resnet as fr
from fused_resnet import reference

CL = torch.channels_last
POOLS = [(3, 2, 1), (2, 2, 0), (3, 1, 1)]  # the stem's pool, non-overlapping, stride 1


def _bn_case(shape, dtype=torch.float64, seed=0):
    """y (channels_last) and per-channel scale, shift, mean, rstd; y on a coarse grid so that
    relu(y * scale + shift) has exact zeros and ties (scale and shift powers of two)."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    y = (torch.randint(-6, 7, shape, generator=g).double() / 4).to(DEVICE, dtype)
    scale = 2.0 ** torch.randint(-1, 2, (c,), generator=g).double()
    shift = torch.randint(-2, 3, (c,), generator=g).double() / 2
    mean, rstd = torch.randn(c, generator=g, dtype=torch.float64), torch.rand(c, generator=g,
                                                                             dtype=torch.float64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (y.contiguous(memory_format=CL),
            *(t.to(DEVICE, acc) for t in (scale, shift, mean, rstd + 0.5)))


def _activation(y, scale, shift):
    return torch.relu(y.to(scale.dtype) * scale[:, None, None] + shift[:, None, None]).to(y.dtype)


@pytest.mark.parametrize("pool", POOLS, ids=lambda p: "k{}s{}p{}".format(*p))
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
@pytest.mark.parametrize("values", ["grid", "random"])
def test_pool_of_the_bn_activation_equals_atens_pool_of_it(pool, dtype, values):
    """max_pool_fwd(y, scale, shift) = F.max_pool2d(a) for a = relu(y * scale + shift) as
    the unfused chain's elementwise pass writes it (`eltwise.bn_act_fwd`: rounded to y's
    dtype; the interpreter's bf16 cast truncates, where torch's rounds), and the window
    positions those of the plain pool of a (ATen's choice among ties: most windows of a
    ReLU hold several zeros; in bf16 random values that differ only before rounding tie
    after it)."""
    skip_without_triton()
    from fused_resnet.triton.eltwise import bn_act_fwd
    from fused_resnet.triton.pool import max_pool_fwd

    y, scale, shift, _, _ = _bn_case((2, 16, 15, 15), dtype)
    if values == "random":
        g = torch.Generator().manual_seed(2)
        y = torch.randn(y.shape, generator=g).to(DEVICE, dtype).contiguous(memory_format=CL)
        scale, shift = (torch.randn(16, generator=g).to(DEVICE, scale.dtype) for _ in range(2))
    a = bn_act_fwd(y, scale, shift, relu=True)
    if dtype == torch.float64:
        assert torch.equal(a, _activation(y, scale, shift))
    out, arg = max_pool_fwd(y, *pool, write_arg=True, scale=scale, shift=shift)
    ref_out, ref_arg = max_pool_fwd(a, *pool, write_arg=True)
    assert torch.equal(out, F.max_pool2d(a, *pool).contiguous(memory_format=CL))
    assert torch.equal(arg, ref_arg) and torch.equal(out, ref_out)


@pytest.mark.parametrize("pool", POOLS, ids=lambda p: "k{}s{}p{}".format(*p))
def test_pool_backward_through_the_bn_equals_autograd(pool):
    """(sum g, sum g * yhat) and dy = a g + b y + d of g = max_pool'(dout) * [y * scale +
    shift > 0], from dout and the window positions only, against autograd through
    F.max_pool2d and the ReLU (fp64; over several programs' partial sums: 70 channels)."""
    skip_without_triton()
    from fused_resnet.triton.eltwise import BnBackward, bn_bwd_coefficient_rows
    from fused_resnet.triton.pool import max_pool_bn_bwd, max_pool_bn_bwd_sums, max_pool_fwd

    y, scale, shift, mean, rstd = _bn_case((2, 70, 9, 8))
    _, arg = max_pool_fwd(y, *pool, write_arg=True, scale=scale, shift=shift)
    leaf = _activation(y, scale, shift).requires_grad_()
    out = F.max_pool2d(leaf, *pool)
    dout = torch.randn(out.shape, dtype=torch.float64, device=DEVICE)
    out.backward(dout)
    g = leaf.grad * (y * scale[:, None, None] + shift[:, None, None] > 0)
    sum_g, sum_gy = max_pool_bn_bwd_sums(dout, arg, y, scale, shift, mean, rstd, *pool)
    yhat = (y - mean[:, None, None]) * rstd[:, None, None]
    torch.testing.assert_close(sum_g, g.sum((0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sum_gy, (g * yhat).sum((0, 2, 3)), rtol=1e-12, atol=1e-12)
    gamma = torch.linspace(0.5, 1.5, 70, dtype=torch.float64, device=DEVICE)
    n = y.numel() // 70
    coef = bn_bwd_coefficient_rows(BnBackward(gamma, mean, rstd, sum_g, sum_gy, n))
    dy = max_pool_bn_bwd(dout, arg, y, scale, shift, coef, *pool)
    a, b, d = reference.bn_backward_affine(gamma, mean, rstd, sum_g, sum_gy, n)
    expected = a[:, None, None] * g + b[:, None, None] * y + d[:, None, None]
    assert dy.is_contiguous(memory_format=CL)
    torch.testing.assert_close(dy, expected, rtol=1e-12, atol=1e-12)


def _stem_args(dtype=torch.float64, c_in=3, size=20, batch=2, c_out=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, c_in, size, size, generator=g, dtype=dtype).to(DEVICE)
    w = (torch.randn(c_out, c_in, 7, 7, generator=g, dtype=dtype) * 0.2).to(DEVICE)
    gamma = (torch.rand(c_out, generator=g, dtype=dtype) + 0.5).to(DEVICE)
    beta = torch.randn(c_out, generator=g, dtype=dtype).to(DEVICE)
    return x, w, gamma, beta


def _run(backend, args, dtype, x_grad=True, autocast=False, low=torch.bfloat16, **kwargs):
    """(out, grads of x (or None), w, gamma, beta, running mean, running var) of one call."""
    leaves = [t.detach().clone().requires_grad_(i > 0 or x_grad) for i, t in enumerate(args)]
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    c = args[1].shape[0]
    rm, rv = torch.zeros(c, dtype=stat, device=DEVICE), torch.ones(c, dtype=stat, device=DEVICE)
    with torch.autocast(torch.device(DEVICE).type, dtype=low, enabled=autocast):
        out = fr.ops.conv_bn_relu_max_pool(*leaves, rm, rv, backend=backend, **kwargs)
    out.backward(torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out).to(out.dtype))
    return [out] + [t.grad for t in leaves] + [rm, rv]


@pytest.mark.parametrize("x_grad", [True, False], ids=["dx", "no_dx"])
def test_stem_op_equals_the_reference_chain(x_grad):
    """Output, every gradient and the running stats of the fused stem against the reference
    conv -> BN -> ReLU -> max-pool (fp64); x's gradient only where it asks for one."""
    skip_without_triton()
    args = _stem_args()
    got = _run("triton", args, torch.float64, x_grad)
    expected = _run("reference", args, torch.float64, x_grad)
    assert got[1] is None if not x_grad else got[1] is not None
    for a, e in zip(got, expected):
        if e is not None:
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_stem_op_under_bf16_autocast_is_within_the_precision_rule():
    """bf16 autocast (the conv in bf16, BN statistics and parameters fp32): the output and
    gradients of the fused stem against eager autocast, both against an fp64 run, within
    DESIGN.md's rule; the running stats equal those of the unfused Triton chain (the same
    conv and statistics kernels: the interpreter's bf16 truncation biases both)."""
    skip_without_triton()
    from fused_resnet.testing import compare_norm

    args = _stem_args(torch.float32, size=24)
    got = _run("triton", args, torch.float32, autocast=True)
    eager = _run("reference", args, torch.float32, autocast=True)
    truth = _run("reference", [t.double() for t in args], torch.float64)
    assert got[0].dtype == torch.bfloat16
    for kind, a, e, t in zip(["output", "grad", "grad", "grad", "grad"], got, eager, truth):
        result = compare_norm(a.float(), t.float(), e.float(), kind=kind)
        assert result.ok, (kind, tuple(a.shape), result)
    rm, rv = torch.zeros(8, device=DEVICE), torch.ones(8, device=DEVICE)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        a = fr.ops.conv_bn_act(*args, rm, rv, stride=2, padding=3, backend="triton")
        fr.ops.max_pool2d(a, backend="triton")
    assert torch.equal(got[5], rm) and torch.equal(got[6], rv)


def test_the_stem_keeps_no_activation_and_launches_no_elementwise_pass():
    """Autograd keeps x, y, the int8 window positions and per-channel rows: the unfused
    chain keeps relu(bn(y)) (for the ReLU's backward) where the fused op keeps nothing of
    its size (and the (3, C) rows (rstd, scale, shift) where it keeps the variance), and no
    launch writes or reads it (`counting_work`'s labels)."""
    skip_without_triton()
    from fused_resnet.bench.timing import activation_bytes
    from fused_resnet.triton.launch import counting_work

    model = torch.nn.Sequential()
    model.conv1 = torch.nn.Conv2d(3, 8, 7, 2, 3, bias=False)
    model.bn1 = torch.nn.BatchNorm2d(8)
    model.maxpool = fr.nn.FusedMaxPool2d(backend="triton")
    x = torch.randn(2, 3, 20, 20, device=DEVICE)

    def stem(fused):
        if fused:
            return fr.nn.conv_bn_relu_pool(x, model.conv1, model.bn1, model.maxpool,
                                           backend="triton")
        return model.maxpool(fr.nn.conv_bn_act(x, model.conv1, model.bn1, backend="triton"))

    fused_bytes = activation_bytes(model, lambda: stem(True))
    unfused_bytes = activation_bytes(model, lambda: stem(False))
    a_bytes = 2 * 8 * 10 * 10 * 4
    assert fused_bytes == unfused_bytes - a_bytes + (3 - 1) * 8 * 4, (fused_bytes,
                                                                      unfused_bytes)
    with counting_work() as counts:
        stem(True).sum().backward()
    assert not any("bn_act" in label or "bn_bwd_reduce" in label for label in counts), counts
    assert {"fr::max_pool_fwd prologue write_arg", "fr::max_pool_bwd reduce",
            "fr::max_pool_bwd write_dy"} <= set(counts), counts


def test_the_model_uses_it_in_training_only():
    """ResNet's forward: in training on Triton the one op, in inference the folded conv and
    the pool; the other backends run the unfused pair (same values as the reference)."""
    skip_without_triton()
    from fused_resnet.triton.launch import counting_work

    model = fr.models.resnet18(num_classes=4, backend="triton").to(DEVICE)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with counting_work() as counts:
        model.train()(x)
    assert "fr::max_pool_fwd prologue write_arg" in counts
    with torch.no_grad(), counting_work() as counts:
        model.eval()(x)
    assert "fr::max_pool_fwd" in counts and not any("prologue" in k and "pool" in k
                                                    for k in counts)


@pytest.mark.parametrize("why", ["eval", "other_pool", "other_backend", "grouped"])
def test_the_module_function_falls_back_to_the_pair(why, monkeypatch):
    """conv_bn_relu_pool runs conv_bn_act then the pool module where the one op does not
    apply (inference, a pool that is not a FusedMaxPool2d on the same backend, a grouped
    conv), with the same result as that pair."""
    calls = []
    monkeypatch.setattr(fr.ops, "conv_bn_relu_max_pool",
                        lambda *a, **k: calls.append(a) or torch.zeros(1))
    conv = torch.nn.Conv2d(4, 8, 3, 2, 1, bias=False, groups=2 if why == "grouped" else 1)
    bn = torch.nn.BatchNorm2d(8).train(why != "eval")
    pool = {"other_pool": torch.nn.MaxPool2d(3, 2, 1),
            "other_backend": fr.nn.FusedMaxPool2d(backend="auto")}.get(
        why, fr.nn.FusedMaxPool2d(backend="reference"))
    x = torch.randn(2, 4, 12, 12)
    out = fr.nn.conv_bn_relu_pool(x, conv, bn, pool, backend="reference")
    assert not calls
    with torch.no_grad():
        expected = F.max_pool2d(torch.relu(bn(conv(x))), 3, 2, 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_the_custom_ops_pass_opcheck():
    skip_without_triton()
    from fused_resnet.ops.stem import stem_train, stem_train_backward

    x, w, gamma, beta = _stem_args(size=12)
    args = (x, w.requires_grad_(), gamma.requires_grad_(), beta.requires_grad_(), 2, 3, 1e-5,
            3, 2, 1)
    torch.library.opcheck(stem_train, args, test_utils=(
        "test_schema", "test_faketensor", "test_autograd_registration"))
    out, arg, y, mean, _var, affine = stem_train(*[a.detach() if torch.is_tensor(a) else a
                                                   for a in args])
    for need_dx, need_dw in ((True, True), (False, True), (True, False), (False, False)):
        bwd_args = (torch.randn_like(out), x, w.detach(), gamma.detach(), y, arg, mean, affine,
                    2, 3, 3, 2, 1, need_dx, need_dw)
        torch.library.opcheck(stem_train_backward, bwd_args,
                              test_utils=("test_schema", "test_faketensor"))
        dx, dw, _, _ = stem_train_backward(*bwd_args)
        assert dx.shape == (x.shape if need_dx else (0,))
        assert dw.shape == (w.shape if need_dw else (0,))


@pytest.mark.parametrize("kwargs, message", [
    ({"pool_kernel": 0}, "pool_kernel must be an int >= 1, got 0"),
    ({"pool_kernel": 13}, "pool_kernel must be in \\[1, 11\\], got 13"),
    ({"pool_stride": 0}, "pool_stride must be an int >= 1, got 0"),
    ({"pool_padding": 2}, "pool_padding must be in \\[0, pool_kernel // 2 = 1\\], got 2"),
    ({"padding": -1}, "padding must be an int >= 0, got -1"),
    ({"eps": 0.0}, "eps must be positive in training"),
    ({"backend": "gpu"}, "backend must be one of"),
])
def test_bad_arguments_are_named_and_change_no_state(kwargs, message):
    x, w, gamma, beta = _stem_args(torch.float32)
    rm, rv = torch.zeros(8, device=DEVICE), torch.ones(8, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        fr.ops.conv_bn_relu_max_pool(x, w, gamma, beta, rm, rv, **kwargs)
    assert torch.equal(rm, torch.zeros(8, device=DEVICE))
    assert torch.equal(rv, torch.ones(8, device=DEVICE))
    with pytest.raises(ValueError, match="the conv's output size \\(1, 1\\) with pool_padding 1 "
                       "is smaller than pool_kernel \\(5\\)"):
        fr.ops.conv_bn_relu_max_pool(x[..., :2, :2], w, gamma, beta, rm, rv, pool_kernel=5,
                                     pool_padding=1)


@pytest.mark.gpu
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_the_resnet50_stem_compiled(low):
    """ResNet-50's stem (3 -> 64 channels, 224x224 -> 112x112 -> 56x56) at batch 8 in
    compiled Triton under autocast: output and the parameters' gradients within the
    precision rule (2x eager autocast's error against an fp64 run); the image needs no
    gradient, as in a model."""
    from fused_resnet.testing import compare_norm

    skip_without_triton()
    args = _stem_args(torch.float32, size=224, batch=8, c_out=64)
    got = _run("triton", args, torch.float32, x_grad=False, autocast=True, low=low)
    eager = _run("reference", args, torch.float32, x_grad=False, autocast=True, low=low)
    truth = _run("reference", [t.double() for t in args], torch.float64, x_grad=False)
    assert got[0].dtype == low and got[1] is None
    for kind, a, e, t in zip(["output", None, "grad", "grad", "grad"], got, eager, truth):
        if kind is not None:
            result = compare_norm(a.float(), t.float(), e.float(), kind=kind)
            assert result.ok, (kind, tuple(a.shape), result)


def test_torch_compile_traces_the_stem_op():
    """fullgraph torch.compile (aot_eager: the op's real kernels, its fake for tracing) of a
    training stem: the same output, gradients and running stats as the eager call."""
    skip_without_triton()
    args = _stem_args(torch.float64, size=12)
    results = []
    for compiled in (False, True):
        def stem(*a):
            return fr.ops.conv_bn_relu_max_pool(*a, backend="triton")

        fn = torch.compile(stem, fullgraph=True, backend="aot_eager") if compiled else stem
        leaves = [t.detach().clone().requires_grad_() for t in args]
        rm = torch.zeros(8, dtype=torch.float64, device=DEVICE)
        rv = torch.ones(8, dtype=torch.float64, device=DEVICE)
        out = fn(*leaves, rm, rv)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype,
                                    device=DEVICE).view_as(out))
        results.append([out] + [t.grad for t in leaves] + [rm, rv])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
