"""The reference ImageNet family against torchvision: state dicts, logits, gradients, counts."""

import pytest
import torch
import torchvision

from fused_resnet import models
from fused_resnet.testing import assert_close

ARCHS = list(models.IMAGENET_ARCHS)


def _pair(arch):
    ours = models.IMAGENET_ARCHS[arch](backend="reference")
    theirs = getattr(torchvision.models, arch)(weights=None)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_loads_both_ways_and_counts_match(arch):
    ours = models.IMAGENET_ARCHS[arch]()
    theirs = getattr(torchvision.models, arch)(weights=None)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters())


def test_resnet50_parameter_count():
    assert sum(p.numel() for p in models.resnet50().parameters()) == 25_557_032


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_gradients_match_torchvision(arch):
    ours, theirs = _pair(arch)
    x = torch.randn(2, 3, 64, 64)
    target = torch.tensor([1, 7])
    for model in (ours, theirs):
        model.train()
    out_ours, out_theirs = ours(x), theirs(x)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
    torch.nn.functional.cross_entropy(out_ours, target).backward()
    torch.nn.functional.cross_entropy(out_theirs, target).backward()
    grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-5, msg=name)
    buffers = dict(theirs.named_buffers())
    for name, b in ours.named_buffers():
        torch.testing.assert_close(b, buffers[name], rtol=1e-5, atol=1e-6, msg=name)
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_channels_last_input_gives_the_same_logits(arch):
    ours, theirs = _pair(arch)
    ours.eval()
    theirs.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = theirs(x)
        ours_cl = ours.to(memory_format=torch.channels_last)
        assert_close(ours_cl(x.contiguous(memory_format=torch.channels_last)), expected)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_zero_init_residual_matches_torchvision(arch):
    ours = models.IMAGENET_ARCHS[arch](zero_init_residual=True)
    last_bn = "bn2" if arch == "resnet18" else "bn3"
    for name, p in ours.named_parameters():
        if name.startswith("layer") and name.endswith(f"{last_bn}.weight"):
            assert torch.count_nonzero(p) == 0, name
        elif name.endswith("bn1.weight"):
            assert torch.all(p == 1), name


def test_num_classes_and_variant():
    model = models.resnet50(num_classes=10, variant="v1")
    assert model.fc.out_features == 10
    block = model.layer2[0]
    assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)
    block = models.resnet50().layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"variant": "v2"}, "variant"),
        ({"shortcut": "D"}, "shortcut"),
        ({"backend": "gpu"}, "backend"),
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": "10"}, "num_classes must be a positive int, got '10'"),
        ({"groups": 0}, "groups must be a positive int"),
        ({"width_per_group": -4}, "width_per_group must be a positive int"),
        ({"norm_layer": torch.nn.GroupNorm}, "norm_layer must be None"),
    ],
)
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_bad_constructor_arguments_are_named(arch, kwargs, message):
    with pytest.raises(ValueError, match=message):
        getattr(models, arch)(**kwargs)


def test_torchvisions_other_constructor_arguments():
    """A named model's fixed values may be repeated, not changed (torchvision's rule);
    norm_layer=FrozenBatchNorm2d builds torchvision's frozen model (same state dict, same
    logits); the deprecated pretrained=False is weights=None, with torchvision's warning."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    assert models.wide_resnet50_2(width_per_group=128).layer1[0].conv1.out_channels == 128
    with pytest.raises(ValueError, match="'groups' expected value 32 but got 8"):
        models.resnext50_32x4d(groups=8)
    torch.manual_seed(0)
    ours = models.resnet18(norm_layer=FrozenBatchNorm2d, backend="reference")
    theirs = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d)
    assert isinstance(ours.layer1[0].bn1, FrozenBatchNorm2d)
    theirs.load_state_dict(ours.state_dict())  # strict: the same keys
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours.train()(x), theirs.train()(x))
    with pytest.warns(UserWarning, match="pretrained= is deprecated"):
        assert models.resnet18(pretrained=False).fc.out_features == 1000
    with pytest.raises(ValueError, match="not both"):
        models.resnet18(weights="DEFAULT", pretrained=True)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_matches_torchvision_on_cuda(arch):
    ours, theirs = _pair(arch)
    ours, theirs = ours.cuda(), theirs.cuda()
    x = torch.randn(4, 3, 128, 128, device="cuda")
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)
