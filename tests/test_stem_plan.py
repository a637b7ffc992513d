"""The inference stem's plans (`ops.eval_plan.StemEvalPlan`, `nn.conv_bn_relu_pool` in eval):
a repeated call with one input signature runs the prepared conv and pool and gives the checked
call's output bit for bit, in its layout and dtype; anything that changes what that call would
compute (weights, buffers, input shape, layout or dtype, autocast, autograd, the backend)
takes the checked path again."""

import copy

import pytest
import torch
from torch import nn

from fused_resnet import models, ops
from fused_resnet.backend import forced_backend
from fused_resnet.nn import FusedMaxPool2d, conv_bn_relu_pool
from fused_resnet.nn import pool as pool_module
from tests._backends import DEVICE, FUSED_BACKENDS, skip_without_triton
from tests._bn import randomize_bn
from tests._calls import count_calls

backends = pytest.mark.parametrize("backend", FUSED_BACKENDS)
CL = torch.channels_last


def _stem(backend, c_out=8):
    """conv 7x7/2 (3 -> c_out) + BN (random statistics) + a 3x3/2 pool, in eval."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, c_out, 7, 2, 3, bias=False).to(DEVICE)
    bn = randomize_bn(nn.BatchNorm2d(c_out).to(DEVICE))
    return nn.ModuleList([conv, bn, FusedMaxPool2d(3, 2, 1, backend=backend)]).eval()


def _call(stem, x, backend):
    return conv_bn_relu_pool(x, stem[0], stem[1], stem[2], backend=backend)


@pytest.fixture
def checked_calls(monkeypatch):
    """Counts the stem calls that take the checked path (`ops.conv_bias_act`)."""
    return count_calls(monkeypatch, ops, "conv_bias_act")


@backends
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_repeated_stem_calls_run_the_plan_with_the_same_output(backend, layout, autocast,
                                                               checked_calls):
    stem = _stem(backend)
    x = torch.randn(2, 3, 20, 18, device=DEVICE)  # fp32: autocast casts it, planned or not
    x = x.contiguous(memory_format=CL) if layout == "channels_last" else x
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        first = _call(stem, x, backend)
        assert len(checked_calls) == 1 and stem[0] in pool_module._STEM_PLANS
        for _ in range(2):  # the plan's first call launches through `launch`, later ones not
            again = _call(stem, x, backend)
            assert torch.equal(again, first)
            assert again.stride() == first.stride() and again.dtype == first.dtype
        assert len(checked_calls) == 1
        with forced_backend("reference"):
            expected = _call(stem, x, backend)
    assert first.shape == (2, 8, 5, 5)
    assert first.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert first.is_contiguous(memory_format=CL) == (layout == "channels_last")
    tol = 0.05 if autocast else 1e-4  # folded vs BN after the conv; bf16 operands
    torch.testing.assert_close(first.float(), expected.float(), atol=tol, rtol=tol)


@backends
def test_changes_take_the_checked_path(backend, checked_calls):
    stem = _stem(backend)
    conv, bn = stem[0], stem[1]
    x = torch.randn(2, 3, 16, 16, device=DEVICE).contiguous(memory_format=CL)
    with torch.no_grad():
        _call(stem, x, backend)
        _call(stem, x, backend)
        assert len(checked_calls) == 1
        changes = [
            lambda: conv.weight.mul_(1.5),  # an optimizer step writes in place
            lambda: bn.running_var.add_(0.5),
            lambda: bn.bias.sub_(0.25),
            lambda: stem.load_state_dict(_stem(backend).state_dict()),
        ]
        for i, change in enumerate(changes):
            change()
            out = _call(stem, x, backend)
            with forced_backend("reference"):
                torch.testing.assert_close(out, _call(stem, x, backend), atol=1e-4, rtol=1e-4)
            assert len(checked_calls) == 2 + i
            _call(stem, x, backend)  # planned again
            assert len(checked_calls) == 2 + i
        n = len(checked_calls)
        for other in (x.contiguous(), torch.randn(1, 3, 16, 16, device=DEVICE)):
            _call(stem, other, backend)  # another layout, batch: checked, then planned
            _call(stem, other, backend)
            n += 1
            assert len(checked_calls) == n
        stem.double()  # new parameter tensors: refolded
        _call(stem, x.double(), backend)
        _call(stem, x.double(), backend)
        stem.float()
        assert len(checked_calls) == n + 1
        with torch.autocast(DEVICE, dtype=torch.bfloat16):  # fp32 x cast, a bf16 fold
            _call(stem, x, backend)
            _call(stem, x, backend)
        assert len(checked_calls) == n + 2
        _call(stem, x, backend)  # folded for fp32 again: new folded tensors, a new plan
        _call(stem, x, backend)
        with forced_backend("reference"):
            _call(stem, x, backend)
        assert len(checked_calls) == n + 3  # the reference backend neither folds nor plans
    xg = x.clone().requires_grad_()
    conv.requires_grad_(False)
    bn.requires_grad_(False)
    out = _call(stem, xg, backend)  # autograd records the checked path's ops
    assert out.grad_fn is not None and len(checked_calls) == n + 4
    out.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


@pytest.mark.parametrize("backend", FUSED_BACKENDS[1:])  # the same module code on Triton,
def test_a_model_plans_its_stem(backend, checked_calls):  # where this model takes ~90 s
    model = models.resnet18(num_classes=4, backend=backend).to(DEVICE).eval()
    x = torch.randn(1, 3, 32, 32, device=DEVICE).contiguous(memory_format=CL)
    with torch.no_grad():
        first = model(x)
        assert torch.equal(model(x), first)
        assert len(checked_calls) == 1 and model.conv1 in pool_module._STEM_PLANS
        assert torch.equal(copy.deepcopy(model)(x), first)  # plans live beside the modules


@backends
def test_training_ignores_the_plan(backend, checked_calls):
    stem = _stem(backend)
    x = torch.randn(2, 3, 16, 16, device=DEVICE).contiguous(memory_format=CL)
    with torch.no_grad():
        _call(stem, x, backend)
        _call(stem, x, backend)
    stem.train()
    _call(stem, x.clone().requires_grad_(), backend).sum().backward()  # the training op
    assert len(checked_calls) == 1 and stem[0].weight.grad is not None
    stem.eval()
    with torch.no_grad():
        out = _call(stem, x, backend)  # the running stats moved: refolded, planned anew
        assert len(checked_calls) == 2
        with forced_backend("reference"):
            torch.testing.assert_close(out, _call(stem, x, backend), atol=1e-4, rtol=1e-4)


def test_a_planned_stem_launches_what_the_checked_call_launches():
    skip_without_triton()
    from fused_resnet.triton.launch import counting_work

    stem = _stem("triton")
    x = torch.randn(2, 3, 16, 16, device=DEVICE).contiguous(memory_format=CL)
    with torch.no_grad():
        with counting_work() as checked:
            _call(stem, x, "triton")
        checked = {k: v[:] for k, v in checked.items()}
        _call(stem, x, "triton")
        with counting_work() as planned:
            _call(stem, x, "triton")
    assert planned == checked and sum(v[0] for v in planned.values()) == 2


@backends
def test_a_planned_stem_compiles_without_graph_breaks(backend):
    stem = _stem(backend)
    x = torch.randn(2, 3, 16, 16, device=DEVICE).contiguous(memory_format=CL)
    with torch.no_grad():
        _call(stem, x, backend)
        eager = _call(stem, x, backend)  # planned
        torch._dynamo.reset()
        compiled = torch.compile(lambda t: _call(stem, t, backend), fullgraph=True,
                                 backend="aot_eager")
        assert torch.equal(compiled(x), eager)
