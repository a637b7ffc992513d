"""Inference plans (`ops.eval_plan`): a block's repeated eval calls with one input signature
skip `residual_block_eval`'s per-call work and give its output bit for bit; anything that
changes what that call would compute (weights, buffers, input shape or layout, autocast,
autograd, the backend) makes the block take the checked path again."""

import copy
import pickle

import pytest
import torch

from fused_resnet import models, ops
from fused_resnet.backend import forced_backend
from fused_resnet.nn import FusedBasicBlock, FusedBottleneck
from fused_resnet.nn import blocks as block_module
from tests._backends import DEVICE, FUSED_BACKENDS, skip_without_triton
from tests._bn import randomize_bn
from tests._calls import count_calls

BLOCKS = {
    "bottleneck identity": lambda b: FusedBottleneck(32, 8, 1, backend=b),
    "bottleneck projection": lambda b: FusedBottleneck(16, 8, 2, backend=b),
    "basic option A": lambda b: FusedBasicBlock(8, 16, 2, shortcut="A", backend=b),
    "basic plain": lambda b: FusedBasicBlock(8, 16, 1, shortcut=None, backend=b),
    "bottleneck dilated": lambda b: FusedBottleneck(16, 8, 2, dilation=2, backend=b),
}
# Triton (interpreted on CPU) and the `_C` kernels of the test device
backends = pytest.mark.parametrize("backend", FUSED_BACKENDS)


def _eval_block(make, backend, dtype=torch.float32):
    torch.manual_seed(0)
    return randomize_bn(make(backend).to(DEVICE, dtype).eval())


def _input(block, size=6, dtype=torch.float32):
    return torch.randn(2, block.conv1.in_channels, size, size, dtype=dtype, device=DEVICE).to(
        memory_format=torch.channels_last)


def _planned(name, backend):
    """(block, x): a BLOCKS[name] block called twice on x under no_grad, its plan made."""
    block = _eval_block(BLOCKS[name], backend)
    x = _input(block)
    with torch.no_grad():
        block(x)
        block(x)
    return block, x


@pytest.fixture
def checked_calls(monkeypatch):
    """Counts the calls that take `ops.residual_block_eval` (the checked path)."""
    return count_calls(monkeypatch, ops, "residual_block_eval")


@backends
@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_repeated_calls_run_the_plan_with_the_same_output(name, dtype, backend, checked_calls):
    block = _eval_block(BLOCKS[name], backend, dtype)
    x = _input(block, dtype=dtype)
    with torch.no_grad():
        first = block(x)
        assert len(checked_calls) == 1 and block in block_module._EVAL_PLANS
        for _ in range(2):  # the plan's first call launches through `launch`, later ones not
            again = block(x)
            assert torch.equal(again, first)
            assert again.stride() == first.stride() and again.dtype == first.dtype
        assert len(checked_calls) == 1
        with forced_backend("reference"):  # what the plan stands for, computed apart
            reference = block(x)
    tol = 1e-4 if dtype == torch.float32 else 0.05  # folded vs BN after the conv
    torch.testing.assert_close(first, reference, atol=tol, rtol=tol)


@backends
def test_changed_weights_buffers_and_inputs_take_the_checked_path(backend, checked_calls):
    block, x = _planned("bottleneck projection", backend)
    with torch.no_grad():
        changes = [
            lambda: block.conv2.weight.mul_(1.5),  # an optimizer step writes in place
            lambda: block.bn3.running_var.add_(0.5),
            lambda: block.downsample[1].bias.sub_(0.25),
            lambda: block.load_state_dict(_eval_block(BLOCKS["bottleneck projection"],
                                                      backend).state_dict()),
        ]
        for i, change in enumerate(changes):
            change()
            out = block(x)
            with forced_backend("reference"):
                torch.testing.assert_close(out, block(x), atol=1e-4, rtol=1e-4)
            assert len(checked_calls) == 2 + i
            block(x)  # planned again
            assert len(checked_calls) == 2 + i
        n = len(checked_calls)
        planned = block(x)
        out = block(x.contiguous())  # NCHW, same shape: an NCHW output, planned on `_C` only
        # another layout is another computation for ATen's convs (oneDNN in torch 2.11, cuDNN
        # may take other algorithms): close, not bit-equal; a layout's repeats are
        assert out.is_contiguous()
        torch.testing.assert_close(out, planned, atol=1e-5, rtol=1e-5)
        assert torch.equal(block(x.contiguous()), out)
        n += 2 if backend == "triton" else 1
        assert len(checked_calls) == n
        block(_input(block, size=8))  # another input size: checked, then planned beside x's
        block(x)
        assert len(checked_calls) == n + 1


@backends
def test_a_block_keeps_a_plan_per_input_signature_of_its_current_fold(backend, checked_calls):
    """Calls alternating between input sizes run their plans (a server's batch sizes); at most
    PLANS_PER_BLOCK, the least recently used dropped first; a refold drops every plan of the
    old folded tensors, even those of other sizes."""
    block, x = _planned("bottleneck identity", backend)
    limit = block_module.PLANS_PER_BLOCK
    inputs = [x] + [_input(block, size=s) for s in range(7, 7 + limit)]  # one size too many
    with torch.no_grad():
        outputs = [block(t) for t in inputs[1:limit]]  # x's plan and limit - 1 more
        assert len(checked_calls) == limit
        for _ in range(2):
            for t, out in zip(inputs[1:limit], outputs):
                assert torch.equal(block(t), out)
            block(x)
        assert len(checked_calls) == limit and len(block_module._EVAL_PLANS[block]) == limit
        block(inputs[1])  # most recently used: inputs[1], then x; the least: inputs[2]
        block(inputs[limit])  # a fifth size: checked, and the plan of inputs[2] dropped
        assert len(checked_calls) == limit + 1
        assert len(block_module._EVAL_PLANS[block]) == limit
        block(x)
        block(inputs[1])
        assert len(checked_calls) == limit + 1
        block(inputs[2])
        assert len(checked_calls) == limit + 2
        block.bn2.running_mean.add_(0.1)  # a refold: new folded tensors
        changed = block(inputs[1])
        with forced_backend("reference"):
            torch.testing.assert_close(changed, block(inputs[1]), atol=1e-4, rtol=1e-4)
        plans = block_module._EVAL_PLANS[block]
        assert len(plans) == 1 and plans[0].signature[0] == inputs[1].shape
        block(x)  # its plan went with the old fold
        assert len(checked_calls) == limit + 4


@backends
def test_a_changed_conv_stride_takes_the_checked_path(backend, checked_calls):
    block, x = _planned("basic plain", backend)
    with torch.no_grad():
        block.conv2.stride = (2, 2)  # a plain block may change its stride: no shortcut
        out = block(x)
        assert len(checked_calls) == 2 and out.shape[2:] == (3, 3)
        with forced_backend("reference"):
            torch.testing.assert_close(out, block(x), atol=1e-4, rtol=1e-4)


@backends
def test_autocast_autograd_and_the_backend_are_part_of_the_plan(backend, checked_calls):
    block, x = _planned("bottleneck identity", backend)
    assert len(checked_calls) == 1
    with torch.no_grad():
        with torch.autocast(DEVICE, dtype=torch.bfloat16):  # fp32 x is cast: checked path
            out = block(x)
        assert out.dtype == torch.bfloat16 and len(checked_calls) == 2
        block(x)  # folded for fp32 again: new folded tensors, a new plan
        block(x)
        assert len(checked_calls) == 3
        with forced_backend("reference"):
            block(x)
        block(x)
        assert len(checked_calls) == 3  # the reference backend neither folds nor plans
    block.requires_grad_(False)  # a frozen model under grad mode folds too
    planned = block(x)  # and x needs no gradient: the plan still applies
    assert len(checked_calls) == 3 and planned.grad_fn is None
    xg = x.clone().requires_grad_()
    out = block(xg)  # autograd records the checked path's ops
    assert out.grad_fn is not None and len(checked_calls) == 4
    out.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


@backends
def test_training_mode_and_model_copies_ignore_the_plan(backend, checked_calls):
    model = models.cifar_resnet(20, backend=backend).to(DEVICE).eval()
    x = torch.randn(2, 3, 8, 8, device=DEVICE).to(memory_format=torch.channels_last)
    with torch.no_grad():
        first = model(x)
        model(x)
    planned = sum(1 for m in model.modules() if m in block_module._EVAL_PLANS)
    assert planned == 9
    clone = copy.deepcopy(model)
    pickle.loads(pickle.dumps(model))  # plans live beside the modules, not in them
    with torch.no_grad():
        assert torch.equal(clone(x), first)
    model.train()
    model(x).sum().backward()  # the training op, not a stale plan
    model.eval()
    with torch.no_grad():
        with forced_backend("reference"):
            expected = model(x)
        # the running stats moved: refolded, planned anew
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)


def test_launches_are_counted_and_profiled_through_a_plan(checked_calls):
    skip_without_triton()
    from fused_resnet.triton.launch import counting_work

    block = _eval_block(BLOCKS["bottleneck projection"], "triton")
    x = _input(block)
    with torch.no_grad():
        with counting_work() as checked:
            block(x)
        checked = {k: v[:] for k, v in checked.items()}
        block(x)
        with counting_work() as planned:
            block(x)
    assert planned == checked and sum(v[0] for v in planned.values()) == 4


@backends
def test_a_planned_model_compiles_without_graph_breaks(backend, checked_calls):
    model = models.cifar_resnet(20, backend=backend).to(DEVICE).eval().to(
        memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8, device=DEVICE).to(memory_format=torch.channels_last)
    with torch.no_grad():
        model(x)
        eager = model(x)  # planned
        torch._dynamo.reset()  # other tests' compiles of these forwards count to its limit
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(x), eager)
