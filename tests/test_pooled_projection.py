"""ResNet-D's shortcut (Bag of Tricks; timm's resnet*d): `downsample = Sequential(pool,
conv1x1, BN)`, a 2x2 average pool (ceil mode, padding not counted) doing the stride, or an
Identity where there is none. A fused block runs it conv by conv, calling the pool module as
itself; `fr.convert` swaps such blocks, and a block built with one takes it. Compared with
the same block run by torch in fp64 (training: outputs, input and parameter gradients,
running statistics; eval), odd map sizes included (where ceil mode matters). The blocks
here are torchvision's with ResNet-D's downsample, as timm builds them; timm's own resnet26d
and resnet50d, converted whole, are in test_timm_stem.py."""

import copy
import warnings

import pytest
import torch
from _backends import DEVICE, FUSED_BACKENDS
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

import fused_resnet as fr
from fused_resnet.nn import FusedBasicBlock, FusedBottleneck

BACKENDS = [*FUSED_BACKENDS, "reference"]


def _d_downsample(inplanes: int, out: int, stride: int) -> nn.Sequential:
    pool = (nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride > 1
            else nn.Identity())
    return nn.Sequential(pool, conv1x1(inplanes, out), nn.BatchNorm2d(out))


class Holder(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)


def _randomized(module: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return module.double().to(DEVICE)


def _compare(fused: nn.Module, torch_block: nn.Module, channels: int, size: int) -> None:
    """fused and torch_block (the same state) agree in training and eval, to fp64 rounding."""
    x = torch.randn(2, channels, size, size, dtype=torch.float64, device=DEVICE)
    for training in (True, False):
        fused.train(training)
        torch_block.train(training)
        xf, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, expected = fused(xf), torch_block(xt)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        out.square().sum().backward()
        expected.square().sum().backward()
        torch.testing.assert_close(xf.grad, xt.grad, rtol=1e-9, atol=1e-10)
    for (name, a), b in zip(fused.named_parameters(), torch_block.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10, msg=name)
    for (name, a), b in zip(fused.state_dict().items(), torch_block.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tv_class, planes, stride, size", [
    (Bottleneck, 4, 2, 7), (Bottleneck, 4, 1, 6), (BasicBlock, 16, 2, 5)])
def test_converted_resnet_d_block_computes_torchs(backend, tv_class, planes, stride, size):
    torch.manual_seed(0)
    out = planes * tv_class.expansion
    model = _randomized(Holder(tv_class(8, planes, stride, _d_downsample(8, out, stride))))
    expected = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # swapped, unwarned
        fr.convert(model, backend=backend)
    block = model.block
    assert isinstance(block, (FusedBasicBlock, FusedBottleneck))
    assert block.shortcut_kind() == "pooled_projection"
    _compare(model, expected, 8, size)


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_built_with_a_pooled_projection(backend):
    torch.manual_seed(0)
    downsample = _d_downsample(16, 32, 2)
    fused = FusedBottleneck(16, 8, 2, downsample, backend=backend)
    assert fused.downsample is downsample
    expected = Bottleneck(16, 8, 2, _d_downsample(16, 32, 2))
    expected.load_state_dict(fused.state_dict())
    _compare(_randomized(fused), _randomized(expected), 16, 9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hooks_on_the_pool_fire_and_a_failing_call_moves_no_statistic(backend):
    torch.manual_seed(0)
    fused = _randomized(FusedBottleneck(16, 8, 2, _d_downsample(16, 32, 2), backend=backend))
    calls = []
    fused.downsample[0].register_forward_hook(lambda *_: calls.append(1))
    fused(torch.randn(2, 16, 6, 6, dtype=torch.float64, device=DEVICE))
    assert calls == [1]
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    with pytest.raises(ValueError):  # wrong channel count: refused before any BN updates
        fused(torch.randn(2, 12, 6, 6, dtype=torch.float64, device=DEVICE))
    for k, v in fused.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_pooled_projection_is_refused():
    bad = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(16, 32, 3, padding=1, bias=False),
                        nn.BatchNorm2d(32))
    with pytest.raises(ValueError, match=r"downsample's conv must be Conv2d\(16, 32, "
                                         r"kernel_size=1, bias=False\)"):
        FusedBottleneck(16, 8, 2, bad)


def test_convert_still_refuses_other_downsamples():
    block = Bottleneck(8, 4, 2, nn.Sequential(nn.AvgPool2d(2), nn.ReLU(), conv1x1(8, 16),
                                              nn.BatchNorm2d(16)))
    model = Holder(block)
    with pytest.warns(RuntimeWarning, match="its downsample is AvgPool2d, ReLU, Conv2d"):
        fr.convert(model, backend="reference")
    assert model.block is block
