"""fr.nn.FusedConvBNAct against nn.Conv2d -> nn.BatchNorm2d (-> + residual) -> ReLU."""

import pytest
import torch
from torch import nn

from fused_resnet.nn import FusedConvBNAct
from fused_resnet.testing import assert_close

pytest.importorskip("triton")


class Eager(nn.Module):
    def __init__(self, c_in, c_out, k, stride, momentum, affine, track):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, momentum=momentum, affine=affine,
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


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("momentum, affine, track, residual", [
    (0.1, True, True, True), (None, True, True, False), (0.3, False, True, False),
    (0.1, True, False, True)])
def test_matches_eager_over_steps_and_in_eval(backend, momentum, affine, track, residual):
    fused = FusedConvBNAct(4, 16, 3, 2, momentum=momentum, affine=affine,
                           track_running_stats=track, backend=backend)
    eager = Eager(4, 16, 3, 2, momentum, affine, track)
    eager.load_state_dict(fused.state_dict())
    for step in range(3):
        x = torch.randn(2, 4, 8, 8) * 2 + step
        r = torch.randn(2, 16, 4, 4) if residual else None
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
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert_close(fused(x), eager(x), name="eval output")
