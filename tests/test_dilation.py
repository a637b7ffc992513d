"""Dilated convolutions, as torchvision's `replace_stride_with_dilation` makes them (the
segmentation backbones: DeepLabV3, FCN): the Triton kernels (forward with the BN + ReLU
prologue, data gradient by stride phase, weight gradient) against torch in fp64, the
functional op on every backend, the ResNet family's argument against torchvision's, and
`fr.convert` of dilated torchvision models. The blocks themselves run in
test_fused_blocks.py and test_block_op.py ("bottleneck dilated ...")."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from _backends import DEVICE, FUSED_BACKENDS, NATIVE, skip_without_triton
from torch.nn.grad import conv2d_input, conv2d_weight

import fused_resnet as fr
from fused_resnet.testing import assert_close

# (C_in, H, W, C_out, k, stride, padding, dilation)
CASES = [
    (5, 9, 9, 4, 3, 1, 2, 2),     # torchvision's dilated 3x3: padding = dilation, same size
    (4, 10, 9, 5, 3, 2, 2, 2),    # stride 2 and dilation 2: half the phases take no tap
    (3, 11, 10, 4, 3, 2, 3, 3),   # dilation 3 at stride 2 (coprime): every phase has taps
    (2, 12, 11, 3, 3, 3, 1, 2),   # stride 3: 9 phases
    (2, 9, 8, 3, 2, 2, 1, 2),     # an even kernel
    (3, 13, 12, 40, 3, 1, 4, 4),  # C_out past one K slice: the slice wraps into the next tap
    (6, 8, 8, 4, 1, 2, 0, 3),     # a 1x1: dilation changes nothing (compiled as undilated)
]


def _case_id(case):
    c_in, h, w, c_out, k, s, p, d = case
    return f"{c_in}x{h}x{w}-{c_out}-k{k}s{s}p{p}d{d}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_triton_kernels_match_torch(case):
    """fwd (with the previous BN + ReLU applied on load, zero in the padding), dgrad and
    wgrad (with the same prologue) against torch's conv2d and its gradients, fp64."""
    skip_without_triton()
    from fused_resnet.triton.conv import conv_fwd
    from fused_resnet.triton.conv_bwd import conv_dgrad, conv_wgrad

    c_in, h, w, c_out, k, stride, padding, dilation = case
    g = torch.Generator().manual_seed(sum(case))
    cl = torch.channels_last
    x = torch.randn(2, c_in, h, w, generator=g, dtype=torch.float64).contiguous(memory_format=cl)
    weight = torch.randn(c_out, c_in, k, k, generator=g, dtype=torch.float64)
    scale = torch.rand(c_in, generator=g, dtype=torch.float64) + 0.5
    shift = torch.randn(c_in, generator=g, dtype=torch.float64)
    a = torch.relu(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    geometry = {"stride": stride, "padding": padding, "dilation": dilation}
    expected = F.conv2d(a, weight, **geometry)
    y, _ = conv_fwd(x, weight, **geometry, in_scale=scale, in_shift=shift, in_relu=True)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    dy = torch.randn(expected.shape, generator=g, dtype=torch.float64).contiguous(
        memory_format=cl)
    dx = conv_dgrad(dy, weight, x.shape, **geometry)
    torch.testing.assert_close(dx, conv2d_input(x.shape, weight, dy, **geometry),
                               rtol=1e-10, atol=1e-10)
    dw = conv_wgrad(x, dy, weight.shape, **geometry, in_scale=scale, in_shift=shift,
                    in_relu=True)
    torch.testing.assert_close(dw, conv2d_weight(a, weight.shape, dy, **geometry),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_dilated_conv_bn_act_matches_the_reference(backend):
    """fr.ops.conv_bn_act(dilation=2): training (output, gradients, running stats), then
    inference with BN folded."""
    g = torch.Generator().manual_seed(0)

    def args():
        x = torch.randn(2, 4, 7, 7, generator=g, dtype=torch.float64)
        w = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
        gamma = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
        beta = torch.randn(6, generator=g, dtype=torch.float64)
        return [t.to(DEVICE) for t in (x, w, gamma, beta)]

    tensors = args()
    runs = []
    for name in (backend, "reference"):
        x, w, gamma, beta = (t.clone().requires_grad_() for t in tensors)
        mean, var = torch.zeros(6, dtype=torch.float64, device=DEVICE), torch.ones(
            6, dtype=torch.float64, device=DEVICE)
        out = fr.ops.conv_bn_act(x, w, gamma, beta, mean, var, stride=1, padding=2,
                                 dilation=2, backend=name)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=torch.float64,
                                    device=DEVICE).view_as(out))
        with torch.no_grad():
            evaluated = fr.ops.conv_bn_act(x, w, gamma, beta, mean, var, stride=1, padding=2,
                                           dilation=2, training=False, backend=name)
        runs.append((out, x.grad, w.grad, gamma.grad, beta.grad, mean, var, evaluated))
    assert runs[0][0].shape == (2, 6, 7, 7)
    for got, expected in zip(*runs):
        assert_close(got, expected, kind="grad")


def _assert_same_in_training_and_eval(ours, theirs, x):
    """Both models' outputs on x in training mode (batch statistics, running stats
    updated), then in eval mode."""
    for training in (True, False):
        ours.train(training)
        theirs.train(training)
        with torch.no_grad():
            assert_close(ours(x), theirs(x), kind="grad", name=f"training={training}")


def _dilation_pattern(model):
    return [(name, m.stride, m.padding, m.dilation) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Conv2d)]


@pytest.mark.parametrize("dilate", [[False, True, True], [True, False, True]],
                         ids=["output_stride_8", "dilated_then_strided"])
def test_resnet50_replace_stride_with_dilation_is_torchvisions(dilate):
    """The same convs (stride, padding, dilation of each, so the same keys and shapes) as
    torchvision's resnet50(replace_stride_with_dilation=...), the same eval logits with its
    weights, and the same training-mode output; [True, False, True] makes a stride-2
    dilation-2 3x3 (layer3.0.conv2)."""
    torch.manual_seed(0)
    theirs = torchvision.models.resnet50(replace_stride_with_dilation=dilate).to(DEVICE)
    ours = fr.models.resnet50(replace_stride_with_dilation=dilate, backend=NATIVE).to(DEVICE)
    assert _dilation_pattern(ours) == _dilation_pattern(theirs)
    ours.load_state_dict(theirs.state_dict())
    _assert_same_in_training_and_eval(ours, theirs, torch.randn(2, 3, 64, 64, device=DEVICE))
    assert_close(ours.state_dict()["layer4.2.bn3.running_var"],
                 theirs.state_dict()["layer4.2.bn3.running_var"])


def test_replace_stride_with_dilation_is_checked():
    with pytest.raises(NotImplementedError, match="Dilation > 1 not supported in BasicBlock"):
        fr.models.resnet18(replace_stride_with_dilation=[False, False, True])
    with pytest.raises(ValueError, match="replace_stride_with_dilation must be None or three"):
        fr.models.resnet50(replace_stride_with_dilation=[True, True])
    with pytest.raises(ValueError, match="dilation must be >= 1, got 0"):
        fr.nn.FusedBottleneck(16, 4, dilation=0)
    with pytest.raises(ValueError, match="dilation must be >= 1, got 0"):
        fr.nn.FusedConvBNAct(4, 4, 3, dilation=0)
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3)
    mean, var = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match="dilation must be an int >= 1, got 0"):
        fr.ops.conv_bn_act(x, w, None, None, mean, var, dilation=0, backend="reference")
    # 3x3 dilated by 3 spans 7 pixels: more than 5 + 2 * 0
    with pytest.raises(ValueError, match=r"smaller than the kernel \(3, 3\) dilated by 3"):
        fr.ops.conv_bn_act(x, w, None, None, mean, var, dilation=3, backend="reference")
    assert torch.equal(mean, torch.zeros(4)) and torch.equal(var, torch.ones(4))


def test_fused_conv_bn_act_pads_a_dilated_kernel_to_the_same_size():
    layer = fr.nn.FusedConvBNAct(4, 6, 3, dilation=2, backend="reference")
    assert layer.conv.padding == (2, 2) and layer.conv.dilation == (2, 2)
    assert layer(torch.randn(2, 4, 9, 9)).shape == (2, 6, 9, 9)


def test_single_launch_eval_is_not_taken_by_a_dilated_bottleneck():
    """The single-launch kernel's 3x3 is undilated: a dilated block always chains."""
    block = fr.nn.FusedBottleneck(32, 8, dilation=2, eval_kernel="single")
    assert not block._single_launch_eval()
    assert fr.nn.FusedBottleneck(32, 8, eval_kernel="single")._single_launch_eval()


def _no_convert_warnings(model, backend):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any block or stem left unfused warns
        return fr.convert(model, backend=backend)


@pytest.mark.parametrize("backend", [*FUSED_BACKENDS, "reference"])
def test_convert_fuses_a_dilated_torchvision_resnet(backend):
    """Every block of torchvision's resnet50(replace_stride_with_dilation=[False, True, True])
    (DeepLab's backbone) is swapped, with the stem; eval and training outputs as before."""
    if backend == "triton" and DEVICE == "cpu":
        pytest.skip("the interpreter is too slow for a ResNet-50 (its blocks run in "
                    "test_fused_blocks); this runs on a GPU")
    torch.manual_seed(1)
    theirs = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True])
    ours = _no_convert_warnings(copy.deepcopy(theirs), backend).to(DEVICE)
    theirs = theirs.to(DEVICE)
    blocks = [m for m in ours.modules() if isinstance(m, fr.nn.FusedBottleneck)]
    assert len(blocks) == 16 and blocks[-1].conv2.dilation == (4, 4)
    _assert_same_in_training_and_eval(ours, theirs, torch.randn(2, 3, 64, 64, device=DEVICE))


def test_convert_fuses_the_backbone_of_deeplabv3():
    """torchvision's DeepLabV3 (ResNet-50 backbone with output stride 8, in an
    IntermediateLayerGetter): all 16 blocks and the stem swapped, the segmentation output
    unchanged."""
    from torchvision.models.segmentation import deeplabv3_resnet50

    torch.manual_seed(2)
    theirs = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=3).eval()
    ours = fr.convert(copy.deepcopy(theirs), backend=NATIVE).to(DEVICE)
    theirs = theirs.to(DEVICE)
    assert sum(isinstance(m, fr.nn.FusedBottleneck) for m in ours.modules()) == 16
    assert type(ours.backbone).__name__ == "GetterFusedStem"  # its stem fused too
    x = torch.randn(1, 3, 48, 48, device=DEVICE)
    with torch.no_grad():
        assert_close(ours(x)["out"], theirs(x)["out"], kind="grad")


@pytest.mark.gpu
@pytest.mark.parametrize("dilate", [[False, True, True], [True, False, True]],
                         ids=["output_stride_8", "dilated_then_strided"])
def test_dilated_resnet50_on_gpu_with_triton_trains_like_the_reference(dilate):
    """Compiled Triton: a training step (output, every parameter's gradient) and eval
    logits of a dilated ResNet-50 against the reference backend, fp32 (TF32 off)."""
    torch.manual_seed(3)
    fused = fr.models.resnet50(replace_stride_with_dilation=dilate, backend="triton").cuda()
    ref = fr.models.resnet50(replace_stride_with_dilation=dilate, backend="reference").cuda()
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(4, 3, 96, 96, device="cuda")
    out, expected = fused(x), ref(x)
    assert_close(out, expected, name="logits")
    out.square().sum().backward()
    expected.square().sum().backward()
    params = dict(ref.named_parameters())
    for name, p in fused.named_parameters():
        assert_close(p.grad, params[name].grad, kind="grad", name=name)
    fused.eval()
    ref.eval()
    with torch.no_grad():
        assert_close(fused(x), ref(x), name="eval logits")


def test_profile_labels_name_the_dilation():
    skip_without_triton()
    from fused_resnet.triton.conv_bwd import _conv_dgrad_kernel
    from fused_resnet.triton.launch import profile_label

    assert profile_label(_conv_dgrad_kernel, {"KH": 3, "KW": 3, "DIL": 2, "BN_BWD": True}) \
        == "fr::conv_dgrad 3x3d2 bn_bwd"
    assert profile_label(_conv_dgrad_kernel, {"KH": 3, "KW": 3, "DIL": 1}) == "fr::conv_dgrad 3x3"


def test_convert_runs_a_basic_block_with_dilated_convs_fused():
    """torchvision's BasicBlock refuses dilation > 1, but a block whose conv modules are
    dilated afterwards (as some segmentation nets make them) is swapped, and the fused block
    reads each conv's dilation."""
    torch.manual_seed(4)
    block = torchvision.models.resnet.BasicBlock(8, 8)
    for conv in (block.conv1, block.conv2):
        conv.dilation, conv.padding = (2, 2), (2, 2)
    theirs = torch.nn.Sequential(block)
    ours = _no_convert_warnings(copy.deepcopy(theirs), NATIVE)
    assert type(ours[0]) is fr.nn.FusedBasicBlock
    _assert_same_in_training_and_eval(ours.to(DEVICE), theirs.to(DEVICE),
                                      torch.randn(2, 8, 7, 7, device=DEVICE))


def test_compile_fullgraph_traces_dilated_blocks():
    """torch.compile(fullgraph=True) of dilated blocks (the ops' fake kernels give the dilated
    output shapes): a training step's outputs, gradients and running stats, then eval, as
    eager's."""
    torch.manual_seed(5)
    eager = torch.nn.Sequential(
        fr.nn.FusedBottleneck(16, 4, dilation=2, backend=NATIVE),
        fr.nn.FusedBottleneck(16, 4, stride=2, dilation=2, backend=NATIVE)).to(DEVICE)
    ours = copy.deepcopy(eager)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 16, 9, 9, device=DEVICE)
    got, expected = compiled(x), eager(x)
    assert got.shape == (2, 16, 5, 5)
    got.square().sum().backward()
    expected.square().sum().backward()
    assert_close(got, expected)
    for (name, a), b in zip(ours.named_parameters(), eager.parameters()):
        assert_close(a.grad, b.grad, kind="grad", name=name)
    for (name, a), b in zip(ours.named_buffers(), eager.buffers()):
        assert_close(a.double(), b.double(), name=name)
    ours.eval()
    eager.eval()
    with torch.no_grad():
        assert_close(compiled(x), eager(x), name="eval")
