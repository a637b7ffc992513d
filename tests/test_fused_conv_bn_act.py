"""fr.nn.FusedConvBNAct against nn.Conv2d -> nn.BatchNorm2d (-> + residual) -> ReLU."""

import pytest
import torch
from _backends import DEVICE, FUSED_BACKENDS, backend_param, skip_without_triton
from torch import nn

from fused_resnet.nn import FusedConvBNAct
from fused_resnet.testing import assert_close


class Eager(nn.Module):
    def __init__(self, c_in, c_out, k, stride, momentum, affine, track, eps=1e-5):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=eps, momentum=momentum, affine=affine,
                                 track_running_stats=track)

    def forward(self, x, residual=None):
        out = self.bn(self.conv(x))
        return torch.relu(out + residual if residual is not None else out)


def test_state_dict_keys_are_conv_and_bn():
    module = FusedConvBNAct(4, 8, 3)
    assert list(module.state_dict()) == [
        "conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
        "bn.num_batches_tracked"]
    assert module.conv.padding == (1, 1) and module.conv.bias is None


@pytest.mark.parametrize("backend", [backend_param("reference"), *FUSED_BACKENDS])
@pytest.mark.parametrize("momentum, affine, track, residual, eps", [
    (0.1, True, True, True, 1e-5), (None, True, True, False, 1e-5),
    (0.3, False, True, False, 1e-3), (0.1, True, False, True, 1e-5),
    (0.1, True, True, True, 0.5)])
def test_matches_eager_over_steps_and_in_eval(backend, momentum, affine, track, residual, eps):
    fused = FusedConvBNAct(4, 16, 3, 2, momentum=momentum, affine=affine, eps=eps,
                           track_running_stats=track, backend=backend).to(DEVICE)
    eager = Eager(4, 16, 3, 2, momentum, affine, track, eps).to(DEVICE)
    eager.load_state_dict(fused.state_dict())
    for step in range(3):
        x = torch.randn(2, 4, 8, 8, device=DEVICE) * 2 + step
        r = torch.randn(2, 16, 4, 4, device=DEVICE) if residual else None
        out, ref = fused(x, r), eager(x, r)
        assert_close(out, ref, name=f"step {step} output")
        out.sum().backward()
        ref.sum().backward()
    for (name, p), q in zip(fused.named_parameters(), eager.parameters()):
        assert_close(p.grad, q.grad, kind="grad", name=name)
    for key, value in eager.state_dict().items():
        assert_close(fused.state_dict()[key].double(), value.double(), name=key)
    fused.eval()
    eager.eval()
    x = torch.randn(2, 4, 8, 8, device=DEVICE)
    with torch.no_grad():
        assert_close(fused(x), eager(x), name="eval output")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_compiles_fullgraph_and_matches_eager_mode(backend):
    fused = FusedConvBNAct(4, 8, 3, backend=backend).to(DEVICE)
    ref = FusedConvBNAct(4, 8, 3, backend="reference").to(DEVICE)
    ref.load_state_dict(fused.state_dict())
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 6, 6, device=DEVICE)
    assert_close(compiled(x), ref(x), name="train output")
    assert int(fused.bn.num_batches_tracked) == 1
    assert_close(fused.bn.running_var, ref.bn.running_var, name="running_var")
    fused.eval()
    ref.eval()
    with torch.no_grad():
        assert_close(compiled(x), ref(x), name="eval output")


def test_pinned_config_is_bitwise_deterministic():
    skip_without_triton()
    from fused_resnet.triton.config import TileConfig, pin_config

    module = FusedConvBNAct(16, 16, 3, backend="triton")
    x = torch.randn(2, 16, 8, 8)
    pin_config(TileConfig(64, 16, 16))
    try:
        runs = []
        for _ in range(2):
            x_leaf = x.clone().requires_grad_()
            out = module(x_leaf)
            out.sum().backward()
            runs.append((out.detach(), x_leaf.grad, module.conv.weight.grad.clone()))
            module.conv.weight.grad = None
        for a, b in zip(*runs):
            assert torch.equal(a, b)
        # Another tile config gives the same numbers to rounding: the groups of the batch
        # statistics do not depend on it.
        pin_config(TileConfig(32, 32, 16))
        assert_close(module(x), runs[0][0])
    finally:
        pin_config(None)


def test_operand_mode_setting_and_its_errors(monkeypatch):
    """`config.operands()`: "on_load" by default, FUSED_RESNET_OPERANDS, `set_operands` over
    both, `operands_mode` restoring what was set; a bad value is named."""
    from fused_resnet.triton import config

    monkeypatch.delenv(config.OPERANDS_ENV, raising=False)
    assert config.operands() == "on_load"
    monkeypatch.setenv(config.OPERANDS_ENV, "written")
    assert config.operands() == "written"
    with config.operands_mode("on_load"):
        assert config.operands() == "on_load"
        with pytest.raises(ValueError, match="mode must be one of"):
            with config.operands_mode("materialized"):
                pass
        assert config.operands() == "on_load"
    assert config.operands() == "written"
    monkeypatch.setenv(config.OPERANDS_ENV, "fused")
    with pytest.raises(ValueError, match="FUSED_RESNET_OPERANDS must be one of"):
        config.operands()
