"""The paper's CIFAR nets, shortcut options A/B/C and the plain baselines."""

import pytest
import torch

from fused_resnet import models
from fused_resnet.flops import PAPER_CIFAR_PARAMS_M
from fused_resnet.nn import FusedBasicBlock, FusedBottleneck, ZeroPadShortcut
from fused_resnet.reference import zero_pad_shortcut


@pytest.mark.parametrize("depth", sorted(PAPER_CIFAR_PARAMS_M))
def test_cifar_parameter_counts_match_the_paper(depth):
    count = sum(p.numel() for p in models.cifar_resnet(depth).parameters())
    assert count / 1e6 == pytest.approx(PAPER_CIFAR_PARAMS_M[depth], rel=0.05)


def test_cifar_structure_and_output():
    model = models.cifar_resnet(20)
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3)] == [3, 3, 3]
    assert [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels,
            model.layer3[0].conv1.out_channels] == [16, 32, 64]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("depth", [0, 7, 21, "20"])
def test_cifar_depth_must_be_6n_plus_2(depth):
    with pytest.raises(ValueError, match="depth"):
        models.cifar_resnet(depth)


def test_option_a_pads_zero_channels_and_has_no_parameters():
    model = models.cifar_resnet(20, shortcut="A")
    shortcut = model.layer2[0].downsample
    assert isinstance(shortcut, ZeroPadShortcut)
    assert list(shortcut.parameters()) == []
    x = torch.randn(2, 16, 8, 8)
    out = shortcut(x)
    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out[:, :16], x[:, :, ::2, ::2], rtol=0, atol=0)
    assert torch.count_nonzero(out[:, 16:]) == 0
    # Only projection-free shortcuts: the whole A net has no 1x1 convs.
    assert all(m.kernel_size == (3, 3) for m in model.modules()
               if isinstance(m, torch.nn.Conv2d))


def test_zero_pad_shortcut_keeps_channels_last_and_rejects_fewer_channels():
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    assert zero_pad_shortcut(x, 32, 2).shape == (2, 32, 4, 4)
    with pytest.raises(ValueError, match="out_channels"):
        zero_pad_shortcut(x, 8, 1)


def test_options_b_and_c_place_projections():
    b = models.cifar_resnet(20, shortcut="B")
    c = models.cifar_resnet(20, shortcut="C")
    projections_b = [n for n, m in b.named_modules() if n.endswith("downsample")]
    projections_c = [n for n, m in c.named_modules() if n.endswith("downsample")]
    assert projections_b == ["layer2.0.downsample", "layer3.0.downsample"]
    assert len(projections_c) == 9
    for model in (b, c):
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    count = {k: sum(p.numel() for p in m.parameters()) for k, m in (("b", b), ("c", c))}
    assert count["c"] > count["b"] > sum(p.numel() for p in models.cifar_resnet(20).parameters())


def _silence_residual_branch(model):
    """Zero the last BN of every block, so a block outputs relu(shortcut) (or 0 if plain)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (FusedBasicBlock, FusedBottleneck)):
                last = m.bn3 if isinstance(m, FusedBottleneck) else m.bn2
                last.weight.zero_()
                last.bias.zero_()


@pytest.mark.parametrize("make", [lambda: models.plain_net(20),
                                  lambda: models.plain_net(18, dataset="imagenet"),
                                  lambda: models.plain_net(50, dataset="imagenet")])
def test_plain_nets_have_no_shortcut(make):
    model = make().eval()
    blocks = [m for m in model.modules() if isinstance(m, (FusedBasicBlock, FusedBottleneck))]
    assert blocks and all(b.downsample is None and b.shortcut is None for b in blocks)
    _silence_residual_branch(model)
    x = torch.randn(2, 3, 32, 32)
    features = []
    model.layer1.register_forward_hook(lambda mod, inp, out: features.append(out))
    with torch.no_grad():
        model(x)
    assert torch.count_nonzero(features[0]) == 0  # with a shortcut it would be relu(x) != 0


def test_residual_net_passes_the_shortcut_through():
    model = models.cifar_resnet(20).eval()
    _silence_residual_branch(model)
    features = []
    model.layer1.register_forward_hook(lambda mod, inp, out: features.append((inp[0], out)))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    inp, out = features[0]
    torch.testing.assert_close(out, torch.relu(inp))


def test_plain_net_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dataset"):
        models.plain_net(20, dataset="mnist")
    with pytest.raises(ValueError, match="shortcut"):
        models.plain_net(20, shortcut="A")
    with pytest.raises(ValueError, match="depth"):
        models.plain_net(20, dataset="imagenet")


def test_build_model_names():
    assert isinstance(models.build_model("cifar_resnet32"), models.CifarResNet)
    assert models.build_model("plain_cifar20").layer1[0].shortcut is None
    assert models.build_model("plain34").layer1[0].shortcut is None
    with pytest.raises(ValueError, match="arch"):
        models.build_model("vgg16")
