"""The functional block ops' argument checks (`fr.ops.residual_block_train`,
`residual_block_eval`, `bottleneck_eval`) and the per-BN checks they share with `conv_bn_act`
and the stem: a shortcut whose shape is not the main path's output, an unknown shortcut, a
per-conv list of the wrong length, weights of another dtype outside autocast, running
statistics that require grad, momentum=None each raise a ValueError naming the argument, on
every backend, before any running statistic moves (on Triton a mismatched identity shortcut
used to be read out of bounds). BNs without affine parameters train on every backend; a
bias of None is no bias; the Triton inference bottleneck gives gradients where autograd
asks for them."""

import pytest
import torch
import torch.nn.functional as F
from _backends import DEVICE, FUSED_BACKENDS

import fused_resnet as fr

BACKENDS = [*FUSED_BACKENDS, "reference"]
OPS = fr.ops


def _train_args(c_in=4, convs=((8, 1, 1), (8, 1, 1)), shortcut="identity", shortcut_stride=1,
                dtype=torch.float32):
    """x and residual_block_train's keyword arguments: convs are (c_out, stride, padding) of
    3x3 convs (1x1 where padding is 0)."""
    torch.manual_seed(0)
    x = torch.randn(2, c_in, 6, 6, device=DEVICE, dtype=dtype)
    weights, c = [], c_in
    for i, (c_out, _, padding) in enumerate(convs):
        k = 3 if padding else 1
        projection = shortcut == "projection" and i == len(convs) - 1  # it reads x
        weights.append(torch.randn(c_out, c_in if projection else c, k, k, device=DEVICE,
                                   dtype=dtype) * 0.3)
        c = c_out
    n = len(convs)
    stats = dict(device=DEVICE, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    args = dict(weights=weights,
                bn_weights=[torch.rand(w.shape[0], **stats) + 0.5 for w in weights],
                bn_biases=[torch.randn(w.shape[0], **stats) for w in weights],
                running_means=[torch.zeros(w.shape[0], **stats) for w in weights],
                running_vars=[torch.ones(w.shape[0], **stats) for w in weights],
                strides=[s for _, s, _ in convs], paddings=[p for _, _, p in convs],
                momenta=[0.1] * n, eps=[1e-5] * n, shortcut=shortcut,
                shortcut_stride=shortcut_stride)
    return x, args


def _refused(call, match, args):
    """`call` raises a ValueError matching `match` and leaves every running stat as it was."""
    before = [t.clone() for t in args.get("running_means", []) + args.get("running_vars", [])]
    with pytest.raises(ValueError, match=match):
        call()
    after = args.get("running_means", []) + args.get("running_vars", [])
    assert all(torch.equal(a, b) for a, b in zip(after, before))


MISMATCHED = {  # (residual_block_train's arguments, the error)
    "identity, channels change": (dict(c_in=4), r"shortcut 'identity' gives shape \(2, 4, 6, 6\)"),
    "identity, stride 2": (dict(c_in=8, convs=((8, 2, 1), (8, 1, 1))),
                           r"shortcut 'identity' gives shape \(2, 8, 6, 6\).*\(2, 8, 3, 3\)"),
    "zero_pad, wrong stride": (dict(convs=((8, 2, 1), (8, 1, 1)), shortcut="zero_pad"),
                               r"shortcut 'zero_pad' at shortcut_stride 1 gives shape"),
    "zero_pad, fewer channels": (dict(c_in=8, convs=((4, 1, 1), (4, 1, 1)), shortcut="zero_pad"),
                                 "pads x's 8 channels up to the main path's 4"),
    "projection, wrong stride": (
        dict(convs=((8, 2, 1), (8, 1, 1), (8, 1, 0)), shortcut="projection"),
        r"shortcut 'projection' at shortcut_stride 1 gives shape \(2, 8, 6, 6\)"),
    "unknown shortcut": (dict(c_in=8, shortcut="proj"), "shortcut must be one of"),
    "projection without its weight": (dict(c_in=8, convs=((8, 1, 1),), shortcut="projection"),
                                      "weights needs at least 2 entries"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", MISMATCHED)
def test_block_whose_shortcut_does_not_fit_is_refused(backend, case):
    kwargs, match = MISMATCHED[case]
    x, args = _train_args(**kwargs)
    _refused(lambda: OPS.residual_block_train(x, **args, backend=backend), match, args)
    folded = [w.clone() for w in args["weights"]]
    biases = [b.clone() for b in args["bn_biases"]]
    _refused(lambda: OPS.residual_block_eval(
        x, folded, biases, strides=args["strides"], paddings=args["paddings"],
        shortcut=args["shortcut"], shortcut_stride=args["shortcut_stride"], backend=backend),
        match, {})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, value, match", [
    ("momenta", [0.1], "momenta must be a list with one entry per weight"),
    ("eps", [1e-5], "eps must be a list with one entry per weight"),
    ("bn_weights", None, "bn_weights must be a list"),
    ("running_vars", [torch.ones(8)], "running_vars must be a list with one entry"),
    ("momenta", [0.1, None], r"momenta\[1\] must be a number in \[0, 1\], got None"),
    ("momenta", [0.1, 1.5], r"momenta\[1\] must be a number in \[0, 1\], got 1.5"),
])
def test_block_train_lists_are_checked_first(backend, name, value, match):
    x, args = _train_args(c_in=8)
    args[name] = value
    _refused(lambda: OPS.residual_block_train(x, **args, backend=backend), match, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_eval_biases_and_weights_are_checked(backend):
    x, args = _train_args(c_in=8)
    ws, bs = args["weights"], args["bn_biases"]
    geometry = dict(strides=[1, 1], paddings=[1, 1], shortcut="identity", backend=backend)
    cases = [(ws, bs + [bs[0]], "biases must be a list with one entry per weight"),
             (ws, [bs[0], None], r"biases\[1\] must be a \(C_out,\) tensor"),
             ([w.long() for w in ws], bs, r"weights\[0\] must be a floating-point tensor"),
             ([w.double() for w in ws], bs, r"weights\[0\] dtype torch.float64 differs"),
             (ws, [bs[0], bs[1].long()], "bias must be torch.float32")]
    for weights, biases, match in cases:
        with pytest.raises(ValueError, match=match):
            OPS.residual_block_eval(x, weights, biases, **geometry)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_check_cache_does_not_pass_refused_values(backend):
    x, args = _train_args(c_in=8)
    call = dict(paddings=[1, 1], shortcut="identity", backend=backend)
    OPS.residual_block_eval(x, args["weights"], args["bn_biases"], strides=[1, 1], **call)
    for strides in ([True, 1], [1.0, 1]):  # equal to [1, 1], and hashed alike
        with pytest.raises(ValueError, match="stride must be an int"):
            OPS.residual_block_eval(x, args["weights"], args["bn_biases"], strides=strides,
                                    **call)


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_without_affine_bns_trains_as_the_reference(backend):
    x, args = _train_args(c_in=8, dtype=torch.float64)
    args["bn_weights"] = [None, None]
    args["bn_biases"] = [None, args["bn_biases"][1]]  # and one with a shift only
    x.requires_grad_()
    for w in args["weights"]:
        w.requires_grad_()
    expected_args = {k: [t.clone() if torch.is_tensor(t) else t for t in v]
                     if isinstance(v, list) else v for k, v in args.items()}
    out = OPS.residual_block_train(x, **args, backend=backend)
    expected = OPS.residual_block_train(x, **expected_args, backend="reference")
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    grads = torch.autograd.grad(out.square().sum(), [x, *args["weights"]])
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *args["weights"]])
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)
    for a, b in zip(args["running_vars"], expected_args["running_vars"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_stats_that_require_grad_and_momentum_none_are_refused(backend):
    x, args = _train_args(c_in=8)
    w, g, b, m, v = (args[k][0] for k in ("weights", "bn_weights", "bn_biases",
                                          "running_means", "running_vars"))
    stem_w = torch.randn(8, 8, 3, 3, device=DEVICE)
    for call in (lambda **kw: OPS.conv_bn_act(x, w, g, b, **kw, padding=1, backend=backend),
                 lambda **kw: OPS.conv_bn_relu_max_pool(x, stem_w, g, b, **kw, stride=1,
                                                        padding=1, backend=backend)):
        with pytest.raises(ValueError, match="running_mean requires grad"):
            call(running_mean=m.clone().requires_grad_(), running_var=v)
        with pytest.raises(ValueError, match="momentum must be a number in \\[0, 1\\], got None"):
            call(running_mean=m, running_var=v, momentum=None)
        assert torch.equal(m, torch.zeros_like(m)) and torch.equal(v, torch.ones_like(v))
    args["running_vars"] = [v.clone().requires_grad_(), v.clone()]
    _refused(lambda: OPS.residual_block_train(x, **args, backend=backend),
             "running_var requires grad", args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_bias_act_without_bias_is_a_plain_conv(backend):
    x = torch.randn(2, 4, 6, 6, device=DEVICE)
    w = torch.randn(8, 4, 3, 3, device=DEVICE)
    out = OPS.conv_bias_act(x, w, None, padding=1, backend=backend)
    torch.testing.assert_close(out, torch.relu(F.conv2d(x, w, padding=1)), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bottleneck_eval_gives_gradients_on_every_backend(backend):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 5, 5, device=DEVICE, dtype=torch.float64, requires_grad=True)
    shapes = [(4, 16, 1, 1), (4, 4, 3, 3), (16, 4, 1, 1)]
    weights = [(torch.randn(s, device=DEVICE, dtype=torch.float64) * 0.3).requires_grad_()
               for s in shapes]
    biases = [torch.randn(s[0], device=DEVICE, dtype=torch.float64) for s in shapes]
    if backend == "triton" and DEVICE == "cuda":
        pytest.skip("fp64 runs only in the interpreter")
    out = OPS.bottleneck_eval(x, weights, biases, backend=backend)
    a = torch.relu(F.conv2d(x, weights[0]) + biases[0].view(-1, 1, 1))
    a = torch.relu(F.conv2d(a, weights[1], padding=1) + biases[1].view(-1, 1, 1))
    expected = torch.relu(F.conv2d(a, weights[2]) + biases[2].view(-1, 1, 1) + x)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    got = torch.autograd.grad(out.square().sum(), [x, *weights])
    want = torch.autograd.grad(expected.square().sum(), [x, *weights])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_stats_training_cannot_write_are_refused(backend):
    x, args = _train_args(c_in=8)
    w, g, b = (args[k][0] for k in ("weights", "bn_weights", "bn_biases"))
    with torch.inference_mode():
        made_in_inference = torch.zeros(8, device=DEVICE)
    for running_mean, match in ((torch.zeros(1, device=DEVICE).expand(8), "is expanded"),
                                (made_in_inference, "was made in inference mode")):
        with pytest.raises(ValueError, match=f"running_mean {match}"):
            OPS.conv_bn_act(x, w, g, b, running_mean, torch.ones(8, device=DEVICE), padding=1,
                            backend=backend)
        args["running_means"] = [torch.zeros(8, device=DEVICE), running_mean]
        _refused(lambda: OPS.residual_block_train(x, **args, backend=backend),
                 f"running_mean {match}", args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flags_that_are_not_bools_are_refused(backend):
    """training=None or relu=0 would read as False in a fused kernel; torch refuses None."""
    x, args = _train_args(c_in=8)
    w, g, b, m, v = (args[k][0] for k in ("weights", "bn_weights", "bn_biases",
                                          "running_means", "running_vars"))
    calls = [
        (lambda: OPS.conv_bn_act(x, w, g, b, m, v, padding=1, training=None, backend=backend),
         "training must be True or False, got None"),
        (lambda: OPS.conv_bn_act(x, w, g, b, m, v, padding=1, relu=0, backend=backend),
         "relu must be True or False, got 0"),
        (lambda: OPS.conv_bias_act(x, w, b, padding=1, relu=None, backend=backend),
         "relu must be True or False, got None"),
        (lambda: OPS.conv_bn_relu_max_pool(x, w, g, b, m, v, stride=1, padding=1,
                                           training=1, backend=backend),
         "training must be True or False, got 1"),
        (lambda: OPS.bn_add_relu(x, torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE),
                                 relu=None, backend=backend),
         "relu must be True or False, got None"),
    ]
    for call, match in calls:
        with pytest.raises(ValueError, match=match):
            call()
    assert torch.equal(m, torch.zeros_like(m)) and torch.equal(v, torch.ones_like(v))
