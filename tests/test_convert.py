"""fr.convert on torchvision ResNets (blocks, the stem, what is left and why, sync BN), and the
cached inference fold of the fused blocks."""

import copy
import io

import pytest
import torch
import torchvision
from _backends import skip_without_triton
from _calls import saved_dtypes

import fused_resnet as fr
from fused_resnet.backend import unavailable_reason
from fused_resnet.nn import FusedBasicBlock, FusedBottleneck, FusedSyncBatchNorm
from fused_resnet.testing import assert_close, assert_modules_close


@pytest.mark.parametrize("arch, block", [("resnet18", FusedBasicBlock),
                                         ("resnet50", FusedBottleneck)])
def test_convert_round_trip_keeps_tensors_and_state_dict(arch, block):
    model = getattr(torchvision.models, arch)(weights=None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pointers = {k: v.data_ptr() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    assert fr.convert(model, backend="reference") is model
    blocks = [m for m in model.modules() if isinstance(m, block)]
    assert len(blocks) == sum(len(getattr(model, f"layer{i}")) for i in range(1, 5))
    state = model.state_dict()
    assert list(state) == list(before)
    for key, value in state.items():
        assert value.data_ptr() == pointers[key], key
        assert torch.equal(value, before[key]), key
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    fr.convert(model, backend="auto")
    assert all(b.backend == "auto" for b in blocks)
    fr.convert(model, backend="reference")
    assert all(b.backend == "reference" for b in blocks)
    assert list(model.state_dict()) == list(before)


def test_converted_model_trains_like_torchvision():
    skip_without_triton()
    # fp64: at 32x32 with batch 2 layer4's BN sees 2 values per channel, too ill-conditioned
    # for an fp32 comparison (see test_fused_blocks).
    def resnet10():  # torchvision's ResNet class with one basic block per stage
        block = torchvision.models.resnet.BasicBlock
        return torchvision.models.resnet.ResNet(block, [1, 1, 1, 1]).double()

    model, reference = resnet10(), resnet10()
    reference.load_state_dict(model.state_dict())
    fr.convert(model, backend="triton")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model(x).sum().backward()
    reference(x).sum().backward()
    assert_modules_close(model, reference)


def test_convert_rejects_what_it_cannot_swap():
    block = torchvision.models.resnet.BasicBlock(8, 8)
    with pytest.raises(ValueError, match="inside a model"):
        fr.convert(block)
    holder = torch.nn.Sequential(torchvision.models.resnet.BasicBlock(8, 8))
    with pytest.raises(ValueError, match="backend"):
        fr.convert(holder, backend="fast")


def test_folded_weights_are_stored_as_the_kernels_read_them():
    """For Triton the folded inference weights are kept in (kh, kw, C_in, C_out) order, so a
    conv takes its GEMM operand as a view of them, not a copy per call; for ATen's convs
    (the `_C` backends) they stay contiguous. Same values either way."""
    skip_without_triton()
    from fused_resnet.triton.gemm_layout import gemm_weight

    block = FusedBottleneck(16, 8, 2, backend="triton").eval()
    with torch.no_grad():
        block(torch.randn(2, 16, 8, 8))
    for bn in (block.bn1, block.bn2, block.bn3, block.downsample[1]):
        weight = bn._fused_resnet_fold[1][0]
        assert weight.permute(2, 3, 1, 0).is_contiguous()
        assert gemm_weight(weight).data_ptr() == weight.data_ptr()  # a view: nothing copied
    native = FusedBottleneck(16, 8, 2, backend="cpu").eval()
    native.load_state_dict(block.state_dict())
    if unavailable_reason("cpu", torch.device("cpu")) is None:
        with torch.no_grad():
            native(torch.randn(2, 16, 8, 8))
        for a, b in zip((block.bn1, block.bn2, block.bn3), (native.bn1, native.bn2, native.bn3)):
            w_triton, w_native = a._fused_resnet_fold[1][0], b._fused_resnet_fold[1][0]
            assert w_native.is_contiguous() and torch.equal(w_triton, w_native)


def test_inference_fold_is_cached_and_follows_weight_changes():
    skip_without_triton()
    block = FusedBottleneck(16, 8, 2, backend="triton").eval()
    reference = FusedBottleneck(16, 8, 2, backend="reference").eval()
    reference.load_state_dict(block.state_dict())
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        assert_close(block(x), reference(x))
        folded = block.bn2._fused_resnet_fold[1]
        block(x)
        assert block.bn2._fused_resnet_fold[1] is folded  # nothing changed: reused
        for model in (block, reference):
            model.bn2.running_var.mul_(2.0)
            model.conv3.weight.mul_(0.5)
        assert_close(block(x), reference(x))  # stale fold would differ
        assert block.bn2._fused_resnet_fold[1] is not folded
    # With autograd the fold is recomputed in the graph, so gradients reach gamma / weights.
    out = block(x)
    out.sum().backward()
    assert block.bn1.weight.grad is not None and block.conv1.weight.grad is not None


def test_fold_reads_a_parametrized_conv_weight():
    """A weight under torch.nn.utils.parametrize is a computed attribute, not an entry of the
    conv's parameter dict, and a new tensor at every access (often at the address of the
    last one, version 0): the inference fold takes the computed one, never a stale fold
    after the parametrization's own parameter changed."""
    from torch.nn.utils import parametrize

    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.k = torch.nn.Parameter(torch.tensor(2.0))

        def forward(self, w):
            return w * self.k

    backend = "cpu" if unavailable_reason("cpu", torch.device("cpu")) is None else "reference"
    block = FusedBottleneck(32, 8, 1, backend=backend).eval()
    reference = FusedBottleneck(32, 8, 1, backend="reference").eval()
    reference.load_state_dict(block.state_dict())
    parametrize.register_parametrization(block.conv2, "weight", Scale())
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        reference.conv2.weight.mul_(2)
        assert_close(block(x), reference(x))
        for k in (-1.0, 0.5, 3.0):
            reference.conv2.weight.mul_(k / block.conv2.parametrizations.weight[0].k)
            block.conv2.parametrizations.weight[0].k.fill_(k)
            folded = block.bn2._fused_resnet_fold[1]
            assert_close(block(x), reference(x), name=f"k={k}")
            assert block.bn2._fused_resnet_fold[1] is not folded  # a new weight: refolded


def test_fold_of_inference_tensors():
    """Parameters made under torch.inference_mode have no version counter: the block folds
    them at each call (no cache) instead of failing, as torch's modules run them."""
    backend = "cpu" if unavailable_reason("cpu", torch.device("cpu")) is None else "reference"
    with torch.inference_mode():
        block = FusedBottleneck(32, 8, 1, backend=backend).eval()
        reference = FusedBottleneck(32, 8, 1, backend="reference").eval()
        reference.load_state_dict(block.state_dict())
        x = torch.randn(2, 32, 8, 8)
        assert_close(block(x), reference(x))
        for model in (block, reference):
            model.bn2.running_var.mul_(2.0)  # in place, unversioned: not cached, not stale
        assert_close(block(x), reference(x))


def _resnet10(**kwargs):  # torchvision's ResNet class with one basic block per stage
    return torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1],
                                            **kwargs)


def test_convert_fuses_a_torchvision_resnets_stem():
    """The class swapped (still a torchvision ResNet), maxpool a FusedMaxPool2d of the same
    window, the backend followed on every convert; the state dict as it was; the model goes
    through deepcopy and torch.save / torch.load; training mode drops bn1's inference fold."""
    from fused_resnet.nn import FusedMaxPool2d
    from fused_resnet.nn.fold_cache import _FOLD
    from fused_resnet.nn.torchvision_stem import TorchvisionResNetFusedStem

    model = _resnet10()
    keys = list(model.state_dict())
    fr.convert(model, backend="reference")
    assert type(model) is TorchvisionResNetFusedStem
    assert isinstance(model, torchvision.models.ResNet) and list(model.state_dict()) == keys
    pool = model.maxpool
    assert isinstance(pool, FusedMaxPool2d) and (pool.kernel_size, pool.stride,
                                                 pool.padding) == (3, 2, 1)
    fr.convert(model, backend="auto")
    assert model.stem_backend == model.maxpool.backend == "auto"
    assert model.maxpool is pool  # converted once: only the backend moves
    backend = "cpu" if unavailable_reason("cpu", torch.device("cpu")) is None else "reference"
    fr.convert(model, backend=backend)
    reference = _resnet10()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    reference.eval()
    with torch.no_grad():
        assert_close(model(x), reference(x))
        assert_close(copy.deepcopy(model)(x), reference(x))
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert type(loaded) is TorchvisionResNetFusedStem
        assert_close(loaded(x), reference(x))
    if backend != "reference":  # the folded stem cached on bn1, dropped by train()
        assert _FOLD in model.bn1.__dict__
        model.train()
        assert _FOLD not in model.bn1.__dict__


def test_converted_stem_keeps_no_pool_indices_on_triton():
    """torchvision's stem saves relu(bn(conv(x))) and ATen's int64 pool indices for
    backward; converted, on Triton, the stem is one op that saves neither."""
    skip_without_triton()
    x = torch.randn(2, 3, 32, 32)
    assert torch.int64 in saved_dtypes(_resnet10().train(), x)
    converted = fr.convert(_resnet10(), backend="triton").train()
    assert torch.int64 not in saved_dtypes(converted, x)


def test_convert_leaves_stems_it_cannot_fuse():
    from fused_resnet.nn.torchvision_stem import TorchvisionResNetFusedStem

    model = _resnet10()
    model.maxpool = torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True)
    with pytest.warns(RuntimeWarning, match="left the stem of ResNet unfused: maxpool"):
        fr.convert(model, backend="reference")
    assert type(model) is torchvision.models.ResNet

    class MyResNet(torchvision.models.ResNet):  # its own forward may use the stem otherwise
        pass

    mine = MyResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    fr.convert(mine, backend="reference")
    assert type(mine) is MyResNet and isinstance(mine.layer1[0], FusedBasicBlock)
    holder = torch.nn.Sequential(_resnet10())  # a ResNet inside another model: found
    fr.convert(holder, backend="reference")
    assert type(holder[0]) is TorchvisionResNetFusedStem


def _stand_in_group():
    """A ProcessGroup object of one rank, made without init_process_group (nothing runs
    distributed here): (store, rank, size) in newer torch, (rank, size) in torch 2.5."""
    import torch.distributed as dist

    try:
        return dist.ProcessGroup(dist.HashStore(), 0, 1)
    except TypeError:
        return dist.ProcessGroup(0, 1)


def test_convert_keeps_torchs_sync_batchnorm_synchronised():
    """A model made with torch's convert_sync_batchnorm: the BNs the fused code runs (blocks,
    stem) become FusedSyncBatchNorm over the same process group (the fused ops synchronise
    only those), the same tensors and keys; others stay."""
    group = _stand_in_group()
    model = torchvision.models.resnet18()
    model.extra = torch.nn.SyncBatchNorm(4)  # not run by fused code: left
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    tensors = {k: v.data_ptr() for k, v in model.state_dict().items()}
    fr.convert(model, backend="reference")
    for name, m in model.named_modules():
        if name == "extra":
            assert type(m) is torch.nn.SyncBatchNorm
        elif isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            assert type(m) is FusedSyncBatchNorm and m.process_group is group, name
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == tensors


def test_convert_leaves_blocks_with_other_downsamples():
    """A downsample other than Sequential(Conv2d, BatchNorm2d) or ResNet-D's Sequential(pool,
    Conv2d, BatchNorm2d) (test_pooled_projection.py) leaves that block as it is, warned and
    named; the model's other blocks are swapped (convert used to refuse the whole model)."""
    good = torchvision.models.resnet.BasicBlock(8, 8)
    pooled_twice = torchvision.models.resnet.BasicBlock(8, 16, 2, downsample=torch.nn.Sequential(
        torch.nn.AvgPool2d(2, 2), torch.nn.AvgPool2d(1, 1), torch.nn.Conv2d(8, 16, 1, bias=False),
        torch.nn.BatchNorm2d(16)))
    other = torchvision.models.resnet.BasicBlock(16, 16)
    other.downsample = torch.nn.Identity()
    model = torch.nn.Sequential(good, pooled_twice, other)
    x = torch.randn(2, 8, 8, 8)
    expected = copy.deepcopy(model).eval()(x)
    with pytest.warns(RuntimeWarning, match="left 1 unfused: its downsample is AvgPool2d, "
                                            "AvgPool2d, Conv2d, BatchNorm2d") as record:
        fr.convert(model, backend="reference")
    assert any("left 2 unfused: its downsample is Identity" in str(w.message) for w in record)
    assert type(model[0]) is FusedBasicBlock
    assert model[1] is pooled_twice and model[2] is other
    torch.testing.assert_close(model.eval()(x), expected)


def test_convert_retargets_every_fused_module_of_a_fused_net():
    """fr.convert(model, backend) on one of this package's nets: its blocks, its stem (the
    net's own `backend`), its pool and any FusedConvBNAct follow, not the blocks alone."""
    model = fr.models.resnet18(num_classes=4, backend="cpu")
    model.head = fr.nn.FusedConvBNAct(512, 8, 1, backend="cpu")
    fr.convert(model, backend="reference")
    left = {name: m.backend for name, m in model.named_modules()
            if "backend" in m.__dict__ and m.backend != "reference"}
    assert left == {}
    assert model.backend == model.maxpool.backend == model.head.backend == "reference"
