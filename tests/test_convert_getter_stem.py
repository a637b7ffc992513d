"""fr.convert on torchvision's IntermediateLayerGetter over a ResNet's children (the body of
DeepLabV3 / FCN and of the detection backbones): its stem conv1 -> bn1 -> relu -> maxpool
runs as one fused stem (`nn.torchvision_stem.GetterFusedStem`), the getter's outputs,
gradients and running statistics those of torchvision's getter (fp64); a getter that returns
what conv1, bn1 or relu computes keeps its own forward."""

import copy

import pytest
import torch
import torchvision
from _backends import FUSED_BACKENDS, skip_without_triton
from _calls import saved_dtypes
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

import fused_resnet as fr
from fused_resnet.nn import FusedBasicBlock, FusedMaxPool2d
from fused_resnet.nn.torchvision_stem import GetterFusedStem

RETURNS = {"maxpool": "pool", "layer1": "c2", "layer3": "c4"}


def _getter(return_layers=None, **kwargs):
    torch.manual_seed(0)
    net = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1],
                                           **kwargs)
    return IntermediateLayerGetter(net, return_layers or RETURNS).double()


def _run(getter, x):
    """The getter's outputs, and the gradients of a loss over all of them."""
    out = getter(x)
    sum(v.square().mean() for v in out.values()).backward()
    return out


@pytest.mark.parametrize("backend", [pytest.param("reference", id="reference")]
                         + FUSED_BACKENDS)
def test_getter_stem_is_fused_and_computes_what_torchvisions_does(backend):
    """Training (outputs, every parameter's gradient, running statistics and counts after
    two calls) and eval, fp64; the state dict's keys and tensors kept."""
    if backend == "triton":
        skip_without_triton()
    theirs = _getter()
    ours = copy.deepcopy(theirs)
    keys = {k: v.data_ptr() for k, v in ours.state_dict().items()}
    fr.convert(ours, backend=backend)
    assert type(ours) is GetterFusedStem and isinstance(ours, IntermediateLayerGetter)
    assert isinstance(ours.maxpool, FusedMaxPool2d) and ours.stem_backend == backend
    assert type(ours.layer1[0]) is FusedBasicBlock
    assert {k: v.data_ptr() for k, v in ours.state_dict().items()} == keys
    x = torch.randn(2, 3, 24, 24, dtype=torch.float64)
    for _ in range(2):
        out, expected = _run(ours, x), _run(theirs, x)
    assert list(out) == list(expected) == ["pool", "c2", "c4"]
    for key in expected:
        torch.testing.assert_close(out[key], expected[key], rtol=1e-9, atol=1e-9)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-8, msg=name)
    for (name, b), c in zip(ours.named_buffers(), theirs.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-12, atol=1e-12, msg=name)
    assert ours.bn1.num_batches_tracked.item() == 2
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        out, expected = ours(x), theirs(x)
    for key in expected:
        torch.testing.assert_close(out[key], expected[key], rtol=1e-9, atol=1e-9)


def test_getter_stem_on_triton_keeps_no_pool_indices():
    """Converted, on Triton, the getter's stem saves no int64 pool indices (ATen's pool
    saves one per output)."""
    skip_without_triton()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    assert torch.int64 in saved_dtypes(_getter(), x)
    assert torch.int64 not in saved_dtypes(fr.convert(_getter(), backend="triton"), x)


def test_getter_returning_a_stem_output_keeps_its_forward():
    """A getter that returns what relu (or conv1, bn1) computes is warned about and left
    as it is; one whose return_layers come to name one after convert runs module by module."""
    returns = {"relu": "act", "layer1": "c2"}
    getter = _getter(returns)
    with pytest.warns(RuntimeWarning, match="unfused: it returns the output of relu"):
        fr.convert(getter, backend="reference")
    assert type(getter) is IntermediateLayerGetter and type(getter.layer1[0]) is FusedBasicBlock
    converted, theirs = fr.convert(_getter(), backend="reference"), _getter()
    converted.return_layers = theirs.return_layers = returns
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    out, expected = converted(x), theirs(x)
    assert list(out) == ["act", "c2"]
    for key in expected:
        torch.testing.assert_close(out[key], expected[key], rtol=1e-12, atol=1e-12)


def test_detection_backbone_stem_with_frozen_bn_is_fused():
    """torchvision's FPN backbone: FrozenBatchNorm2d, the stem frozen (trainable_layers=3):
    the fused stem gives no conv1 gradient and the backbone's outputs and gradients."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    theirs = resnet_fpn_backbone(backbone_name="resnet18", weights=None,
                                 norm_layer=FrozenBatchNorm2d, trainable_layers=3).double()
    for m in theirs.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.bias.uniform_(-0.5, 0.5)
    ours = fr.convert(copy.deepcopy(theirs), backend="reference")
    assert type(ours.body) is GetterFusedStem
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out, expected = _run(ours, x), _run(theirs, x)
    for key in expected:
        torch.testing.assert_close(out[key], expected[key], rtol=1e-9, atol=1e-9)
    assert ours.body.conv1.weight.grad is None
    torch.testing.assert_close(ours.body.layer4[0].conv1.weight.grad,
                               theirs.body.layer4[0].conv1.weight.grad, rtol=1e-8, atol=1e-8)
