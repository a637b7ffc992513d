"""fr.convert and the user's hooks and attributes: a swapped block takes the hooks of the
block it replaces (the very dicts: their handles still remove them) and the attributes a
user set on it; a block or stem whose inner modules carry forward / backward hooks is left as
it is, warned (fused, those modules' forward would not be called and the hooks would not
fire)."""

import pytest
import torch
import torchvision

import fused_resnet as fr
from fused_resnet.nn import FusedBasicBlock
from fused_resnet.nn.torchvision_stem import TorchvisionResNetFusedStem


def _resnet10():
    return torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])


def test_block_hooks_and_attributes_move_to_the_fused_block():
    model = _resnet10()
    seen = []
    forward = model.layer1[0].register_forward_hook(lambda m, i, o: seen.append("fwd"))
    model.layer2[0].register_forward_pre_hook(lambda m, i: seen.append("pre"))
    model.layer3[0].register_full_backward_hook(lambda m, gi, go: seen.append("bwd"))
    model.layer1[0].tag = "mine"
    fr.convert(model, backend="reference")
    assert all(type(getattr(model, f"layer{i}")[0]) is FusedBasicBlock for i in (1, 2, 3))
    assert model.layer1[0].tag == "mine"
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert sorted(seen) == ["bwd", "fwd", "pre"]
    forward.remove()  # the handle still reaches the hook
    seen.clear()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert seen == ["pre"]


def test_hooks_inside_a_block_or_the_stem_leave_it_unfused():
    model = _resnet10()
    seen = []
    model.layer2[0].bn1.register_forward_hook(lambda m, i, o: seen.append("bn1"))
    model.conv1.register_forward_hook(lambda m, i, o: seen.append("conv1"))
    with pytest.warns(RuntimeWarning) as record:
        fr.convert(model, backend="reference")
    messages = [str(w.message) for w in record]
    assert any("left layer2.0 unfused: hooks on bn1" in m for m in messages)
    assert any("left the stem of ResNet unfused: hooks on conv1" in m for m in messages)
    assert type(model.layer2[0]) is torchvision.models.resnet.BasicBlock
    assert type(model.layer1[0]) is FusedBasicBlock
    assert type(model) is torchvision.models.ResNet  # the stem as it was
    model(torch.randn(2, 3, 32, 32))
    assert sorted(seen) == ["bn1", "conv1"]
    plain = fr.convert(_resnet10(), backend="reference")
    assert type(plain) is TorchvisionResNetFusedStem
