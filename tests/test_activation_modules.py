"""The stateless modules of torchvision's tree that the fused nets hold too: each block's
`relu`, the ResNet's `relu` (stem) and `avgpool`, the CIFAR nets' alike. `named_modules()`
is torchvision's, name for name and in order, before and after `fr.convert`; an activation
swapped in for `relu` (SiLU, ReLU6: what tools that edit the tree do), or hooks on it, make
the block / stem call its modules as torchvision does (warned) and give torchvision's
results; a block pickled before blocks held `relu` still runs. fp64: differences are bugs."""

import warnings

import pytest
import torch
import torchvision
from _backends import DEVICE, FUSED_BACKENDS
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

import fused_resnet as fr
from fused_resnet.nn import FusedBasicBlock, FusedBottleneck

BACKENDS = [*FUSED_BACKENDS, "reference"]
MODEL_BACKENDS = FUSED_BACKENDS[1:] + ["reference"]  # a ResNet step is minutes in Triton's
UNFUSED = "runs unfused"                              # interpreter


def _names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules()]


def _swap_relus(model: nn.Module, make) -> None:
    """Every nn.ReLU child in `model` replaced by make(), as activation-swap tools do."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.ReLU:
                setattr(module, name, make())


def _twins(depth: int, backend: str):
    """A fused ResNet on `backend` and torchvision's with the same random fp64 state."""
    torch.manual_seed(0)
    fused = fr.models.resnet(depth, num_classes=5, backend=backend).double().to(DEVICE)
    with torch.no_grad():
        for m in fused.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    tv = getattr(torchvision.models, f"resnet{depth}")(num_classes=5).double().to(DEVICE)
    tv.load_state_dict(fused.state_dict())
    return fused, tv


def _x(channels: int, size: int = 16) -> torch.Tensor:
    return torch.randn(2, channels, size, size, dtype=torch.float64, device=DEVICE)


@pytest.mark.parametrize("depth", [18, 50])
def test_module_tree_is_torchvisions(depth):
    fused, tv = _twins(depth, "reference")
    assert _names(fused) == _names(tv)
    converted = getattr(torchvision.models, f"resnet{depth}")(num_classes=5)
    fr.convert(converted, backend="reference")
    assert _names(converted) == _names(tv)
    assert type(fused.layer1[0].relu) is nn.ReLU and type(fused.avgpool) is nn.AdaptiveAvgPool2d
    assert fused.state_dict().keys() == tv.state_dict().keys()  # no state in the new modules


def test_convert_keeps_the_blocks_relu_module():
    tv = torchvision.models.resnet18()
    relu = tv.layer2[0].relu
    fr.convert(tv, backend="reference")
    assert isinstance(tv.layer2[0], FusedBasicBlock) and tv.layer2[0].relu is relu


def test_cifar_net_holds_relu_and_avgpool():
    net = fr.models.cifar_resnet(20, backend="reference")
    names = _names(net)
    assert {"relu", "avgpool", "layer1.0.relu", "layer3.2.relu"} <= set(names)


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
@pytest.mark.parametrize("depth", [18, 50])
def test_swapped_activation_computes_torchvisions(backend, depth):
    fused, tv = _twins(depth, backend)
    for model in (fused, tv):
        _swap_relus(model, nn.SiLU)
    x = _x(3, 32)
    for training in (True, False):
        fused.train(training)
        tv.train(training)
        xf, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        with pytest.warns(UserWarning, match="relu is SiLU, not nn.ReLU"):
            out = fused(xf)
        expected = tv(xt)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        out.square().sum().backward()
        expected.square().sum().backward()
        torch.testing.assert_close(xf.grad, xt.grad, rtol=1e-9, atol=1e-10)
    for (name, a), b in zip(fused.state_dict().items(), tv.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
    for (name, a), b in zip(fused.named_parameters(), tv.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_class, tv_class, relus", [
    (FusedBasicBlock, torchvision.models.resnet.BasicBlock, 2),
    (FusedBottleneck, torchvision.models.resnet.Bottleneck, 3),
])
def test_hooks_on_a_blocks_relu_fire_as_torchvisions(backend, block_class, tv_class, relus):
    torch.manual_seed(0)
    block = block_class(16, 4 if block_class is FusedBottleneck else 16, backend=backend)
    block = block.double().to(DEVICE)
    tv = tv_class(16, 4 if block_class is FusedBottleneck else 16).double().to(DEVICE)
    tv.load_state_dict(block.state_dict())
    seen = {"fused": 0, "tv": 0}
    block.relu.register_forward_hook(lambda *_: seen.__setitem__("fused", seen["fused"] + 1))
    tv.relu.register_forward_hook(lambda *_: seen.__setitem__("tv", seen["tv"] + 1))
    x = _x(16, 6)
    with pytest.warns(UserWarning, match="hooks on its ReLU"):
        out = block(x)
    torch.testing.assert_close(out, tv(x), rtol=1e-10, atol=1e-10)
    assert seen == {"fused": relus, "tv": relus}


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_stem_relu_swap_and_hooks(backend):
    fused, tv = _twins(18, backend)
    fused.eval()
    tv.eval()
    calls = []
    fused.relu.register_forward_hook(lambda *_: calls.append(1))
    x = _x(3, 32)
    with pytest.warns(UserWarning, match="the stem runs unfused.*hooks on its ReLU"):
        torch.testing.assert_close(fused(x), tv(x), rtol=1e-10, atol=1e-10)
    assert calls == [1]
    fused.relu = nn.ReLU6()
    tv.relu = nn.ReLU6()
    with pytest.warns(UserWarning, match="relu is ReLU6"):
        torch.testing.assert_close(fused(x * 50), tv(x * 50), rtol=1e-10, atol=1e-10)


def test_cifar_stem_relu_swap():
    torch.manual_seed(0)
    net = fr.models.cifar_resnet(20, backend="reference").double().to(DEVICE).eval()
    x = _x(3, 8)
    plain = net(x)
    net.relu = nn.Identity()  # the stem's activation only: the blocks keep theirs
    with pytest.warns(UserWarning, match="relu is Identity"):
        out = net(x)
    block = net.layer1[0]
    stem = net.bn1(net.conv1(x))
    expected = net.fc(torch.flatten(net.avgpool(net.layer3(net.layer2(net.layer1(stem)))), 1))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(out, plain) and type(block.relu) is nn.ReLU


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_pickled_without_relu_still_runs(backend):
    torch.manual_seed(0)
    block = FusedBottleneck(16, 4, backend=backend).double().to(DEVICE)
    x = _x(16, 6)
    expected = block(x)
    del block._modules["relu"]  # as unpickled from before blocks held one
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)
    block.conv1.register_forward_hook(lambda *_: None)  # the module path: torch.relu
    with pytest.warns(UserWarning, match=UNFUSED):
        torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)


def test_feature_extractor_takes_torchvisions_node_names():
    fused, tv = _twins(18, "reference")
    nodes = {"relu": "stem", "layer2.1.relu_1": "block", "avgpool": "pooled"}
    x = _x(3, 32)
    got = create_feature_extractor(fused.eval(), nodes)(x)
    expected = create_feature_extractor(tv.eval(), nodes)(x)
    for name in nodes.values():
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_stem_conv_swapped_in_with_a_bias_runs_as_torchvision(backend):
    """A grayscale model's new stem conv with nn.Conv2d's default bias=True: the stem runs
    as torchvision's, warned, rather than raising (fp64, training then eval)."""
    fused, tv = _twins(18, backend)
    torch.manual_seed(3)
    fused.conv1 = nn.Conv2d(1, 64, 7, 2, 3).double().to(DEVICE)
    tv.conv1 = nn.Conv2d(1, 64, 7, 2, 3).double().to(DEVICE)
    tv.conv1.load_state_dict(fused.conv1.state_dict())
    x = _x(1, 32)
    for training in (True, False):
        fused.train(training), tv.train(training)
        with pytest.warns(UserWarning, match="the stem runs unfused.*bias=False"):
            out = fused(x)
        torch.testing.assert_close(out, tv(x), rtol=1e-10, atol=1e-10)
