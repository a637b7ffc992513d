"""Batches at the edges of what BatchNorm takes in training, as torch's layers take them:
an empty batch (an empty output, running statistics unchanged, num_batches_tracked counted,
zero parameter gradients), and the models' check that every BN gets more than one value per
channel, worked out from the model's own stem and blocks (a CIFAR-style 3x3 stride-1 stem
without its max-pool is checked as it is; a failing batch moves no state)."""

import copy

import pytest
import torch
import torchvision
from _backends import FUSED_BACKENDS, skip_without_triton
from torch import nn

import fused_resnet as fr

BACKENDS = [pytest.param("reference", id="reference")] + FUSED_BACKENDS


def _pairs(backend):
    """(ours, torch's twin with the same tensors, input channels)."""
    torch.manual_seed(0)
    conv = fr.nn.FusedConvBNAct(4, 8, 3, backend=backend)
    twin = nn.Sequential(nn.Conv2d(4, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    twin.load_state_dict(dict(zip(twin.state_dict(), conv.state_dict().values())))
    basic = fr.nn.FusedBasicBlock(4, 8, 2, backend=backend)
    bottleneck = fr.nn.FusedBottleneck(16, 4, backend=backend)
    tv_basic = torchvision.models.resnet.BasicBlock(
        4, 8, 2, downsample=nn.Sequential(nn.Conv2d(4, 8, 1, 2, bias=False), nn.BatchNorm2d(8)))
    tv_bottleneck = torchvision.models.resnet.Bottleneck(16, 4)
    tv_basic.load_state_dict(basic.state_dict())
    tv_bottleneck.load_state_dict(bottleneck.state_dict())
    model = fr.models.resnet18(num_classes=10, backend=backend)
    tv_model = torchvision.models.resnet18(num_classes=10)
    tv_model.load_state_dict(model.state_dict())
    return [(conv, twin, 4), (basic, tv_basic, 4), (bottleneck, tv_bottleneck, 16),
            (model, tv_model, 3)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_in_training_is_torchs(backend):
    if backend == "triton":
        skip_without_triton()
    for ours, theirs, channels in _pairs(backend):
        x = torch.randn(0, channels, 16, 16, requires_grad=True)
        out, expected = ours.train()(x), theirs.train()(x)
        assert out.shape == expected.shape and out.numel() == 0
        out.sum().backward()
        expected.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), name  # stats unchanged, the counters both at 1
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            assert torch.equal(p.grad, q.grad), name
        with torch.no_grad():
            assert ours.eval()(x).shape == expected.shape


def _cifar_stem_resnet18(backend):
    """A ResNet-18 with the usual CIFAR changes: conv1 3x3 stride 1, no max-pool."""
    model = fr.models.resnet18(num_classes=10, backend=backend)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_models_check_batches_against_their_own_stem(backend):
    """1x3x16x16 leaves the CIFAR-stem ResNet-18's last stage 2x2 (the stock stem: 1x1,
    refused); a stem of stride 4 and a 3x3 map is refused before any state moves."""
    if backend == "cpu":
        from fused_resnet.backend import unavailable_reason

        reason = unavailable_reason("cpu", torch.device("cpu"))
        if reason is not None:
            pytest.skip(reason)
    model, theirs = _cifar_stem_resnet18(backend), torchvision.models.resnet18(num_classes=10)
    theirs.conv1, theirs.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    theirs.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(model(x), theirs(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="more than 1 value per channel.*1x1 map"):
        fr.models.resnet18(num_classes=10, backend=backend)(x)
    strided = fr.models.resnet18(num_classes=10, backend=backend)
    strided.conv1 = nn.Conv2d(3, 64, 7, 4, 3, bias=False)  # with the pool: 64 -> 8 -> 1
    before = copy.deepcopy(strided.state_dict())
    with pytest.raises(ValueError, match="more than 1 value per channel.*1x1 map"):
        strided(torch.randn(1, 3, 64, 64))
    for key, value in strided.state_dict().items():
        assert torch.equal(value, before[key]), key
    strided.conv1.padding = (0, 0)  # a 5x5 image: a 0x0 map
    with pytest.raises(ValueError, match="too small for this model: a feature map would be 0x0"):
        strided(torch.randn(2, 3, 5, 5))


def test_converted_torchvision_models_check_the_batch_first():
    """A converted torchvision ResNet (and an IntermediateLayerGetter over one) refuses a
    batch whose last stage leaves one value per channel before any layer runs: torchvision's
    own forward would have moved the statistics of every BN before it."""
    from torchvision.models._utils import IntermediateLayerGetter

    model = fr.convert(torchvision.models.resnet18(num_classes=10), backend="reference")
    getter = fr.convert(IntermediateLayerGetter(torchvision.models.resnet18(),
                                                {"layer4": "out"}), backend="reference")
    for module in (model, getter):
        before = copy.deepcopy(module.state_dict())
        with pytest.raises(ValueError, match="more than 1 value per channel.*1x1 map"):
            module(torch.randn(1, 3, 32, 32))
        for key, value in module.state_dict().items():
            assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_models_run_on_the_meta_device(backend):
    """Shape inference on the meta device (no memory, no compute), as torchvision's models
    allow: our models and a converted torchvision one, training and eval."""
    with torch.device("meta"):
        models = [fr.models.resnet18(num_classes=10, backend=backend),
                  fr.models.resnet50(num_classes=10, backend=backend),
                  fr.convert(torchvision.models.resnet18(num_classes=10), backend=backend)]
    x = torch.empty(2, 3, 64, 64, device="meta")
    for model in models:
        for training in (True, False):
            out = model.train(training)(x)
            assert out.shape == (2, 10) and out.device.type == "meta"


@pytest.mark.parametrize("cut", [("layer4",), ("layer3", "layer4")], ids=["layer4", "layer3-4"])
def test_stages_cut_off_as_identity_train_as_torchvisions(cut):
    """A backbone truncated the usual way (a stage set to nn.Identity): the batch check
    skips it, and a training step matches torchvision's model cut alike (fp64)."""
    torch.manual_seed(0)
    ours = fr.models.resnet18(num_classes=10, backend="reference").double()
    theirs = torchvision.models.resnet18(num_classes=10).double()
    theirs.load_state_dict(ours.state_dict())
    width = {1: 256, 2: 128}[len(cut)]
    for model in (ours, theirs):
        for name in cut:
            setattr(model, name, nn.Identity())
        model.fc = nn.Linear(width, 10).double()
    theirs.fc.load_state_dict(ours.fc.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(ours.train()(x), theirs.train()(x), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ours(torch.randn(1, 3, 4, 4, dtype=torch.float64))  # the check still runs
