"""torch.jit.script over fused modules and nets. TorchScript compiles only the branch of each
fused forward under `torch.jit.is_scripting()`: torchvision's forward, module by module. The
scripted module holds the very parameters and buffers of the fused one, runs aten convs and
batch norms (training updates the running statistics as nn.BatchNorm2d does), saves and loads
without fused_resnet, and leaves the fused module as it was. fp64: differences are bugs."""

import copy
import subprocess
import sys
import warnings

import pytest
import torch
import torchvision
from _bn import randomize_bn
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

import fused_resnet as fr
from fused_resnet.nn import FusedBasicBlock, FusedBottleneck, FusedConvBNAct, FusedMaxPool2d


def _script(module: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # recent torch marks torch.jit.script / save deprecated
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(module)


def _randomize_bns(model: nn.Module) -> nn.Module:
    """BN affines and running statistics away from their initial 1 / 0 (so a mix-up shows)."""
    torch.manual_seed(3)
    return randomize_bn(model)


def _image(n: int = 2, size: int = 32, channels: int = 3) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(n, channels, size, size, dtype=torch.float64)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


NETS = {
    "resnet18": lambda: fr.models.resnet18(num_classes=10),
    "resnet50_v1": lambda: fr.models.resnet50(num_classes=10, variant="v1"),
    "resnext_option_C": lambda: fr.models.resnet(50, num_classes=10, groups=2,
                                                 width_per_group=8, shortcut="C"),
    "cifar20_option_A": lambda: fr.models.cifar_resnet(20),
    "plain_cifar8": lambda: fr.models.plain_net(8),
}


@pytest.mark.parametrize("name", NETS)
def test_scripted_net_trains_and_infers_as_the_fused_net(name):
    torch.manual_seed(0)
    fused = _randomize_bns(NETS[name]().double())
    twin = copy.deepcopy(fused)
    scripted = _script(twin)
    x = _image(size=64)  # the last stage's BN takes 8 values a channel, not an ill-posed 2
    for model in (fused, scripted):  # a training step: batch statistics, running stats
        model.train()
        model(x).square().sum().backward()
    for (key, a), b in zip(fused.state_dict().items(), twin.state_dict().values()):
        if a.is_floating_point():
            _close(b, a)
        else:
            assert torch.equal(a, b), key
    for p, q in zip(fused.parameters(), twin.parameters()):
        # relative to the gradient's scale: the last stage's BN, over 8 values a channel,
        # amplifies rounding (~1e-11 seen)
        assert (q.grad - p.grad).abs().max() <= 1e-9 * p.grad.abs().max()
    fused.eval(), scripted.eval()
    with torch.no_grad():
        _close(scripted(x), fused(x))


def test_scripted_resnet_is_torchvisions_and_shares_the_tensors():
    fused = _randomize_bns(fr.models.resnet18(num_classes=10).double()).eval()
    tv = torchvision.models.resnet18(num_classes=10).double().eval()
    tv.load_state_dict(fused.state_dict())
    scripted = _script(fused)
    x = _image()
    with torch.no_grad():
        _close(scripted(x), tv(x))
    for (key, a), b in zip(fused.state_dict().items(), scripted.state_dict().values()):
        assert a.data_ptr() == b.data_ptr(), key
    with torch.no_grad():  # an edit of the fused net's weights is the scripted net's
        fused.fc.weight.mul_(2)
        tv.fc.weight.mul_(2)
        _close(scripted(x), tv(x))
    # the fused net is left as it was: its blocks and stem still run the fused ops
    assert type(fused.layer1[0]) is FusedBasicBlock
    assert type(fused.maxpool) is FusedMaxPool2d
    with torch.no_grad():
        _close(fused(x), tv(x))


def test_scripted_net_saves_and_loads_without_fused_resnet(tmp_path):
    fused = _randomize_bns(fr.models.cifar_resnet(8).double()).eval()
    x = _image(size=16)
    with torch.no_grad():
        want = fused(x)
    scripted = _script(fused)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(scripted, tmp_path / "net.pt")
    torch.save({"x": x, "want": want}, tmp_path / "io.pt")
    # another process loads the archive with torch alone: fused_resnet is never imported
    check = (
        "import sys, torch\n"
        f"net = torch.jit.load({str(tmp_path / 'net.pt')!r})\n"
        f"data = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "with torch.no_grad():\n"
        "    torch.testing.assert_close(net(data['x']), data['want'], rtol=1e-10, atol=1e-10)\n"
        "assert 'fused_resnet' not in sys.modules, 'fused_resnet imported'\n"
        "print('loaded')\n")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr[-2000:]


def _torchvision_resnet(arch: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return _randomize_bns(getattr(torchvision.models, arch)(num_classes=10, **kwargs)).double()


CONVERTED = {
    "torchvision_resnet18": lambda: _torchvision_resnet("resnet18"),
    "torchvision_resnet50": lambda: _torchvision_resnet("resnet50"),
    "getter_frozen_bn": lambda: IntermediateLayerGetter(
        _torchvision_resnet("resnet18", norm_layer=FrozenBatchNorm2d),
        {"layer2": "aux", "layer4": "out"}),
}


@pytest.mark.parametrize("name", CONVERTED)
def test_scripted_converted_torchvision_model_is_the_original(name):
    original = CONVERTED[name]().eval()
    converted = fr.convert(copy.deepcopy(original))
    assert type(converted) is not type(original)  # the stem's class swapped, blocks fused
    scripted = _script(converted)
    x = _image()
    with torch.no_grad():
        want, got = original(x), scripted(x)
    if isinstance(want, dict):
        assert list(got) == list(want)
        for key in want:
            _close(got[key], want[key])
    else:
        _close(got, want)


@pytest.mark.parametrize("arch", ["resnet18", "resnet26d"])
def test_scripted_converted_timm_model_is_timms(arch):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    original = _randomize_bns(timm.create_model(arch, num_classes=10)).double().eval()
    converted = fr.convert(copy.deepcopy(original))
    assert type(converted).__name__ == "TimmResNetFusedStem"
    x = _image()
    with torch.no_grad():
        _close(_script(converted)(x), original(x))


def test_scripted_fused_modules_in_a_users_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        FusedConvBNAct(3, 8, 3),
        FusedMaxPool2d(3, 2, 1),
        FusedBasicBlock(8, 16, 2, shortcut="A"),
        FusedBottleneck(16, 4, 1),
        FusedConvBNAct(16, 8, 1, relu=False),
    )
    model = _randomize_bns(model.double()).eval()
    scripted = _script(model)
    x = _image(size=16)
    with torch.no_grad():
        _close(scripted(x), model(x))
        y = model[:4](x)
        residual = torch.randn(2, 8, 4, 4, dtype=torch.float64)
        head = _script(model[4])
        _close(head(y, residual), model[4](y, residual))


def test_script_refuses_sync_batch_norm_by_name():
    block = FusedBasicBlock(8, 8, sync_bn=True)
    with pytest.raises(NotImplementedError, match="FusedSyncBatchNorm"):
        _script(block)
