"""The fused blocks take torchvision's block arguments (inplanes, planes, stride, downsample,
groups, base_width, dilation, norm_layer), so `torchvision.models.ResNet(FusedBottleneck,
layers, ...)`, or a user's net written like it, builds fused blocks: the same state-dict
keys as torchvision's net, and the same outputs, gradients and running statistics in fp64
(differences are bugs, not rounding). A given downsample is kept (the same module); a
downsample or argument a fused block cannot take is refused, naming it."""

import pytest
import torch
import torchvision
from _backends import DEVICE, FUSED_BACKENDS
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet, conv1x1
from torchvision.ops.misc import FrozenBatchNorm2d

from fused_resnet.nn import FusedBasicBlock, FusedBottleneck

BACKENDS = [*FUSED_BACKENDS, "reference"]
MODEL_BACKENDS = FUSED_BACKENDS[1:] + ["reference"]  # nets: minutes in Triton's interpreter
NETS = {  # (block classes, ResNet's keyword arguments)
    "basic": ((FusedBasicBlock, BasicBlock), {}),
    "bottleneck": ((FusedBottleneck, Bottleneck), {}),
    "resnext": ((FusedBottleneck, Bottleneck), {"groups": 4, "width_per_group": 8}),
    "dilated": ((FusedBottleneck, Bottleneck),
                {"replace_stride_with_dilation": [False, True, True]}),
    "frozen bn": ((FusedBottleneck, Bottleneck), {"norm_layer": FrozenBatchNorm2d}),
}


def _with_backend(block_class, backend):
    """`block_class` with `backend` set, called as torchvision's ResNet calls a block."""
    def make(*args, **kwargs):
        return block_class(*args, **kwargs, backend=backend)
    make.expansion = block_class.expansion
    return make


def _randomize_norms(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def _assert_same(a, b, msg=""):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=msg)


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
@pytest.mark.parametrize("net", NETS)
def test_torchvision_resnet_of_fused_blocks_is_torchvisions(backend, net):
    (fused_class, tv_class), kwargs = NETS[net]
    torch.manual_seed(0)
    fused = ResNet(_with_backend(fused_class, backend), [1, 1, 1, 1], num_classes=5, **kwargs)
    tv = ResNet(tv_class, [1, 1, 1, 1], num_classes=5, **kwargs)
    assert all(isinstance(b, fused_class) for b in fused.modules() if hasattr(b, "conv1")
               and b is not fused)
    assert list(fused.state_dict()) == list(tv.state_dict())
    _randomize_norms(tv)
    fused.load_state_dict(tv.state_dict())
    fused, tv = fused.double().to(DEVICE), tv.double().to(DEVICE)
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64, device=DEVICE)
    for training in (True, False):
        fused.train(training)
        tv.train(training)
        out, expected = fused(x), tv(x)
        _assert_same(out, expected)
        out.square().sum().backward()
        expected.square().sum().backward()
    for (name, a), b in zip(fused.named_parameters(), tv.parameters()):
        _assert_same(a.grad, b.grad, name)
    for (name, a), b in zip(fused.state_dict().items(), tv.state_dict().values()):
        _assert_same(a, b, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused_class, tv_class, planes", [
    (FusedBasicBlock, BasicBlock, 16), (FusedBottleneck, Bottleneck, 4)])
def test_given_downsample_is_kept_and_run(backend, fused_class, tv_class, planes):
    torch.manual_seed(0)
    out_channels = planes * fused_class.expansion
    downsample = nn.Sequential(conv1x1(8, out_channels, 2), nn.BatchNorm2d(out_channels))
    fused = fused_class(8, planes, 2, downsample, backend=backend)
    assert fused.downsample is downsample
    tv = tv_class(8, planes, 2, nn.Sequential(conv1x1(8, out_channels, 2),
                                              nn.BatchNorm2d(out_channels)))
    _randomize_norms(fused)
    tv.load_state_dict(fused.state_dict())
    fused, tv = fused.double().to(DEVICE), tv.double().to(DEVICE)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64, device=DEVICE)
    xf, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = fused(xf), tv(xt)
    _assert_same(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    _assert_same(xf.grad, xt.grad)
    _assert_same(fused.downsample[0].weight.grad, tv.downsample[0].weight.grad)
    _assert_same(fused.downsample[1].running_var, tv.downsample[1].running_var)


def test_norm_layer_makes_every_bn():
    block = FusedBottleneck(16, 8, 2, norm_layer=lambda c: nn.BatchNorm2d(c, momentum=0.5))
    assert [m.momentum for m in block.modules() if isinstance(m, nn.BatchNorm2d)] == [0.5] * 4


@pytest.mark.parametrize("make, error, match", [
    (lambda: FusedBottleneck(8, 4, 2, nn.Conv2d(8, 16, 1, 2)), ValueError,
     r"downsample must be None, Sequential\(Conv2d 1x1, norm layer\)"),
    (lambda: FusedBottleneck(8, 4, 2, nn.Sequential(nn.Conv2d(8, 16, 3, 2), nn.BatchNorm2d(16))),
     ValueError, r"downsample's conv must be Conv2d\(8, 16, kernel_size=1, stride=2"),
    (lambda: FusedBasicBlock(8, 16, 2, nn.Sequential(conv1x1(8, 16, 1), nn.BatchNorm2d(16))),
     ValueError, "stride=2"),
    (lambda: FusedBasicBlock(8, 16, 2, nn.Sequential(conv1x1(8, 16, 2), nn.BatchNorm2d(16)),
                             shortcut="A"), ValueError, "needs shortcut 'B' or 'C'"),
    (lambda: FusedBasicBlock(8, 8, 1, None, 2), ValueError, "groups=1 and base_width=64"),
    (lambda: FusedBasicBlock(8, 8, 1, None, 1, 64, 2), NotImplementedError, "dilation > 1"),
])
def test_arguments_a_block_cannot_take_are_refused(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_torchvision_resnet50_of_fused_blocks_loads_resnet50_state():
    fused = ResNet(FusedBottleneck, [3, 4, 6, 3])
    fused.load_state_dict(torchvision.models.resnet50().state_dict())  # strict: same keys
    assert sum(isinstance(m, FusedBottleneck) for m in fused.modules()) == 16
