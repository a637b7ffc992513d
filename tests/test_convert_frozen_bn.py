"""fr.convert on blocks whose BNs are torchvision's FrozenBatchNorm2d (its detection
backbones): swapped, their BNs answering as eval-mode BNs in training too, computing what
torchvision's blocks compute (fp64: exact up to rounding), state dicts unchanged."""

import copy
import io

import pytest
import torch
import torchvision
from _backends import DEVICE
from torchvision.ops.misc import FrozenBatchNorm2d

import fused_resnet as fr
from fused_resnet.backend import unavailable_reason
from fused_resnet.nn import FusedBasicBlock, FusedBottleneck
from fused_resnet.nn.frozen_bn import FusedFrozenBatchNorm2d
from fused_resnet.nn.torchvision_stem import TorchvisionResNetFusedStem

CPU_FUSED = "cpu" if unavailable_reason("cpu", torch.device("cpu")) is None else "reference"
TRITON = unavailable_reason("triton", torch.device(DEVICE))


def _randomise_frozen(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.uniform_(0.5, 1.5, generator=g)
            m.bias.uniform_(-0.5, 0.5, generator=g)
            m.running_mean.uniform_(-0.5, 0.5, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
    return model


def _frozen_resnet10(block):
    torch.manual_seed(0)
    net = torchvision.models.resnet.ResNet(block, [1, 1, 1, 1], norm_layer=FrozenBatchNorm2d)
    return _randomise_frozen(net).double()


def _grads_close(model, reference):
    theirs = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        q = theirs[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("backend,block", [
    pytest.param("reference", "bottleneck", id="reference-bottleneck"),
    pytest.param(CPU_FUSED, "bottleneck", id=f"{CPU_FUSED}-bottleneck"),
    pytest.param("triton", "basic", id="triton-basic",  # basic: the interpreter is slow
                 marks=pytest.mark.skipif(TRITON is not None, reason=TRITON or "")),
])
def test_frozen_bn_resnet_converts_and_computes_the_same(backend, block):
    cls = torchvision.models.resnet.Bottleneck if block == "bottleneck" else \
        torchvision.models.resnet.BasicBlock
    model, reference = _frozen_resnet10(cls), _frozen_resnet10(cls)
    keys = list(model.state_dict())
    fr.convert(model, backend=backend)
    fused = FusedBottleneck if block == "bottleneck" else FusedBasicBlock
    assert type(model) is TorchvisionResNetFusedStem and type(model.layer2[0]) is fused
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert frozen and all(type(m) is FusedFrozenBatchNorm2d for m in frozen)
    assert list(model.state_dict()) == keys
    model.train()
    reference.train()
    assert not any(m.training for m in frozen)  # frozen: running statistics in training too
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, expected = model(x), reference(x_ref)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-9)
    _grads_close(model, reference)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name  # nothing frozen moved
    model.eval()
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-10, atol=1e-10)


def test_frozen_bn_state_dicts_and_pickling():
    """FrozenBatchNorm2d's loading rule kept (a BatchNorm2d state dict with
    num_batches_tracked loads), the converted model through torch.save / torch.load."""
    model = fr.convert(_frozen_resnet10(torchvision.models.resnet.BasicBlock), "reference")
    plain = torchvision.models.resnet18(num_classes=1000).double()  # BatchNorm2d keys
    small = {k: v for k, v in plain.state_dict().items() if not k.startswith(("layer", "fc"))}
    assert any(k.endswith("num_batches_tracked") for k in small)
    model.load_state_dict(small, strict=False)
    assert torch.equal(model.bn1.running_var, plain.bn1.running_var)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.layer1[0].bn1) is FusedFrozenBatchNorm2d
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), copy.deepcopy(model)(x))


def test_detection_backbone_blocks_convert():
    """torchvision's FPN backbone (its detection models' `backbone`): the ResNet inside an
    IntermediateLayerGetter, FrozenBatchNorm2d everywhere, stem and layer1 frozen."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None,
                                   norm_layer=FrozenBatchNorm2d, trainable_layers=3)
    backbone = _randomise_frozen(backbone).double()
    reference = copy.deepcopy(backbone)
    fr.convert(backbone, backend=CPU_FUSED)
    body = backbone.body
    assert all(type(getattr(body, f"layer{i}")[0]) is FusedBasicBlock for i in range(1, 5))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    out, expected = backbone(x), reference(x)
    for key in expected:
        torch.testing.assert_close(out[key], expected[key], rtol=1e-10, atol=1e-10)
    sum(v.square().sum() for v in out.values()).backward()
    sum(v.square().sum() for v in expected.values()).backward()
    _grads_close(backbone, reference)
    assert body.layer1[0].conv1.weight.grad is None  # layer1 stays frozen


def _freeze_every_bn(module):
    """A detectron-style helper: every BatchNorm2d replaced by a FrozenBatchNorm2d holding
    its (randomised) statistics, by hand, not through fr.convert."""
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features).to(child.weight.dtype)
            setattr(module, name, frozen)
        else:
            _freeze_every_bn(child)
    return _randomise_frozen(module)


@pytest.mark.parametrize("backend", ["reference", CPU_FUSED])
def test_frozen_bns_put_into_our_model_by_hand_run_frozen(backend):
    """fr.models.resnet18 (the stem, basic blocks, projections) with torchvision's
    FrozenBatchNorm2d swapped in by hand computes what torchvision's resnet18 with the same
    frozen BNs does, in training and eval; nothing moves."""
    torch.manual_seed(0)
    model = _freeze_every_bn(fr.models.resnet18(num_classes=10, backend=backend).double())
    reference = torchvision.models.resnet18(num_classes=10).double()
    reference = _freeze_every_bn(reference)
    reference.load_state_dict(model.state_dict())
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out, expected = model.train()(x), reference.train()(x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    out.square().sum().backward()
    expected.square().sum().backward()
    _grads_close(model, reference)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference.eval()(x), rtol=1e-10,
                                   atol=1e-10)
