"""count_flops against the paper's Table 1, torchvision's figures, and its own bookkeeping."""

import math

import pytest
import torch
import torchvision
from torch import nn

import fused_resnet as fr
from fused_resnet import count_flops, models
from fused_resnet.flops import PAPER_GMACS, TORCHVISION_GMACS


@pytest.mark.parametrize("arch", sorted(PAPER_GMACS))
def test_v1_macs_match_the_paper(arch):
    report = count_flops(models.IMAGENET_ARCHS[arch](variant="v1"), training=False)
    assert report.macs / 1e9 == pytest.approx(PAPER_GMACS[arch], rel=0.03)


@pytest.mark.parametrize("arch", sorted(TORCHVISION_GMACS))
def test_v15_macs_match_torchvision(arch):
    report = count_flops(models.IMAGENET_ARCHS[arch](), training=False)
    assert report.macs / 1e9 == pytest.approx(TORCHVISION_GMACS[arch], rel=0.01)


def test_rows_follow_the_conv_formula_and_totals_add_up():
    model = models.resnet18()
    report = count_flops(model, (2, 3, 64, 64))
    conv1 = next(r for r in report.rows if r.name == "conv1")
    # N * C_out * H_out * W_out * C_in * kh * kw
    assert conv1.macs == 2 * 64 * 32 * 32 * 3 * 7 * 7
    assert conv1.kind == "conv" and conv1.output_shape == (2, 64, 32, 32)
    assert conv1.params == 64 * 3 * 7 * 7
    fc = next(r for r in report.rows if r.kind == "linear")
    assert fc.name == "fc" and fc.macs == 2 * 512 * 1000 and fc.params == 513_000
    assert report.params == sum(p.numel() for p in model.parameters())
    assert sum(r.params for r in report.rows) == report.params
    assert sum(s["macs"] for s in report.by_stage().values()) == report.macs
    assert list(report.by_stage()) == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    kinds = {r.kind for r in report.rows}
    assert kinds == {"input", "conv", "batch_norm", "relu", "add", "pool", "linear"}
    assert report.elementwise > 0


def test_counts_agree_with_torchvision_model_and_scale_with_batch():
    ours = count_flops(models.resnet50(), (1, 3, 64, 64))
    theirs = count_flops(torchvision.models.resnet50(weights=None), (1, 3, 64, 64))
    assert ours.macs == theirs.macs and ours.params == theirs.params
    # Same ops, same saved tensors (torchvision's in-place ReLU keeps the same storages).
    assert ours.activation_bytes == theirs.activation_bytes
    # row by row under the same names, though a fused projection block runs its shortcut
    # first: its add and ReLU rows are bn3.add / bn3.relu in both
    def rows(report):
        return {r.name: (r.kind, r.macs, r.elementwise, r.activation_bytes) for r in report.rows}
    assert len(rows(ours)) == len(ours.rows) and rows(ours) == rows(theirs)
    assert {"layer1.0.bn3.add", "layer1.0.bn3.relu", "layer1.1.bn3.add"} <= rows(ours).keys()
    double = count_flops(models.resnet50(), (2, 3, 64, 64))
    assert double.macs == 2 * ours.macs


def test_activation_bytes_only_in_training_and_input_counted():
    model = models.cifar_resnet(20)
    train = count_flops(model, (2, 3, 32, 32))
    infer = count_flops(model, (2, 3, 32, 32), training=False)
    assert infer.activation_bytes == 0 and train.activation_bytes > 0
    assert train.rows[0].name == "input"
    assert train.rows[0].activation_bytes == 2 * 3 * 32 * 32 * 4
    assert train.macs == infer.macs


def test_running_stats_and_mode_are_restored():
    model = models.cifar_resnet(20).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_flops(model, (2, 3, 32, 32))
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_bad_input_size_is_named():
    with pytest.raises(ValueError, match="input_size"):
        count_flops(models.cifar_resnet(20), (3, 32, 32))


def test_count_flops_on_the_meta_device_matches_row_by_row():
    """A model built on the meta device (no memory, every address 0) gets the report of the
    same model on CPU: every row's name, kind, MACs, parameters and activation bytes."""
    torch.manual_seed(0)
    real = count_flops(torchvision.models.resnet18(), (2, 3, 64, 64))
    with torch.device("meta"):
        model = torchvision.models.resnet18()
    meta = count_flops(model, (2, 3, 64, 64))
    assert [(r.name, r.kind, r.macs, r.params, r.activation_bytes) for r in meta.rows] == \
        [(r.name, r.kind, r.macs, r.params, r.activation_bytes) for r in real.rows]


def test_each_modules_mode_is_restored():
    """A model with a part in the other mode (BNs frozen for fine-tuning) gets every module's
    own mode back, whichever mode count_flops ran in."""
    model = fr.models.resnet18(num_classes=4, backend="reference")
    model.layer1.eval()
    model.eval().fc.train()
    modes = {name: m.training for name, m in model.named_modules()}
    for training in (True, False):
        fr.count_flops(model, (2, 3, 32, 32), training=training)
        assert {name: m.training for name, m in model.named_modules()} == modes


@pytest.mark.parametrize("layer, shape, macs", [
    (nn.Conv1d(4, 8, 3, padding=1), (2, 4, 16), 2 * 8 * 16 * 4 * 3),
    (nn.Conv3d(4, 8, 3, padding=1), (1, 4, 4, 4, 4), 8 * 64 * 4 * 27),
    (nn.ConvTranspose2d(8, 4, 2, stride=2), (1, 8, 8, 8), 8 * 64 * 4 * 4),  # input elements
    (nn.ConvTranspose2d(4, 8, 2, stride=2, groups=2), (1, 4, 8, 8), 4 * 64 * 4 * 4),
])
def test_other_convolutions_count_their_kernels(layer, shape, macs):
    class Net(nn.Module):  # count_flops feeds (N, C, H, W): the layer's input reshaped
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x.reshape(shape))

    report = fr.count_flops(Net(), (1, 1, 1, math.prod(shape)))
    assert [(r.name, r.macs) for r in report.rows if r.kind == "conv"] == [("layer", macs)]


def test_batched_products_and_attention_are_counted():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            t = x.flatten(2).transpose(1, 2)  # (1, 64 tokens, 8)
            gram = torch.bmm(t.transpose(1, 2), t)  # (1, 8, 8): 8 * 64 * 8 MACs
            return self.attn(t, t, t)[0].sum() + gram.sum()

    report = fr.count_flops(Net(), (1, 8, 8, 8))
    projections = 64 * 8 * 24 + 64 * 8 * 8  # in_proj (q, k, v), out_proj
    products = 2 * (2 * 64 * 4 * 64)  # q k^T and attn v, 2 heads of 4
    assert report.macs == projections + products + 8 * 64 * 8


def test_autocast_weight_copies_count_as_the_weights():
    model = fr.models.resnet18(num_classes=4, backend="reference")
    plain = fr.count_flops(model, (2, 3, 32, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = fr.count_flops(model, (2, 3, 32, 32))
    named = lambda report: [(r.name, r.kind, r.macs, r.params) for r in report.rows  # noqa: E731
                            if r.kind in ("conv", "linear")]
    assert named(amp) == named(plain)
    assert amp.by_stage().keys() == plain.by_stage().keys()
    # bf16 activations (the fc's fp32 output and the fp32 input aside): about half
    assert 0.4 < amp.activation_bytes / plain.activation_bytes < 0.6
