"""The per-shape backend table behind `backend="auto"` (`fused_resnet.tuning`)."""

import json

import pytest
import torch
from _backends import skip_without_triton

import fused_resnet as fr
from fused_resnet import tuning
from fused_resnet.bench.blocks import fastest_backends
from fused_resnet.nn import FusedBasicBlock, FusedBottleneck
from fused_resnet.nn import blocks as blocks_module


@pytest.fixture
def table(tmp_path, monkeypatch):
    """A fresh table file in use for the test (the packaged one is left alone)."""
    path = tmp_path / "table.json"
    monkeypatch.setenv(tuning.TABLE_ENV, str(path))
    monkeypatch.delenv("FUSED_RESNET_BACKEND", raising=False)
    return path


@pytest.fixture
def seen_backends(monkeypatch):
    """The backend each block call passes to the functional block op."""
    seen = []
    original = blocks_module.residual_block

    def spy(x, pairs, kind, stride, backend):
        seen.append(backend)
        return original(x, pairs, kind, stride, backend)

    monkeypatch.setattr(blocks_module, "residual_block", spy)
    return seen


def test_block_key_names_shape_dtype_mode_and_batch_bucket():
    block = FusedBottleneck(256, 128, 2)
    x = torch.randn(3, 256, 8, 8)
    assert block.tuning_key(x) == (
        "bottleneck/projection|256>128,128,512|s1,2,1|8x8|float32|train|b8")
    v1 = FusedBottleneck(256, 128, 2, variant="v1").eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert v1.tuning_key(torch.randn(300, 256, 8, 8)) == (
            "bottleneck/projection|256>128,128,512|s2,1,1|8x8|bfloat16|eval|b256+")
    assert FusedBasicBlock(16, 32, 2, shortcut="A").tuning_key(torch.randn(1, 16, 4, 4)) == (
        "basicblock/zero_pad|16>32,32|s2,1|4x4|float32|train|b1")
    # a dilated block is measured apart from the undilated one of the same shape
    assert FusedBottleneck(64, 16, dilation=2).tuning_key(torch.randn(2, 64, 8, 8)) == (
        "bottleneck/identity/d2|64>16,16,64|s1,1,1|8x8|float32|train|b8")
    assert [tuning.batch_bucket(n) for n in (1, 2, 8, 9, 128, 129)] == [
        "1", "8", "8", "32", "128", "256+"]


def test_table_entry_picks_the_backend_of_auto(table, seen_backends):
    block = FusedBasicBlock(16, 16)
    x = torch.randn(2, 16, 8, 8)
    expected = fr.models.set_backend(FusedBasicBlock(16, 16), "reference")
    expected.load_state_dict(block.state_dict())
    block(x)
    assert seen_backends == ["auto"]  # no table yet
    tuning.save_entries(table, "cpu", {block.tuning_key(x): "reference"})
    out = block(x)
    assert seen_backends[-1] == "reference"
    torch.testing.assert_close(out, expected(x), rtol=1e-4, atol=1e-4)
    block(torch.randn(2, 16, 4, 4))  # another shape: no entry, plain auto
    assert seen_backends[-1] == "auto"


def test_named_backend_and_env_override_win_over_the_table(table, seen_backends, monkeypatch):
    x = torch.randn(2, 16, 8, 8)
    tuning.save_entries(table, "cpu", {FusedBasicBlock(16, 16).tuning_key(x): "reference"})
    FusedBasicBlock(16, 16, backend="cpu")(x)
    assert seen_backends[-1] == "cpu"
    monkeypatch.setenv("FUSED_RESNET_BACKEND", "cpu")
    FusedBasicBlock(16, 16)(x)
    assert seen_backends[-1] == "auto"  # resolved to the env's backend further down
    monkeypatch.delenv("FUSED_RESNET_BACKEND")
    monkeypatch.setenv(tuning.TABLE_ENV, "off")
    FusedBasicBlock(16, 16)(x)
    assert seen_backends[-1] == "auto"


def test_entry_for_a_backend_that_cannot_run_here_is_ignored(table, seen_backends):
    x = torch.randn(2, 16, 8, 8)
    tuning.save_entries(table, "cpu", {FusedBasicBlock(16, 16).tuning_key(x): "cuda"})
    FusedBasicBlock(16, 16)(x)
    assert seen_backends[-1] == "auto"


def test_save_entries_merges_and_keeps_other_devices(table):
    tuning.save_entries(table, "NVIDIA H100 80GB HBM3", {"k1": "cuda", "k2": "triton"})
    tuning.save_entries(table, "cpu", {"k1": "reference"})
    tuning.save_entries(table, "NVIDIA H100 80GB HBM3", {"k2": "cuda", "k3": "triton"})
    data = json.loads(table.read_text())
    assert data == {"format": 1, "devices": {
        "NVIDIA H100 80GB HBM3": {"k1": "cuda", "k2": "cuda", "k3": "triton"},
        "cpu": {"k1": "reference"}}}


def test_bad_table_file_is_named(table):
    table.write_text('{"rows": []}')
    with pytest.raises(ValueError, match="table.json is not a backend table of format 1"):
        FusedBasicBlock(16, 16)(torch.randn(2, 16, 8, 8))


def test_packaged_table_is_valid():
    data = json.loads(tuning.PACKAGED_TABLE.read_text())
    assert data["format"] == tuning.TABLE_FORMAT
    for device, entries in data["devices"].items():
        assert all(v in tuning.CHOICES for v in entries.values()), device


def test_fastest_backends_keeps_the_default_within_the_margin():
    def rows(key, **ms):
        return [{"key": key, "column": c, "ms": t} for c, t in ms.items()]

    measured = (rows("a", triton=1.00, cuda=0.98, compile=0.5)  # cuda 2% faster: noise
                + rows("b", triton=1.00, cuda=0.90)  # cuda 10% faster
                + rows("c", cpu=1.00, reference=0.80)
                + rows("d", compile=1.0)  # no backend column: no entry
                + rows("e", triton=1.00, cuda=0.95, **{"triton single": 0.80}))
    assert fastest_backends(measured) == {"a": "triton", "b": "cuda", "c": "reference",
                                          "e": "triton single"}


def test_compiled_block_follows_the_table(table):
    block = FusedBasicBlock(16, 16)
    x = torch.randn(2, 16, 8, 8)
    tuning.save_entries(table, "cpu", {block.tuning_key(x): "reference"})
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), block(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eval_kernel, expected_calls", [("auto", 1), ("chain", 0)])
def test_table_can_pick_the_single_launch_eval_bottleneck(table, monkeypatch, eval_kernel,
                                                          expected_calls):
    skip_without_triton()
    from fused_resnet import ops

    calls = []
    real = ops.bottleneck_eval
    monkeypatch.setattr(ops, "bottleneck_eval", lambda *a, **k: calls.append(k) or real(*a, **k))
    block = FusedBottleneck(32, 8, eval_kernel=eval_kernel).eval()
    ref = fr.models.set_backend(FusedBottleneck(32, 8), "reference").eval()
    ref.load_state_dict(block.state_dict())
    x = torch.randn(2, 32, 4, 4)
    with torch.no_grad():
        block(x)
        assert calls == [], "no table entry: the chain"
        tuning.save_entries(table, "cpu", {block.tuning_key(x): tuning.SINGLE_LAUNCH})
        torch.testing.assert_close(block(x), ref(x), rtol=1e-4, atol=1e-4)
        block(torch.randn(2, 32, 5, 5))  # another shape, no entry
    assert calls == [{"backend": "triton"}] * expected_calls
