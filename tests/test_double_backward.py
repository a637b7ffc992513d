"""Gradients of gradients (create_graph=True: gradient penalties, Hessian-vector products).
The fused backwards are hand-written kernels, not differentiable: with a graph asked for,
the first-order gradient is what it is without one, and differentiating it raises an error
naming the op (`ops.first_order`) where it used to give wrong or missing gradients
silently. The reference backend (plain PyTorch) gives torch's second-order gradients."""

import pytest
import torch
from _backends import FUSED_BACKENDS, skip_without_triton
from torch import nn

import fused_resnet as fr


class _Stem(nn.Module):
    """The ResNets' stem as `fr.nn.conv_bn_relu_pool` runs it (on Triton in training: one op)."""

    def __init__(self, backend):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pool = fr.nn.FusedMaxPool2d(3, 2, 1, backend=backend)
        self.backend = backend

    def forward(self, x):
        return fr.nn.conv_bn_relu_pool(x, self.conv, self.bn, self.pool, backend=self.backend)


MODULES = {  # name: (make(backend), input channels)
    "conv_bn_act": (lambda b: fr.nn.FusedConvBNAct(4, 8, 3, backend=b), 4),
    "basic": (lambda b: fr.nn.FusedBasicBlock(4, 4, backend=b), 4),
    "bottleneck_projection": (lambda b: fr.nn.FusedBottleneck(8, 4, 2, backend=b), 8),
    "stem": (_Stem, 3),
}


def _grad_and_double(module, x):
    """(d loss / dx with a graph, d |d loss / dx|^2 / dx) for loss = |module(x)|^2 / 2."""
    x = x.clone().requires_grad_(True)
    (dx,) = torch.autograd.grad(module(x).square().sum() / 2, x, create_graph=True)
    dx.square().sum().backward()
    return dx.detach(), x.grad


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fused_backward_refuses_to_be_differentiated(backend, name, training):
    if backend == "triton":
        skip_without_triton()
    make, channels = MODULES[name]
    torch.manual_seed(0)
    module = make(backend).double().train(training)
    x = torch.randn(2, channels, 6, 6, dtype=torch.float64, requires_grad=True)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    (plain,) = torch.autograd.grad(module(x).square().sum() / 2, x)
    module.load_state_dict(state)  # the same running statistics for the second call
    (dx,) = torch.autograd.grad(module(x).square().sum() / 2, x, create_graph=True)
    torch.testing.assert_close(dx.detach(), plain, rtol=0, atol=0)  # first order unchanged
    assert dx.requires_grad
    with pytest.raises(RuntimeError, match="is not differentiable .* backend='reference'"):
        dx.square().sum().backward()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["conv_bn_act", "basic", "bottleneck_projection"])
def test_reference_backend_gives_torchs_second_order_gradients(name, training):
    """The reference blocks against the same module run as torch's own layers (torchvision's
    blocks, Conv2d + BatchNorm2d + ReLU), fp64."""
    import torchvision

    make, channels = MODULES[name]
    torch.manual_seed(0)
    ours = make("reference").double().train(training)
    theirs = {
        "conv_bn_act": lambda: nn.Sequential(nn.Conv2d(4, 8, 3, 1, 1, bias=False),
                                             nn.BatchNorm2d(8), nn.ReLU()),
        "basic": lambda: torchvision.models.resnet.BasicBlock(4, 4),
        "bottleneck_projection": lambda: torchvision.models.resnet.Bottleneck(
            8, 4, 2, downsample=nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False),
                                              nn.BatchNorm2d(16))),
    }[name]().double().train(training)
    theirs.load_state_dict(ours.state_dict() if name != "conv_bn_act" else
                           dict(zip(theirs.state_dict(), ours.state_dict().values())))
    x = torch.randn(2, channels, 6, 6, dtype=torch.float64)
    for a, b in zip(_grad_and_double(ours, x), _grad_and_double(theirs, x)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
