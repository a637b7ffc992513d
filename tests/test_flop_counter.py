"""torch.utils.flop_counter.FlopCounterMode over fused models and blocks counts what it
counts over the same model of torch's layers (`ops.flop_formulas`): forward and backward,
in training and in eval (with autograd on and under no_grad), on every backend, on the
first call and on a later one (where an eval block would run a plan, which a dispatch mode
turns off: `backend.ops_recorded`)."""

import copy
import itertools

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode, conv_backward_flop, conv_flop_count

import fused_resnet as fr
from fused_resnet.ops import flop_formulas
from tests._backends import DEVICE, FUSED_BACKENDS

MODES = ("train", "eval", "eval-no-grad")


def _flops(model, x, mode):
    """(total, per-op) FLOPs FlopCounterMode counts for one call of model(x) in `mode`
    (training: forward and backward)."""
    model.train(mode == "train")
    with FlopCounterMode(display=False) as counter:
        if mode == "train":
            model(x).sum().backward()
        elif mode == "eval":
            model(x)
        else:
            with torch.no_grad():
                model(x)
    per_op = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), per_op


def _assert_same_count(fused, reference, x, mode):
    """Counted alike, on the first call and, in eval, after a call outside the counter has
    made the inference plans that a later call would run (kernels a mode does not see; on
    Triton for a channels_last x only)."""
    x = x.contiguous(memory_format=torch.channels_last)
    want, want_ops = _flops(reference, x, mode)
    assert want > 0
    for call in range(1 if mode == "train" else 2):
        got, ops = _flops(fused, x, mode)
        assert got == want, (call, ops, want_ops)
        assert any(op.startswith("fused_resnet.") for op in ops), ops
        if mode != "train":
            with torch.no_grad():
                fused(x)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_cifar_net_counts_as_its_reference(backend, shortcut, mode):
    torch.manual_seed(0)
    reference = fr.models.cifar_resnet(8, shortcut=shortcut, backend="reference").to(DEVICE)
    fused = fr.models.cifar_resnet(8, shortcut=shortcut, backend=backend).to(DEVICE)
    fused.load_state_dict(reference.state_dict())
    _assert_same_count(fused, reference, torch.randn(2, 3, 8, 8, device=DEVICE), mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ["resnet18", "resnext50_32x4d"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_torchvision_resnet_counts_as_torchvision(backend, arch, mode):
    """Basic blocks, bottlenecks with projections and grouped 3x3 convs (whose weight
    gradient torch counts over all input channels), the stem and the pool; fused models
    and torchvision's converted in place alike. The Triton interpreter runs a ResNet-10
    (one basic block a stage) at 16x16, converted, for the stem op and every block kind."""
    if backend == "triton" and arch.startswith("resnext"):
        pytest.skip("the Triton kernels are ungrouped: backend 'triton' refuses a ResNeXt")
    torch.manual_seed(0)
    if backend == "triton" and DEVICE == "cpu":
        tv = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock,
                                              [1, 1, 1, 1], num_classes=10)
        x = torch.randn(2, 3, 16, 16)
        _assert_same_count(fr.convert(copy.deepcopy(tv), backend=backend), tv, x, mode)
        return
    tv = getattr(torchvision.models, arch)().to(DEVICE)
    fused = getattr(fr.models, arch)(backend=backend).to(DEVICE)
    fused.load_state_dict(tv.state_dict())
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    _assert_same_count(fused, tv, x, mode)
    _assert_same_count(fr.convert(copy.deepcopy(tv), backend=backend), tv, x, mode)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_a_block_whose_input_needs_no_gradient_counts_no_input_gradient(backend):
    """Torch skips the input gradient of the convs that read x (conv1, the projection)
    when x needs none; the fused block's backward skips it too (need_dx) and counts so."""
    torch.manual_seed(0)
    down = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1, stride=2, bias=False),
                               torch.nn.BatchNorm2d(16))
    block = torchvision.models.resnet.Bottleneck(8, 4, stride=2, downsample=down).to(DEVICE)
    fused = fr.convert(torch.nn.Sequential(copy.deepcopy(block)), backend=backend)
    assert isinstance(fused[0], fr.nn.FusedBottleneck)
    for needs_grad in (False, True):
        x = torch.randn(2, 8, 6, 6, device=DEVICE, requires_grad=needs_grad)
        assert _flops(fused, x, "train")[0] == _flops(block, x, "train")[0], needs_grad


@pytest.mark.parametrize(("x_shape", "w_shape", "stride", "padding", "dilation"), [
    ((2, 3, 11, 10), (8, 3, 7, 7), 2, 3, 1),
    ((1, 16, 9, 9), (32, 16, 3, 3), 1, 1, 1),
    ((2, 16, 9, 8), (32, 16, 3, 3), 1, 2, 2),
    ((2, 32, 7, 7), (32, 4, 3, 3), 2, 1, 1),  # 8 groups
    ((3, 64, 5, 6), (16, 64, 1, 1), 2, 0, 1),
])
def test_conv_formulas_are_torchs(x_shape, w_shape, stride, padding, dilation):
    forward, out = flop_formulas.conv_flops(x_shape, w_shape, stride, padding, dilation)
    conv = torch.nn.functional.conv2d(torch.empty(x_shape, device="meta"),
                                      torch.empty(w_shape, device="meta"), stride=stride,
                                      padding=padding, dilation=dilation,
                                      groups=x_shape[1] // w_shape[1])
    assert out == tuple(conv.shape)
    assert forward == conv_flop_count(list(x_shape), list(w_shape), list(out))
    groups = x_shape[1] // w_shape[1]
    for need_dx, need_dw in itertools.product((False, True), repeat=2):
        torch_count = conv_backward_flop(out, x_shape, w_shape, None, None, None, None, None,
                                         None, None, [need_dx, need_dw, False],
                                         out_val=[x_shape, w_shape, None])
        assert flop_formulas.backward_flops(forward, groups, need_dx, need_dw) == torch_count


def test_registration_is_once_and_names_the_ops():
    from torch.utils import flop_counter

    names = flop_formulas.register()  # again: the package's import registered them
    assert {"block_train", "block_train_backward", "conv_bn_train", "conv_bias_act",
            "stem_train", "stem_train_backward"} <= set(names)
    for name in names:
        assert getattr(torch.ops.fused_resnet, name) in flop_counter.flop_registry


def test_only_the_flop_counter_turns_the_eager_shortcuts_off():
    """FlopCounterMode gets the custom ops; another dispatch mode (an op logger, the traffic
    counter) still sees the ATen ops inside the eager path; torch.compile traces the ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fused_resnet.backend import ops_recorded

    class Passing(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    assert not ops_recorded()
    with Passing():
        assert not ops_recorded()
    with FlopCounterMode(display=False):
        assert ops_recorded()
        with Passing():  # anywhere on the stack
            assert ops_recorded()
    assert not ops_recorded()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_a_triton_resnet50_on_the_gpu_counts_as_torchvision(mode):
    """The compiled kernels' path (the GPU session runs only `gpu` tests): bottlenecks with
    projections, the fused stem, autotuned launches inside the counted custom ops."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet50().cuda()
    fused = fr.models.resnet50(backend="triton").cuda()
    fused.load_state_dict(tv.state_dict())
    _assert_same_count(fused, tv, torch.randn(2, 3, 64, 64, device="cuda"), mode)
