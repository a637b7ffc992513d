"""The functional ops beside conv_bn_act: `sync_batch_norm` / `sync_conv_bn_act` check every
argument before anything runs (a call that raises leaves the running stats as they were) and
take an empty batch as torch's BatchNorm does; `bn_add_relu` differentiates alike on every
backend and takes fp64 scale / shift beside fp64 activations."""

import datetime
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _backends import DEVICE, FUSED_BACKENDS

from fused_resnet import ops

C = 4
F64 = torch.float64


@pytest.fixture
def one_rank_group(tmp_path):
    """torch.distributed initialized with a single-rank gloo group, for this test only."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _stats():
    return torch.randn(C), torch.rand(C) + 0.5


def _sync_bn_kwargs(**changes):
    running_mean, running_var = _stats()
    kwargs = dict(y=torch.randn(2, C, 5, 5), bn_weight=torch.rand(C) + 0.5,
                  bn_bias=torch.randn(C), running_mean=running_mean, running_var=running_var,
                  momentum=0.1, eps=1e-5, residual=None, group=None)
    kwargs.update(changes)
    return kwargs


SYNC_BN_BAD = [
    (dict(running_var=torch.ones(5)), r"running_var must have shape \(4,\)"),
    (dict(running_var=None), "running_mean and running_var must both be"),
    (dict(running_mean=torch.zeros(3)), r"running_mean must have shape \(4,\)"),
    (dict(running_mean=torch.zeros(C, requires_grad=True)), "running_mean requires grad"),
    (dict(running_var=torch.ones(C, requires_grad=True)), "running_var requires grad"),
    (dict(bn_weight=torch.ones(3)), r"bn_weight must have shape \(4,\)"),
    (dict(bn_bias=torch.zeros(C, dtype=F64)), "bn_bias must be torch.float32"),
    (dict(eps=0.0), "eps must be a positive number"),
    (dict(eps=-1.0), "eps must be a positive number"),
    (dict(eps=float("nan")), "eps must be a positive number"),
    (dict(momentum=None), "momentum must be a number in"),
    (dict(momentum=1.5), "momentum must be a number in"),
    (dict(residual=torch.randn(2, C, 1, 1)), "residual must match y"),
    (dict(y=torch.ones(2, C, 5, 5, dtype=torch.long)), "y must be a floating-point"),
    (dict(y=torch.randn(2, C, 5)), "y must be 4-D"),
    (dict(group="world"), "group must be None"),
]


@pytest.mark.parametrize("changes, message", SYNC_BN_BAD)
def test_sync_batch_norm_refuses_bad_arguments_before_touching_running_stats(
        one_rank_group, changes, message):
    kwargs = _sync_bn_kwargs(**changes)
    before = [None if t is None else t.detach().clone()
              for t in (kwargs["running_mean"], kwargs["running_var"])]
    y, weight, bias = kwargs.pop("y"), kwargs.pop("bn_weight"), kwargs.pop("bn_bias")
    mean, var = kwargs.pop("running_mean"), kwargs.pop("running_var")
    with pytest.raises(ValueError, match=message):
        ops.sync_batch_norm(y, weight, bias, mean, var, **kwargs)
    for t, old in zip((mean, var), before):
        if t is not None and t.shape == old.shape:
            assert torch.equal(t, old)


SYNC_CONV_BAD = [
    (dict(weight=torch.randn(6, 3, 3, 3)), "x has 4 channels but weight expects 3"),
    (dict(running_var=torch.ones(5)), r"running_var must have shape \(6,\)"),
    (dict(running_var=torch.ones(6, requires_grad=True)), "running_var requires grad"),
    (dict(eps=0.0), "eps must be a positive number"),
    (dict(momentum=None), "momentum must be a number in"),
    (dict(residual=torch.randn(2, 6, 3, 3)), "residual must have shape"),
]


@pytest.mark.parametrize("changes, message", SYNC_CONV_BAD)
def test_sync_conv_bn_act_refuses_bad_arguments_before_touching_running_stats(
        one_rank_group, changes, message):
    kwargs = dict(x=torch.randn(2, C, 5, 5), weight=torch.randn(6, C, 3, 3),
                  bn_weight=torch.ones(6), bn_bias=torch.zeros(6), running_mean=torch.zeros(6),
                  running_var=torch.ones(6), stride=1, padding=1, groups=1, momentum=0.1,
                  eps=1e-5, residual=None, relu=True, group=None)
    kwargs.update(changes)
    mean = kwargs["running_mean"]
    with pytest.raises(ValueError, match=message):
        ops.sync_conv_bn_act(**kwargs)
    assert torch.equal(mean, torch.zeros(6))


def test_sync_ops_without_a_process_group_name_group():
    assert not dist.is_initialized()
    mean, var = _stats()
    y = torch.randn(2, C, 3, 3)
    with pytest.raises(ValueError, match="group: torch.distributed is not initialized"):
        ops.sync_batch_norm(y, None, None, mean, var, momentum=0.1, eps=1e-5, group=None)
    with pytest.raises(ValueError, match="group: torch.distributed is not initialized"):
        ops.sync_conv_bn_act(y, torch.randn(C, C, 1, 1), None, None, mean, var, stride=1,
                             padding=0, groups=1, momentum=0.1, eps=1e-5, residual=None,
                             relu=True, group=None)


def _torch_bn(y, weight, bias, mean, var, residual, relu, momentum=0.1, eps=1e-5):
    out = F.batch_norm(y, mean, var, weight, bias, True, momentum, eps)
    out = out if residual is None else out + residual
    return out.relu() if relu else out


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(t.requires_grad)
            for t in tensors]


@pytest.mark.parametrize("batch, residual, relu", [(2, True, True), (2, False, False),
                                                   (0, True, True)])
def test_sync_batch_norm_matches_torch_in_fp64(one_rank_group, batch, residual, relu):
    """Output, gradients and running stats against F.batch_norm; an empty batch gives an
    empty output and zero parameter gradients, and leaves the running stats unchanged."""
    y = torch.randn(batch, C, 3, 3, dtype=F64, requires_grad=True)
    weight = (torch.rand(C, dtype=F64) + 0.5).requires_grad_()
    bias = torch.randn(C, dtype=F64, requires_grad=True)
    r = torch.randn(batch, C, 3, 3, dtype=F64, requires_grad=True) if residual else None
    mean, var = (t.double() for t in _stats())
    ours, theirs = _leaves(y, weight, bias, r, mean, var), _leaves(y, weight, bias, r, mean, var)
    out = ops.sync_batch_norm(*ours[:3], *ours[4:], momentum=0.1, eps=1e-5, residual=ours[3],
                              relu=relu, group=None)
    expected = _torch_bn(*theirs[:3], *theirs[4:], theirs[3], relu)
    assert out.shape == (batch, C, 3, 3)
    torch.testing.assert_close(out, expected)
    dz = torch.randn_like(expected)
    out.backward(dz)
    expected.backward(dz)
    for a, b in zip(ours, theirs):
        if a is not None and a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(ours[4], theirs[4])
    torch.testing.assert_close(ours[5], theirs[5])
    if batch == 0:
        assert torch.equal(ours[4], mean) and torch.equal(ours[5], var)


WORLD = 2


def _worker(rank, init_file, out_dir):
    """Rank 0 holds the whole batch, rank 1 an empty one: both join both all_reduces (a rank
    that skipped one would leave the other waiting until the timeout)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        x = torch.randn(2, C, 3, 3, dtype=F64)
        w = torch.randn(C, C, 1, 1, dtype=F64, requires_grad=True)
        mean, var = torch.zeros(C, dtype=F64), torch.ones(C, dtype=F64)
        x = (x if rank == 0 else x[:0]).requires_grad_()
        z = ops.sync_conv_bn_act(x, w, None, None, mean, var, stride=1, padding=0, groups=1,
                                 momentum=0.1, eps=1e-5, residual=None, relu=True, group=None)
        z.pow(2).sum().backward()
        torch.save({"z": z.detach(), "dx": x.grad, "dw": w.grad, "mean": mean, "var": var},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(sys.platform != "linux", reason="spawned gloo workers on Linux")
def test_sync_conv_bn_act_with_an_empty_rank_joins_the_group(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    torch.manual_seed(0)
    x = torch.randn(2, C, 3, 3, dtype=F64, requires_grad=True)
    w = torch.randn(C, C, 1, 1, dtype=F64, requires_grad=True)
    mean, var = torch.zeros(C, dtype=F64), torch.ones(C, dtype=F64)
    z = F.relu(F.batch_norm(F.conv2d(x, w), mean, var, None, None, True, 0.1, 1e-5))
    z.pow(2).sum().backward()
    assert results[1]["z"].shape == (0, C, 3, 3) and results[1]["dx"].shape == (0, C, 3, 3)
    torch.testing.assert_close(results[0]["z"], z.detach())
    torch.testing.assert_close(results[0]["dx"], x.grad)
    torch.testing.assert_close(results[0]["dw"] + results[1]["dw"], w.grad)
    for result in results:  # every rank's running stats take the group's statistics
        torch.testing.assert_close(result["mean"], mean)
        torch.testing.assert_close(result["var"], var)


BN_ADD_RELU_BACKENDS = [*FUSED_BACKENDS, "reference"]


@pytest.mark.parametrize("backend", BN_ADD_RELU_BACKENDS)
@pytest.mark.parametrize("residual, relu", [(True, True), (False, False)])
def test_bn_add_relu_gradients_match_autograd_on_every_backend(backend, residual, relu):
    """Gradients of y, scale, shift and residual against torch's autograd of the composition
    act(y * scale + shift + residual), fp64."""
    y = torch.randn(2, C, 3, 3, dtype=F64, device=DEVICE, requires_grad=True)
    scale = torch.randn(C, dtype=F64, device=DEVICE, requires_grad=True)
    shift = torch.randn(C, dtype=F64, device=DEVICE, requires_grad=True)
    r = torch.randn_like(y, requires_grad=True) if residual else None
    out = ops.bn_add_relu(y, scale, shift, r, relu, backend=backend)
    tensors = [t for t in (y, scale, shift, r) if t is not None]
    dz = torch.randn_like(out)
    grads = torch.autograd.grad(out, tensors, dz)
    expected = y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    expected = expected if r is None else expected + r
    expected = expected.relu() if relu else expected
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, torch.autograd.grad(expected, tensors, dz)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BN_ADD_RELU_BACKENDS)
def test_bn_add_relu_takes_fp64_scale_and_shift_for_fp64_y(backend):
    """Inference (the fused kernels run): fp64 scale / shift are used unrounded (in fp32,
    1 + 2^-40 is 1 and 0.1 is off by 1.5e-9); for fp32 y they are refused, as the `_C`
    kernels' message says."""
    y = torch.rand(2, C, 3, 3, dtype=F64, device=DEVICE) + 3
    scale = torch.full((C,), 1 + 2.0 ** -40, dtype=F64, device=DEVICE)
    shift = torch.full((C,), 0.1, dtype=F64, device=DEVICE)
    with torch.no_grad():
        out = ops.bn_add_relu(y, scale, shift, None, False, backend=backend)
    assert out.dtype == F64
    torch.testing.assert_close(out, y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1),
                               rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match=r"scale must be float32 of shape \(4,\)"):
        ops.bn_add_relu(y.float(), scale, shift.float(), backend=backend)
