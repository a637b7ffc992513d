"""Fused modules whose inner modules must be called as themselves: hooks on a conv / BN / the
pool (pruning's and weight_norm's forward pre-hooks compute the weight; forward hooks read
outputs), a norm layer other than BatchNorm2d put in a BN's place, a conv class with its own
forward. The block, FusedConvBNAct and the stem then run torch's modules (warned) and give
torchvision's results; a block of plain modules stays fused, unwarned. In fp64: differences
are bugs, not rounding."""

import warnings

import pytest
import torch
import torchvision
from _backends import DEVICE, FUSED_BACKENDS
from torch import nn
from torch.nn.utils import prune

import fused_resnet as fr
from fused_resnet.nn import FusedBasicBlock, FusedBottleneck, FusedConvBNAct

BACKENDS = [*FUSED_BACKENDS, "reference"]
UNFUSED = "runs unfused"
# Whole models on the `_C` and reference backends (the check of the modules precedes the
# choice of kernels; a ResNet-18 training step takes minutes in the Triton interpreter).
MODEL_BACKENDS = FUSED_BACKENDS[1:] + ["reference"]


def _twins(fused_class, tv_class, backend, *args):
    """A fused block on `backend` and torchvision's with the same fp64 state, both training."""
    torch.manual_seed(0)
    fused = fused_class(*args, backend=backend).double().to(DEVICE)
    with torch.no_grad():
        for m in fused.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    downsample = None
    if fused.downsample is not None:
        conv = fused.downsample[0]
        downsample = nn.Sequential(nn.Conv2d(conv.in_channels, conv.out_channels, 1,
                                             conv.stride, bias=False),
                                   nn.BatchNorm2d(conv.out_channels))
    tv = tv_class(*args, downsample=downsample).double().to(DEVICE)
    tv.load_state_dict(fused.state_dict())
    return fused, tv


def _x(channels, size=6):
    return torch.randn(2, channels, size, size, dtype=torch.float64, device=DEVICE)


def _assert_same(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pruned_conv_trains_as_torchvisions(backend):
    fused, tv = _twins(FusedBasicBlock, torchvision.models.resnet.BasicBlock, backend, 8, 8)
    for block in (fused, tv):
        prune.l1_unstructured(block.conv1, "weight", amount=0.5)
    x = _x(8)
    for block in (fused, tv):
        opt = torch.optim.SGD(block.parameters(), lr=0.1, momentum=0.9)
        for _ in range(2):  # the second step used to fail: the mask's graph backed twice
            opt.zero_grad()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                block(x).square().mean().backward()
            opt.step()
    _assert_same(fused.conv1.weight_orig, tv.conv1.weight_orig)
    _assert_same(fused.bn1.running_var, tv.bn1.running_var)
    fused.eval(), tv.eval()
    with torch.no_grad():  # a weight changed behind the pruning hook, in eval (folds)
        fused.conv1.weight_orig.neg_(), tv.conv1.weight_orig.neg_()
        with pytest.warns(UserWarning, match="hooks on its Conv2d"):
            out = fused(x)
        _assert_same(out, tv(x))


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_hooks_on_inner_modules_fire(backend):
    model = fr.models.resnet18(num_classes=4, backend=backend).double().to(DEVICE)
    seen = []
    for name in ("conv1", "bn1", "maxpool", "layer1.0.bn2", "layer2.0.downsample.0"):
        model.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: seen.append(name))
    layer = FusedConvBNAct(3, 4, 3, backend=backend).double().to(DEVICE)
    layer.conv.register_forward_pre_hook(lambda m, i: seen.append("conv pre"))
    with pytest.warns(UserWarning, match=UNFUSED):
        model(_x(3, 16)).sum().backward()
        layer.eval()(_x(3))
    assert sorted(seen) == sorted(["conv1", "bn1", "maxpool", "layer1.0.bn2",
                                   "layer2.0.downsample.0", "conv pre"])


NORMS = {
    "InstanceNorm2d": lambda c: nn.InstanceNorm2d(c, affine=True, track_running_stats=True),
    "GroupNorm": lambda c: nn.GroupNorm(2, c),
    "Identity": lambda c: nn.Identity(),
    "SyncBatchNorm": lambda c: nn.SyncBatchNorm(c),  # one process: BatchNorm2d's results
}


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_other_norm_layers_run_as_torch(backend, norm):
    fused, tv = _twins(FusedBottleneck, torchvision.models.resnet.Bottleneck, backend, 8, 4, 2)
    for block in (fused, tv):
        block.bn2 = NORMS[norm](4).double().to(DEVICE)
    layer = FusedConvBNAct(8, 4, 3, backend=backend).double().to(DEVICE)
    layer.bn = NORMS[norm](4).double().to(DEVICE)
    x = _x(8).requires_grad_()
    with pytest.warns(UserWarning, match=f"{norm} in a BatchNorm2d's place"):
        out = fused(x)
        layer_out = layer(x)
    _assert_same(out, tv(x))
    _assert_same(layer_out, torch.relu(layer.bn(layer.conv(x))))
    (grad,) = torch.autograd.grad(out.sum(), x)
    (tv_grad,) = torch.autograd.grad(tv(x).sum(), x)
    _assert_same(grad, tv_grad)


class _StandardizedConv(nn.Conv2d):
    """Weight standardisation: each filter to zero mean, unit variance (a forward of its own)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / w.std((1, 2, 3), keepdim=True)
        return self._conv_forward(x, w, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_with_its_own_forward_runs_as_torch(backend):
    fused, tv = _twins(FusedBasicBlock, torchvision.models.resnet.BasicBlock, backend, 8, 8)
    for block in (fused, tv):
        conv = _StandardizedConv(8, 8, 3, padding=1, bias=False).double().to(DEVICE)
        conv.weight.data.copy_(fused.conv2.weight)
        block.conv2 = conv
    x = _x(8)
    with pytest.warns(UserWarning, match="_StandardizedConv in a Conv2d's place"):
        out = fused(x)
    _assert_same(out, tv(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_modules_stay_fused_and_unwarned(backend, monkeypatch):
    models = [] if backend == "triton" else [  # (as MODEL_BACKENDS)
        fr.models.resnet18(num_classes=4, backend=backend).double().to(DEVICE)]
    layer = FusedConvBNAct(3, 4, 3, backend=backend).double().to(DEVICE)
    block = FusedBottleneck(8, 4, backend=backend).double().to(DEVICE)
    block.register_forward_hook(lambda m, i, o: None)  # on the block itself: still fused

    def called(module, *args):
        raise AssertionError(f"{type(module).__name__}.forward called")

    for cls in (nn.Conv2d, nn.BatchNorm2d, nn.ReLU):  # (the eval stem calls its pool module)
        monkeypatch.setattr(cls, "forward", called)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for training in (True, False):
            for model in models:
                model.train(training)(_x(3, 16)).sum().backward()
            layer.train(training)(_x(3))
            block.train(training)(_x(8).requires_grad_()).sum().backward()


def _bias(conv):
    conv.bias = nn.Parameter(torch.linspace(-1, 1, conv.out_channels, dtype=conv.weight.dtype,
                                            device=conv.weight.device))


# Conv settings the fused ops cannot take, set after construction; each keeps a 3x3 stride-1
# conv's output shape (so a block's identity add still fits).
CONV_EDITS = {
    "bias": (_bias, "bias=False"),
    "reflect padding": (lambda c: setattr(c, "padding_mode", "reflect"), "padding_mode"),
    "padding 'same'": (lambda c: setattr(c, "padding", "same"), "square stride, padding"),
    "dilation (1, 2)": (lambda c: (setattr(c, "dilation", (1, 2)), setattr(c, "padding", (1, 2))),
                        "square stride, padding and dilation"),
}


@pytest.mark.parametrize("edit", list(CONV_EDITS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_settings_fused_ops_cannot_take_run_as_torch(backend, edit):
    """A block's conv given a bias, another padding mode or unequal geometry after
    construction: the block calls its modules (warned), in training and in eval (whose
    folded path read none of these before), with torchvision's results and running stats."""
    change, message = CONV_EDITS[edit]
    fused, tv = _twins(FusedBottleneck, torchvision.models.resnet.Bottleneck, backend, 16, 4)
    for block in (fused, tv):
        change(block.conv2)
    tv.conv2.load_state_dict(fused.conv2.state_dict())
    x = _x(16)
    for training in (True, False):
        fused.train(training), tv.train(training)
        with pytest.warns(UserWarning, match=f"its conv is not one fused ops take.*{message}"):
            out = fused(x)
        _assert_same(out, tv(x))
        _assert_same(fused.bn2.running_var, tv.bn2.running_var)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unequal_stride_and_padding_of_a_conv_bn_act_run_as_torch(backend):
    torch.manual_seed(0)
    layer = FusedConvBNAct(4, 8, 3, backend=backend).double().to(DEVICE)
    layer.conv.stride, layer.conv.padding = (1, 2), (1, 0)
    x = _x(4)
    for training in (True, False):
        layer.train(training)
        want = torch.relu(layer.bn(layer.conv(x)))  # (a training call moves the stats once)
        if training:
            layer.bn.running_mean.zero_(), layer.bn.running_var.fill_(1)
            layer.bn.num_batches_tracked.zero_()
        with pytest.warns(UserWarning, match="square stride, padding and dilation"):
            out = layer(x)
        assert out.shape == (2, 8, 6, 2)
        _assert_same(out, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_projection_conv_of_other_geometry_runs_as_torch(backend):
    """A projection shortcut's conv replaced by a 3x3, padding-1 one (valid in torch; the block
    ops run a 1x1 of the block's stride without padding): the block calls its modules."""
    fused, tv = _twins(FusedBasicBlock, torchvision.models.resnet.BasicBlock, backend, 8, 16, 2)
    torch.manual_seed(5)
    conv = nn.Conv2d(8, 16, 3, 2, 1, bias=False).double().to(DEVICE)
    fused.downsample[0] = conv
    tv.downsample[0] = nn.Conv2d(8, 16, 3, 2, 1, bias=False).double().to(DEVICE)
    tv.downsample[0].load_state_dict(conv.state_dict())
    x = _x(8)
    for training in (True, False):
        fused.train(training), tv.train(training)
        with pytest.warns(UserWarning, match="projection conv is not 1x1 with stride 2"):
            out = fused(x)
        _assert_same(out, tv(x))
