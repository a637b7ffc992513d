"""Blocks against torchvision's where numbers leave the usual range, and BN settings held as
other scalar types than Python floats. Each case compares a fused block with the
torchvision block it was converted from (same tensors; fp64 on CPU, fp32 with TF32 off on
a GPU, where Triton takes no fp64): NaN / inf inputs through the whole training backward,
running statistics that are already inf, fp16 running statistics beside batch variances
above fp16's range, and eps / momentum given as NumPy scalars or 0-d tensors, as torch's
BatchNorm2d takes them."""

import copy

import numpy as np
import pytest
import torch
from _backends import DEVICE, FUSED_BACKENDS
from _bn import randomize_bn
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

import fused_resnet as fr

# (the Triton interpreter's NumPy warns of the NaN it computes with)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
DTYPE = torch.float64 if DEVICE == "cpu" else torch.float32
# fp32 (a GPU): the fp32 gradient bound of `validate` (1e-3)
TOL = dict(rtol=1e-7, atol=1e-9) if DTYPE == torch.float64 else dict(rtol=1e-3, atol=1e-3)


# The kernel cases run in CPU CI (here) and again in a GPU session's `-m gpu` selection,
# which would otherwise leave them out: compiled Triton handles NaN per instruction (max.NaN,
# compares), which the interpreter's NumPy does not show.
RUNS = ["here", pytest.param("gpu_session", marks=pytest.mark.gpu)]


def _input() -> torch.Tensor:
    return torch.randn(2, 8, 8, 8, dtype=DTYPE, device=DEVICE)


def _blocks(kind: str) -> tuple[nn.Module, nn.Module]:
    """(torchvision's block, a module holding its fused conversion's copy): a stride-1
    identity BasicBlock (8 -> 8) or a stride-2 projection Bottleneck (8 -> 2 -> 8)."""
    torch.manual_seed(0)
    if kind == "basic":
        theirs = BasicBlock(8, 8)
    else:
        theirs = Bottleneck(8, 2, 2, nn.Sequential(conv1x1(8, 8, 2), nn.BatchNorm2d(8)))
    theirs = randomize_bn(theirs).to(DEVICE, DTYPE)
    return theirs, copy.deepcopy(theirs)


def _fused(theirs_copy: nn.Module, backend: str) -> nn.Module:
    holder = nn.Sequential(theirs_copy)
    fr.convert(holder, backend=backend)
    return holder[0]


def _same(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal NaN and inf positions (and signs), finite entries close."""
    assert torch.equal(got.isnan(), expected.isnan()), f"{what}: NaN positions differ"
    assert torch.equal(got.isinf(), expected.isinf()), f"{what}: inf positions differ"
    assert torch.equal(got[got.isinf()], expected[expected.isinf()]), f"{what}: inf signs"
    finite = expected.isfinite()
    torch.testing.assert_close(got[finite], expected[finite], **TOL, msg=what)


def _train_step(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    block.train()
    x = x.clone().requires_grad_(True)
    out = block(x)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device)
                 .view_as(out))
    grads = {name: p.grad for name, p in block.named_parameters()}
    return out, {"x": x.grad, **grads}


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_non_finite_input_reaches_every_gradient_as_in_torch(backend, kind, value, run):
    # One bad pixel makes a BN's batch statistics NaN, so every activation after it is NaN
    # and ReLU's backward passes NaN on (torch's threshold_backward zeroes only z <= 0). On
    # Triton the inner BNs' ReLU masks in the dgrad / wgrad loops took NaN as "not > 0" and
    # zeroed those gradients: bn1.bias.grad was 0 where torch's is NaN.
    theirs, copied = _blocks(kind)
    ours = _fused(copied, backend)
    x = _input()
    x[0, 3, 2, 5] = value
    out_t, grads_t = _train_step(theirs, x)
    out_f, grads_f = _train_step(ours, x)
    _same(out_f, out_t, "output")
    for name, expected in grads_t.items():
        _same(grads_f[name], expected, f"{name}.grad")
    assert grads_t["bn1.bias"].isnan().any()  # the case reaches the inner BNs
    buffers = dict(ours.named_buffers())
    for name, expected in theirs.named_buffers():
        if name.endswith("running_var") or name.endswith("num_batches_tracked"):
            _same(buffers[name].double(), expected.double(), name)
        # running_mean: ±inf in torch (sum / n), NaN here (the shifted sums take inf - inf)
        # where an inf reached the statistics; README "Reliability" says so.


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("momentum", [0.1, 1.0, 0.0])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_running_stats_update_as_torch_writes_it(backend, momentum, run):
    # running = (1 - m) * running + m * batch: an inf running value stays inf with m < 1
    # (a lerp, running + m * (batch - running), made it NaN), a NaN one stays NaN with m = 0.
    theirs, copied = _blocks("bottleneck")
    ours = _fused(copied, backend)
    for block in (theirs, ours):
        block.bn1.running_mean.fill_(float("inf"))
        block.bn2.running_var.fill_(float("inf"))
        block.bn3.running_mean.fill_(float("nan"))
        for bn in (block.bn1, block.bn2, block.bn3, block.downsample[1]):
            bn.momentum = momentum
    x = _input()
    _train_step(theirs, x)
    _train_step(ours, x)
    buffers = dict(ours.named_buffers())
    for name, expected in theirs.named_buffers():
        _same(buffers[name].double(), expected.double(), name)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_half_running_variance_holds_a_batch_variance_beyond_fp16(backend):
    # A model made fp16 (`.half()`, no autocast) keeps fp16 running statistics. A batch
    # variance of ~1e5 (> 65504) times momentum 0.1 fits: torch's BN sums in fp32 and rounds
    # once. The update cast the batch variance to fp16 first: inf, and eval then output 0.
    torch.manual_seed(0)
    theirs = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False), nn.BatchNorm2d(2))
    with torch.no_grad():
        theirs[0].weight.copy_(torch.eye(2).view(2, 2, 1, 1))
    ours = fr.nn.FusedConvBNAct(2, 2, 1, relu=False, backend=backend)
    ours.load_state_dict({"conv.weight": theirs[0].weight, **{
        f"bn.{k}": v for k, v in theirs[1].state_dict().items()}})
    theirs, ours = theirs.to(DEVICE).half(), ours.to(DEVICE).half()
    x = (torch.randn(4, 2, 8, 8, device=DEVICE) * 400).half()
    for module in (theirs, ours):
        module.train()
        with torch.no_grad():
            module(x)
    expected, got = theirs[1].running_var, ours.bn.running_var
    assert expected.isfinite().all() and (expected > 1e4).all()
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=0)
    torch.testing.assert_close(ours.bn.running_mean, theirs[1].running_mean, rtol=2e-3,
                               atol=1e-2)


SCALARS = {
    "eps numpy": ("eps", np.float32(1e-3)),
    "eps tensor": ("eps", torch.tensor(1e-3, dtype=torch.float64)),
    "momentum numpy": ("momentum", np.float32(0.3)),
    "momentum tensor": ("momentum", torch.tensor(0.3)),
}


@pytest.mark.parametrize("case", list(SCALARS))
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_bn_scalars_of_other_types_as_torch_takes_them(backend, case):
    # Triton's launcher refused a NumPy eps ("cannot convert ... numpy.float32"), and the
    # momentum check took Python ints and floats only.
    attr, value = SCALARS[case]
    theirs, copied = _blocks("basic")
    ours = _fused(copied, backend)
    for block in (theirs, ours):
        for bn in (block.bn1, block.bn2):
            setattr(bn, attr, value)
    x = _input()
    out_t, grads_t = _train_step(theirs, x)
    out_f, grads_f = _train_step(ours, x)
    _same(out_f, out_t, "output")
    for name, expected in grads_t.items():
        _same(grads_f[name], expected, f"{name}.grad")
    buffers = dict(ours.named_buffers())
    for name, expected in theirs.named_buffers():
        _same(buffers[name].double(), expected.double(), name)
    for block in (theirs, ours):
        block.eval()
    with torch.no_grad():
        _same(ours(x), theirs(x), "eval output")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_negative_eps_in_eval_is_refused_as_torch_refuses_it(backend):
    # The eval fold path skipped the op checks: a negative eps ran (rsqrt of var + eps).
    _, copied = _blocks("basic")
    ours = _fused(copied, backend).eval()
    ours.bn2.eps = -1e-3
    with torch.no_grad(), pytest.raises(ValueError, match=r"eps must be >= 0 in eval"):
        ours(_input())
