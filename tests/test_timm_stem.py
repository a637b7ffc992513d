"""`fr.convert` on timm's ResNets swaps every block and fuses the stem too
(`nn/timm_stem.py`): conv1 -> bn1 -> act1 -> maxpool as one op, and ResNet-D's deep stem
(resnet*d: conv1 a Sequential of three convs) with its first two conv -> BN -> ReLU fused
each. Against a copy of the timm model in fp64: logits, the input's and every parameter's
gradient, the running stats, in training and eval; the same object and state-dict keys.
Stems fused ops cannot stand for are left, warned; hooks or another activation set later
make a call run timm's own forward_features."""

import copy
import pickle
import warnings

import pytest
import torch
from _backends import DEVICE, FUSED_BACKENDS, NATIVE, backend_param
from torch import nn

import fused_resnet as fr

timm = pytest.importorskip("timm")
from timm.models.resnet import BasicBlock, Bottleneck, ResNet  # noqa: E402

from fused_resnet.nn.timm_stem import TimmResNetFusedStem  # noqa: E402


def _random_bns(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.double().to(DEVICE)


def _tiny(deep: bool, block=BasicBlock) -> nn.Module:
    """A timm ResNet small enough for Triton's interpreter (8-channel stages)."""
    torch.manual_seed(0)
    return _random_bns(ResNet(block, [1, 1, 1, 1], channels=(8, 8, 8, 8), stem_width=8,
                              stem_type="deep" if deep else "", num_classes=3))


def _named(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return _random_bns(timm.create_model(arch, num_classes=5))


def _converted(model: nn.Module, backend: str):
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="convert: left")  # nothing left unfused
        fr.convert(model, backend=backend)
    return model, reference


def _close(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    """fp64: within 1e-9 of the tensor's largest value (a random deep net amplifies
    rounding; the fused and timm orders of summation differ)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9 * scale, msg=name)


def _assert_same(model: nn.Module, reference: nn.Module, size: int,
                 modes: tuple[bool, ...] = (True, False)) -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 3, size, size, dtype=torch.float64, device=DEVICE)
    for training in modes:
        model.train(training), reference.train(training)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, expected = model(xa), reference(xb)
        out.square().sum().backward()
        expected.square().sum().backward()
        _close(out, expected, "output")
        _close(xa.grad, xb.grad, "x.grad")
        theirs = dict(reference.named_parameters())
        for name, p in model.named_parameters():
            _close(p.grad, theirs[name].grad, name)
        theirs = dict(reference.named_buffers())
        for name, b in model.named_buffers():
            torch.testing.assert_close(b, theirs[name], msg=name)
        model.zero_grad(), reference.zero_grad()


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet50d", "resnet26d"])
@pytest.mark.parametrize("backend", [backend_param(NATIVE), "reference"])
def test_named_timm_resnets_run_a_fused_stem(arch, backend):
    model, reference = _converted(_named(arch), backend)
    assert type(model) is TimmResNetFusedStem and type(model.maxpool) is fr.nn.FusedMaxPool2d
    blocks = [b for stage in (model.layer1, model.layer2, model.layer3, model.layer4)
              for b in stage]
    assert all(type(b) in (fr.nn.FusedBasicBlock, fr.nn.FusedBottleneck) for b in blocks)
    assert list(model.state_dict()) == list(reference.state_dict())
    _assert_same(model, reference, 37)  # odd sizes: the pools' floor mode matters


@pytest.mark.parametrize("deep", [False, True], ids=["plain", "deep"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_tiny_timm_resnet_on_each_backend(backend, deep):
    model, reference = _converted(_tiny(deep), backend)
    assert type(model) is TimmResNetFusedStem
    _assert_same(model, reference, 16)


@pytest.mark.parametrize("backend", [backend_param(NATIVE)])
def test_grad_checkpointing_and_back_to_reference(backend):
    """timm's checkpoint_seq over the stages: the gradients of the model without it, and
    the running stats of one update (the fused ops do not update them again when the
    checkpoint recomputes; timm's own blocks, and the reference backend's, would: README).
    Converted again to "reference", the stem follows."""
    model, reference = _converted(_tiny(True, Bottleneck), backend)
    model.set_grad_checkpointing(True)
    _assert_same(model, reference, 16)
    fr.convert(model, backend="reference")
    assert type(model) is TimmResNetFusedStem
    assert model.stem_backend == model.maxpool.backend == "reference"
    _assert_same(model, reference, 16, modes=(False,))


def test_pickled_converted_model_runs():
    model, reference = _converted(_tiny(True), "reference")
    loaded = pickle.loads(pickle.dumps(model))
    assert type(loaded) is TimmResNetFusedStem
    _assert_same(loaded, reference, 16)


@pytest.mark.parametrize("change, message", [
    (lambda m: setattr(m, "act1", nn.SiLU()), "act1 is SiLU"),
    (lambda m: setattr(m, "maxpool", nn.MaxPool2d(3, 2, 1, ceil_mode=True)), "floor mode"),
    (lambda m: m.conv1.register_forward_hook(lambda *a: None), "hooks on conv1"),
    (lambda m: setattr(m.conv1, "5", nn.GELU()), "GELU"),
    (lambda m: m.conv1[2].register_forward_hook(lambda *a: None), "hooks on conv1.2"),
], ids=["silu", "ceil-pool", "hooked-sequential", "gelu-inside", "hooked-relu"])
def test_stems_fused_ops_cannot_stand_for_are_left_warned(change, message):
    model = _tiny(True)
    change(model)
    reference = copy.deepcopy(model)
    with pytest.warns(RuntimeWarning, match=f"left the stem of timm's ResNet unfused: .*{message}"):
        fr.convert(model, backend="reference")
    assert type(model) is ResNet
    _assert_same(model, reference, 16)


def test_hooks_or_activation_set_after_conversion_run_timms_forward():
    model, reference = _converted(_tiny(True), "reference")
    seen = []
    model.conv1[2].register_forward_hook(lambda *args: seen.append(1))
    reference.conv1[2].register_forward_hook(lambda *args: None)
    _assert_same(model, reference, 16)
    assert len(seen) == 2  # the training and the eval forward
    model.conv1[5] = nn.GELU()
    reference.conv1[5] = nn.GELU()
    _assert_same(model, reference, 16)
    model.conv1[5], reference.conv1[5] = nn.ReLU(), nn.ReLU()
    for m in (model, reference):
        m.conv1[2]._forward_hooks.clear()
        m.conv1.append(nn.Hardtanh(-0.1, 0.1))  # a module added: timm's forward again
    _assert_same(model, reference, 16)


def test_unknown_forward_features_leaves_the_stem(monkeypatch):
    import fused_resnet.nn.timm_stem as timm_stem

    monkeypatch.setattr(timm_stem, "TIMM_FEATURE_NAMES",
                        timm_stem.TIMM_FEATURE_NAMES - {"layer4"})
    model = _tiny(False)
    with pytest.warns(RuntimeWarning, match="forward_features reads what fused_resnet does "
                                            r"not know \(layer4\)"):
        fr.convert(model, backend="reference")
    assert type(model) is ResNet


def test_sync_batch_norms_of_a_deep_stem_are_kept_synchronized():
    model = nn.SyncBatchNorm.convert_sync_batchnorm(_tiny(True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fr.convert(model, backend="reference")
    for bn in (model.conv1[1], model.conv1[4], model.bn1):
        assert type(bn) is fr.nn.FusedSyncBatchNorm


def test_fx_graph_of_a_deep_stem_has_timms_node_names():
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    model, reference = _converted(_tiny(True), "reference")
    model.eval(), reference.eval()
    stem = ("conv1", "bn1", "act1")
    names = [n for n in get_graph_node_names(model)[1] if n.startswith(stem)]
    assert names == [n for n in get_graph_node_names(reference)[1] if n.startswith(stem)]
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, device=DEVICE)
    got = create_feature_extractor(model, ["conv1.2", "conv1.5", "act1"])(x)
    expected = create_feature_extractor(reference, ["conv1.2", "conv1.5", "act1"])(x)
    for name in expected:
        _close(got[name], expected[name], name)


@pytest.mark.parametrize("where", ["conv1.0", "conv1.6", "plain conv1"])
def test_a_stem_conv_swapped_in_with_a_bias_runs_as_timm(where):
    """nn.Conv2d's default bias=True (a grayscale input's new stem conv): the stem runs as
    timm's, warned, rather than raising."""
    model, reference = _converted(_tiny(where != "plain conv1"), "reference")
    for m in (model, reference):
        torch.manual_seed(3)
        old = m.conv1 if where == "plain conv1" else m.conv1[int(where[-1])]
        new = nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride,
                        old.padding).double().to(DEVICE)
        if where == "plain conv1":
            m.conv1 = new
        else:
            m.conv1[int(where[-1])] = new
    with pytest.warns(UserWarning, match="the stem runs unfused.*bias=False"):
        _assert_same(model, reference, 16)
