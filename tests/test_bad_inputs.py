"""Bad input at the public API (ops, modules, models, convert): each gets a ValueError /
RuntimeError naming the argument, or correct results; a call that fails changes no running
statistic and no parameter. Every case tried is listed in pytest's summary."""

import copy

import pytest
import torch
import torchvision

import fused_resnet as fr
from fused_resnet import ops
from fused_resnet.nn import FusedBasicBlock, FusedBottleneck
from tests._backends import backend_param
from tests._report import record

BACKENDS = [backend_param("triton"), backend_param("cpu"), "reference"]


def _args(**over):
    """ops.conv_bn_act arguments: x (2, 4, 6, 6), 3x3 conv to 8 channels, BN state."""
    args = dict(x=torch.randn(2, 4, 6, 6), weight=torch.randn(8, 4, 3, 3),
                bn_weight=torch.rand(8) + 0.5, bn_bias=torch.randn(8),
                running_mean=torch.randn(8), running_var=torch.rand(8) + 0.5, padding=1)
    args.update(over)
    return args


def _call(backend, args):
    a = dict(args)
    return ops.conv_bn_act(a.pop("x"), a.pop("weight"), a.pop("bn_weight"), a.pop("bn_bias"),
                           a.pop("running_mean"), a.pop("running_var"), backend=backend, **a)


ERRORS = {
    "x 3-D": (dict(x=torch.randn(4, 6, 6)), "x must be 4-D"),
    "x integer": (dict(x=torch.ones(2, 4, 6, 6, dtype=torch.int32)), "x must be a floating"),
    "fp16 x, bf16 weight": (dict(x=torch.randn(2, 4, 6, 6).half(),
                                 weight=torch.randn(8, 4, 3, 3).bfloat16()), "weight dtype"),
    "weight on another device": (dict(weight=torch.randn(8, 4, 3, 3, device="meta")),
                                 "weight is on meta"),
    "channel mismatch": (dict(weight=torch.randn(8, 5, 3, 3)), "x has 4 channels"),
    "bn_weight length": (dict(bn_weight=torch.ones(7)), r"bn_weight must have shape \(8,\)"),
    "bn_weight fp16 for fp32 x": (dict(bn_weight=torch.ones(8).half()), "bn_weight must be"),
    "running_mean integer": (dict(running_mean=torch.zeros(8, dtype=torch.long)),
                             "running_mean must be"),
    "running_var on another device": (dict(running_var=torch.ones(8, device="meta")),
                                      "running_var is on meta"),
    "running_var None alone": (dict(running_var=None), "both be tensors or both be None"),
    "eval without running stats": (dict(running_mean=None, running_var=None, training=False),
                                   "training=False needs"),
    "residual shape": (dict(residual=torch.randn(2, 8, 5, 5)), "residual must have shape"),
    "residual dtype": (dict(residual=torch.randn(2, 8, 6, 6).double()),
                       "residual must match"),
    "H, W smaller than the kernel": (dict(x=torch.randn(2, 4, 2, 2), padding=0),
                                     "smaller than the kernel"),
    "one value per channel in training": (dict(x=torch.randn(1, 4, 1, 1), padding=1,
                                               weight=torch.randn(8, 4, 3, 3), stride=2),
                                          "more than 1 value per channel"),
    "stride 0": (dict(stride=0), "stride must be an int >= 1, got 0"),
    "negative padding": (dict(padding=-1), "padding must be an int >= 0, got -1"),
    "padding as a pair": (dict(padding=(1, 1)), r"padding must be an int >= 0, got \(1, 1\)"),
    "fractional stride": (dict(stride=1.5), "stride must be an int >= 1, got 1.5"),
    "stride as a bool": (dict(stride=True), "stride must be an int >= 1, got True"),
    "dilation as a str": (dict(dilation="2"), "dilation must be an int >= 1, got '2'"),
    "groups not dividing channels": (dict(groups=3, weight=torch.randn(8, 2, 3, 3)),
                                     "channels"),
    "eps 0 in training": (dict(eps=0.0), "eps must be positive"),
}


@pytest.mark.parametrize("case", list(ERRORS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_op_input_is_named_and_changes_nothing(case, backend):
    over, message = ERRORS[case]
    args = _args(**over)
    saved = {k: v.clone() for k, v in args.items()
             if isinstance(v, torch.Tensor) and v.device.type != "meta"}
    with pytest.raises((ValueError, RuntimeError), match=message) as info:
        _call(backend, args)
    for k, v in saved.items():
        assert torch.equal(args[k], v), f"{k} changed by a failing call"
    if backend == "reference":
        record("bad inputs tried (ops.conv_bn_act, every backend)",
               f"{case}: {info.type.__name__}: {str(info.value).splitlines()[0][:100]}")


ACCEPTED = {
    "sliced (non-contiguous) x": lambda: torch.randn(2, 4, 6, 12)[..., ::2],
    "transposed x": lambda: torch.randn(2, 4, 6, 6).transpose(2, 3),
    "expanded (stride 0) x": lambda: torch.randn(1, 4, 6, 6).expand(2, 4, 6, 6),
    "channels_last x": lambda: torch.randn(2, 4, 6, 6).contiguous(
        memory_format=torch.channels_last),
    "zero-size batch (torch's: an empty output, statistics unchanged)":
        lambda: torch.randn(0, 4, 6, 6),
}


@pytest.mark.parametrize("case, training", [
    (case, training) for case in ACCEPTED for training in (True, False)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_layouts_give_the_reference_result(case, training, backend):
    x = ACCEPTED[case]()
    args, ref_args = _args(x=x, training=training), _args(x=x.contiguous(), training=training)
    for key in ("weight", "bn_weight", "bn_bias", "running_mean", "running_var"):
        ref_args[key] = args[key].clone()
    out, expected = _call(backend, args), _call("reference", ref_args)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(args["running_var"], ref_args["running_var"])


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_inference_mode(mode, backend):
    fused = FusedBasicBlock(4, 4, backend=backend)
    ref = copy.deepcopy(fused)
    fr.models.set_backend(ref, "reference")
    x = torch.randn(2, 4, 6, 6)
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    for train in (True, False):
        fused.train(train)
        ref.train(train)
        with ctx():
            torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-4)
    for a, b in zip(fused.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_bn_and_frozen_conv_fine_tuning(backend):
    """requires_grad=False parameters: gradients flow to the rest, none to them."""
    fused = FusedBottleneck(8, 2, backend=backend)
    ref = copy.deepcopy(fused)
    fr.models.set_backend(ref, "reference")
    for model in (fused, ref):
        for bn in (model.bn1, model.bn2):
            bn.weight.requires_grad_(False)
            bn.bias.requires_grad_(False)
        model.conv1.weight.requires_grad_(False)
    x = torch.randn(2, 8, 4, 4)
    for train in (True, False):
        fused.train(train)
        ref.train(train)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        fused(xa).square().sum().backward()
        ref(xb).square().sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-3, atol=1e-3)
        for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
            assert (p.grad is None) == (not p.requires_grad), name
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-3)
                p.grad = q.grad = None


MODULE_ERRORS = {
    "block: wrong channels": (lambda b: FusedBasicBlock(8, 8, backend=b),
                              lambda: torch.randn(2, 4, 6, 6), "x has 4 channels"),
    "block: 3-D x": (lambda b: FusedBasicBlock(8, 8, backend=b), lambda: torch.randn(8, 6, 6),
                     "x must be 4-D"),
    "block: stride-2 map of 1 value in training": (
        lambda b: FusedBottleneck(8, 2, 2, backend=b), lambda: torch.randn(1, 8, 2, 2),
        "more than 1 value per channel"),
    "block with a frozen BN (chain path): 1 value left per channel": (
        lambda b: _frozen_bn2(FusedBottleneck(8, 4, 2, shortcut="A", backend=b)),
        lambda: torch.randn(1, 8, 2, 2), "more than 1 value per channel"),
    "non-affine block (chain path): eps 0 in its second BN": (
        lambda b: _non_affine(FusedBasicBlock(8, 8, backend=b)), lambda: torch.randn(2, 8, 6, 6),
        "eps must be positive"),
    "block with a frozen BN (chain path): output channels not the identity's": (
        lambda b: _frozen_bn2(_widened(FusedBasicBlock(8, 8, backend=b))),
        lambda: torch.randn(2, 8, 6, 6), "residual must have shape"),
    "block in eval, two BNs training (chain path): 1 value left per channel": (
        lambda b: _eval_but_bns(FusedBottleneck(16, 4, 2, backend=b)),
        lambda: torch.randn(1, 16, 2, 2), "more than 1 value per channel"),
    "block in training: fp16 input, fp32 weights, no autocast": (
        lambda b: FusedBasicBlock(8, 8, backend=b), lambda: torch.randn(2, 8, 6, 6).half(),
        r"weights\[0\] dtype torch.float32 differs from x's dtype torch.float16"),
    "model: 1-channel images": (lambda b: fr.models.cifar_resnet(20, backend=b),
                                lambda: torch.randn(2, 1, 8, 8), "x has 1 channels"),
    "model: last stage of one value": (lambda b: fr.models.resnet18(backend=b),
                                       lambda: torch.randn(1, 3, 32, 32),
                                       "more than 1 value per channel"),
    "model: integer images": (lambda b: fr.models.cifar_resnet(20, backend=b),
                              lambda: torch.ones(2, 3, 8, 8, dtype=torch.uint8),
                              "floating-point"),
}


def _frozen_bn2(block):
    """bn2 in eval mode inside a training block: the block runs as a chain of ops."""
    block.train()
    block.bn2.eval()
    block.train = lambda mode=True: block  # keep bn2 frozen through the test's .train()
    return block


def _eval_but_bns(block):
    """The block in eval mode, bn1 and bn2 training (test-time adaptation of some BNs): a
    chain of ops whose second BN sees one value per channel."""
    block.eval()
    block.bn1.train(), block.bn2.train()
    block.train = lambda mode=True: block  # kept so through the test's .train()
    return block


def _non_affine(block):
    """Non-affine BNs: the block runs as a chain of ops; bn2's eps 0 fails the second."""
    block.bn1 = torch.nn.BatchNorm2d(8, affine=False)
    block.bn2 = torch.nn.BatchNorm2d(8, affine=False, eps=0.0)
    return block


def _widened(block):
    """conv2 / bn2 with 16 outputs: the identity shortcut (8 channels) cannot be added."""
    block.conv2 = torch.nn.Conv2d(8, 16, 3, 1, 1, bias=False)
    block.bn2 = torch.nn.BatchNorm2d(16)
    return block


def test_triton_refuses_grouped_convs_before_a_model_runs():
    """A grouped bottleneck (ResNeXt) on backend "triton" is refused where it is made or
    converted, not at a call that has already moved the stem's running statistics."""
    import torchvision

    with pytest.raises(NotImplementedError, match="groups=32.*backend='auto'"):
        fr.models.resnext50_32x4d(backend="triton")
    with pytest.raises(NotImplementedError, match="groups=2"):
        FusedBottleneck(16, 4, groups=2, backend="triton")
    model = torchvision.models.resnext50_32x4d()
    with pytest.raises(NotImplementedError, match="convert: .*groups=32"):
        fr.convert(model, backend="triton")
    assert type(model.layer1[0]) is torchvision.models.resnet.Bottleneck  # nothing swapped


def test_process_group_must_be_one():
    """A process group that is not one is refused where it is given (it used to make every
    BN a synchronized one and fail at the first all_reduce)."""
    import torchvision

    model = torchvision.models.resnet18()
    with pytest.raises(ValueError, match="process_group must be None .* got str"):
        fr.convert(model, process_group="x")
    assert type(model.layer1[0]) is torchvision.models.resnet.BasicBlock  # nothing swapped
    with pytest.raises(ValueError, match="process_group"):
        FusedBottleneck(16, 4, process_group=3)


@pytest.mark.parametrize("case", list(MODULE_ERRORS))
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_module_input_is_named_and_changes_nothing(case, backend):
    if backend == "cpu":
        pytest.importorskip("fused_resnet._C")
    make, x, message = MODULE_ERRORS[case]
    module = make(backend).train()
    state = copy.deepcopy(module.state_dict())
    with pytest.raises((ValueError, RuntimeError), match=message) as info:
        module(x())
    for key, value in module.state_dict().items():
        assert torch.equal(value, state[key]), f"{key} changed by a failing call"
    if backend == "reference":
        record("bad inputs tried (modules and models)",
               f"{case}: {info.type.__name__}: {str(info.value).splitlines()[0][:100]}")


def test_convert_refuses_non_modules_and_skips_blocks_it_cannot_fuse():
    with pytest.raises(ValueError, match="model must be an nn.Module, got int"):
        fr.convert(5)
    with pytest.raises(ValueError, match="backend must be one of"):
        fr.convert(torchvision.models.resnet18(), backend="tpu")
    tv = torchvision.models.resnet50().eval()
    conv = tv.layer3[1].conv2
    conv.dilation, conv.padding = (2, 1), (2, 1)  # not square: no fused conv takes it
    expected = copy.deepcopy(tv)
    with pytest.warns(RuntimeWarning, match=r"left layer3.1 unfused: conv2 has non-square"):
        fr.convert(tv, backend="reference")
    assert type(tv.layer2[0]).__name__ == "FusedBottleneck"
    assert type(tv.layer3[1]).__name__ == "Bottleneck"  # left as torchvision's
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(tv(x), expected(x), rtol=1e-4, atol=1e-4)
    for case in ("convert(5)", "convert(backend='tpu')",
                 "a block with a non-square dilation: left unfused, warned"):
        record("bad inputs tried (modules and models)", f"{case}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate_as_in_the_reference(backend):
    for value in (float("nan"), float("inf")):
        for training in (True, False):
            x = torch.randn(2, 4, 6, 6)
            x[0, 1, 2, 3] = value
            args, ref_args = _args(x=x, training=training), _args(x=x, training=training)
            for key in ("weight", "bn_weight", "bn_bias", "running_mean", "running_var"):
                ref_args[key] = args[key].clone()
            out, expected = _call(backend, args), _call("reference", ref_args)
            assert torch.equal(out.isnan(), expected.isnan()), (value, training)
            assert torch.equal(out.isinf(), expected.isinf()), (value, training)
            finite = expected.isfinite()
            torch.testing.assert_close(out[finite], expected[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_overflow_behaves_as_pytorch(backend):
    """Training: conv outputs beyond fp16's 65504 become inf as in eager fp16, and what BN
    then makes of them (inf, NaN) matches the reference element for element. Eval folds BN
    into the conv (w * gamma / sqrt(var + eps)), so it overflows where the folded conv does:
    never where the reference is finite, possibly not where the unfolded conv overflowed."""
    x = torch.randn(2, 4, 6, 6, dtype=torch.float16)
    x[0, :, :3, :3] = 3000.0  # 36 taps x 3000 x |w| ~ 1e5 > 65504
    weight = torch.ones(8, 4, 3, 3, dtype=torch.float16)
    for training in (True, False):
        args = _args(x=x, weight=weight, training=training)
        ref_args = {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                    for k, v in args.items()}
        out, expected = _call(backend, args), _call("reference", ref_args)
        assert not expected.isfinite().all()
        finite = expected.isfinite()
        if training:
            assert torch.equal(out.isnan(), expected.isnan())
            assert torch.equal(out.isinf(), expected.isinf())
        else:
            assert out[finite].isfinite().all()
        torch.testing.assert_close(out[finite].float(), expected[finite].float(), rtol=2e-2,
                                   atol=2e-2)


def test_more_pixels_than_int32_indices_is_refused_before_any_launch():
    """The Triton conv kernels index pixels in int32: 2**32 of them are refused by name (meta
    tensors: nothing is allocated, and the check comes before any launch)."""
    pytest.importorskip("triton")
    from fused_resnet.triton.bottleneck_eval import bottleneck_eval
    from fused_resnet.triton.conv import conv_fwd
    from fused_resnet.triton.conv_bwd import conv_dgrad, conv_wgrad

    x = torch.empty(2**16, 4, 2**8, 2**8, device="meta")
    w = torch.empty(4, 4, 1, 1, device="meta")
    with pytest.raises(ValueError, match=r"at most 2\*\*31 - 1 pixels .* got 4294967296"):
        conv_fwd(x, w, stride=1, padding=0)
    with pytest.raises(ValueError, match="at most 2"):
        conv_dgrad(x, w, x.shape, stride=1, padding=0)
    with pytest.raises(ValueError, match="at most 2"):
        conv_wgrad(x, x, w.shape, stride=1, padding=0)
    mid = [torch.empty(2, 4, 1, 1, device="meta"), torch.empty(2, 2, 3, 3, device="meta"),
           torch.empty(4, 2, 1, 1, device="meta")]
    with pytest.raises(ValueError, match="at most 2"):
        bottleneck_eval(x, mid, [torch.empty(c, device="meta") for c in (2, 2, 4)])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_chain_path_block_trains_under_autocast_after_a_bf16_layer(backend):
    """A grouped bottleneck (ResNeXt; it runs conv by conv) whose input is already bf16, as
    after a model's stem under autocast: its fp32 weights are autocast's to cast (its
    up-front check compared them with x's dtype and refused). As torchvision's block."""
    if backend == "cpu":
        pytest.importorskip("fused_resnet._C")
    torch.manual_seed(0)
    ours = FusedBottleneck(16, 4, groups=2, backend=backend).train()
    theirs = torchvision.models.resnet.Bottleneck(16, 4, groups=2).train()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 16, 6, 6).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = ours(x), theirs(x)
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours.bn1.running_mean, theirs.bn1.running_mean, rtol=1e-2,
                               atol=1e-3)
