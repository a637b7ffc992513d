"""fr.convert and users' own blocks: a block with torchvision's attribute names is swapped
only where it computes what the fused block computes (children besides its convs, BNs and
downsample only nn.ReLU / nn.Identity, and a probe on copies agreeing in training and eval);
otherwise it is left as it is, warned, with its state and torch's random state untouched."""

import copy

import pytest
import torch
import torchvision

import fused_resnet as fr
from fused_resnet.nn import FusedBasicBlock, FusedSyncBatchNorm
from fused_resnet.testing import assert_close


class _Clone(torch.nn.Module):
    """A user's own basic block, written like torchvision's (its own class and forward)."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(channels)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(channels)
        self.downsample = None

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


class _PreActivation(_Clone):
    def forward(self, x):  # bn -> relu -> conv: the same modules, another network
        out = self.conv1(torch.relu(self.bn1(x)))
        return self.conv2(torch.relu(self.bn2(out))) + x


class _SqueezeExcite(torchvision.models.resnet.BasicBlock):
    def __init__(self, channels):
        super().__init__(channels, channels)
        self.gate = torch.nn.Linear(channels, channels)

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out = out * torch.sigmoid(self.gate(out.mean((2, 3))))[:, :, None, None]
        return self.relu(out + x)


class _StandardizedConv(torch.nn.Conv2d):
    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, None)


class _TakesAMask(_Clone):
    def forward(self, x, mask):  # not a block's call: the probe's own call fails
        return super().forward(x) * mask


def _silu_block(channels):
    block = torchvision.models.resnet.BasicBlock(channels, channels)
    block.relu = torch.nn.SiLU()  # torchvision's forward, another activation
    return block


def _standardized_block(channels):
    block = torchvision.models.resnet.BasicBlock(channels, channels)
    block.conv1 = _StandardizedConv(channels, channels, 3, padding=1, bias=False)
    return block


class _RandomDrop(torch.nn.Module):
    """Zeroes a whole map with probability 1/100 in training (DropBlock-like): a probe's
    single call almost always sees the identity."""

    def forward(self, x):
        keep = torch.rand(()) >= 0.01 if self.training else True
        return x if keep else torch.zeros_like(x)


class _UnitScale(torch.nn.Module):
    """A per-channel scale with a parameter, initialised to 1 (layer scale, a gate)."""

    def __init__(self, channels):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x):
        return x * self.scale


class _ClippedBlock(torchvision.models.resnet.BasicBlock):
    """timm's layout: named children act1 / drop_block / se / act2 around torchvision's
    convs and BNs, the forward torchvision's with them in place."""

    def __init__(self, channels, act=torch.nn.ReLU, drop=torch.nn.Identity,
                 se=torch.nn.Identity):
        super().__init__(channels, channels)
        del self.relu
        self.act1, self.drop_block, self.se, self.act2 = act(), drop(), se(), act()

    def forward(self, x):
        out = self.drop_block(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(self.act1(out))))
        return self.act2(out + x)


def _block_with(**parts):
    return lambda channels: _ClippedBlock(channels, **{k: (lambda p=p: p(channels))
                                                       if p is _UnitScale else p
                                                       for k, p in parts.items()})


@pytest.mark.parametrize("make", [_PreActivation, _SqueezeExcite, _silu_block,
                                  _standardized_block, _TakesAMask,
                                  _block_with(act=torch.nn.ReLU6),
                                  _block_with(drop=_RandomDrop), _block_with(se=_UnitScale)],
                         ids=["pre-activation", "squeeze-excite", "silu", "standardized-conv",
                              "takes-a-mask", "relu6", "random-drop", "unit-scale-parameter"])
def test_convert_leaves_blocks_that_compute_otherwise(make):
    """Blocks with torchvision's attribute names whose forward (or modules) compute something
    else than the fused block are found (a child other than ReLU / Identity; else the probe)
    and left, warned: ReLU6, a random drop and a unit scale all look like the identity to a
    probe's small random batch. Nothing of them changes, nor torch's random state."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(make(8))
    model[0].bn1.running_mean.normal_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with pytest.warns(RuntimeWarning, match="left 0 unfused"):
        fr.convert(model, backend="reference")
    assert torch.equal(torch.get_rng_state(), rng)
    assert type(model[0]) is not FusedBasicBlock and model[0].training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_convert_swaps_timm_style_blocks_of_relus_and_identities():
    """The same layout with nn.ReLU / nn.Identity children (timm's plain blocks) is fused,
    and the fused block answers timm's `zero_init_last`."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(_block_with()(8))
    reference = copy.deepcopy(model)
    fr.convert(model, backend="reference")
    assert type(model[0]) is FusedBasicBlock
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(model(x), reference(x))
    model[0].zero_init_last()
    assert not model[0].bn2.weight.any()


@pytest.mark.parametrize("sync", [False, True], ids=["bn", "sync-bn"])
def test_convert_swaps_a_users_block_that_computes_the_same(sync):
    """(With SyncBatchNorm modules the probe runs its copy's as BatchNorm2d: one process.)"""
    torch.manual_seed(0)
    model, eager = torch.nn.Sequential(_Clone(8)), torch.nn.Sequential(_Clone(8))
    eager.load_state_dict(model.state_dict())
    if sync:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    fr.convert(model, backend="reference")
    assert type(model[0]) is FusedBasicBlock
    assert type(model[0].bn1) is (FusedSyncBatchNorm if sync else torch.nn.BatchNorm2d)
    x = torch.randn(2, 8, 6, 6)
    assert_close(model(x), eager(x))
    assert_close(model.state_dict()["0.bn1.running_mean"], eager.state_dict()["0.bn1.running_mean"])
