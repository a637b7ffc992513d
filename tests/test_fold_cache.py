"""The inference BN folds cached on the BN modules (`nn/fold_cache.py`) never go stale where
torch's modules would compute something new: fused optimizer steps (no version counter
moves), channels sliced off by views (same address, same version), parameters given new
storage through `.data` (an address that may be reused), moves and casts; and a copy or
pickle of a model carries none. Each case against the same modules run as torch runs them,
in fp64 on the `_C` backend (the reference where `_C` is not built) and in the Triton
interpreter on a tiny block: differences are bugs."""

import copy
import io
import pickle
import warnings

import pytest
import torch
from _backends import DEVICE, FUSED_BACKENDS
from _bn import randomize_bn
from torch import nn

import fused_resnet as fr
from fused_resnet.nn import FusedBasicBlock, FusedBottleneck
from fused_resnet.nn.fold_cache import _FOLD


def _torch_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model run by torch's modules: a forward pre-hook on every conv makes each fused
    module call its modules as torch does (the same tensors, read at this call)."""
    hooks = [m.register_forward_pre_hook(lambda *_: None) for m in model.modules()
             if isinstance(m, nn.Conv2d)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return model(x)
    finally:
        for h in hooks:
            h.remove()


def _check(model: nn.Module, x: torch.Tensor, what: str) -> None:
    with torch.no_grad():
        got, want = model(x), _torch_forward(model, x)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=lambda m: f"{what}: {m}")


def _block(backend: str, cls=FusedBottleneck, channels: int = 16) -> nn.Module:
    torch.manual_seed(0)
    block = cls(channels, channels // 4 if cls is FusedBottleneck else channels,
                backend=backend).double().to(DEVICE)
    return randomize_bn(block).eval()


def _x(channels: int = 16, size: int = 6) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, channels, size, size, dtype=torch.float64, device=DEVICE)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("optimizer", ["SGD", "AdamW"])
def test_fused_optimizer_step_refolds(backend, optimizer):
    """fused=True optimizers write the parameters without moving their version counters;
    the step itself (any torch.optim optimizer's) invalidates the folds. The model stays in
    eval mode (BN frozen) while it trains, as in fine-tuning."""
    block = _block(backend)
    x = _x()
    _check(block, x, "before the step")
    try:
        opt = getattr(torch.optim, optimizer)(block.parameters(), lr=0.5, fused=True)
    except RuntimeError as e:  # torch < 2.4 has no fused optimizers on CPU
        pytest.skip(f"no fused {optimizer} here: {e}")
    versions = [p._version for p in block.parameters()]
    block(x).square().sum().backward()  # eval mode: the running statistics normalize
    opt.step()
    if [p._version for p in block.parameters()] != versions:
        pytest.skip("this torch's fused optimizer moves the version counters")
    _check(block, x, f"after a fused {optimizer} step")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_channels_sliced_off_by_views_refold(backend):
    """Pruning a bottleneck's inner channels by views of the same tensors (same address,
    same version counter) must not reuse the unpruned folds."""
    block = _block(backend)
    x = _x()
    _check(block, x, "unpruned")
    keep = 2
    with torch.no_grad():
        block.conv1.weight = nn.Parameter(block.conv1.weight[:keep])
        for name in ("weight", "bias"):
            setattr(block.bn1, name, nn.Parameter(getattr(block.bn1, name)[:keep]))
        block.bn1.running_mean = block.bn1.running_mean[:keep]
        block.bn1.running_var = block.bn1.running_var[:keep]
        block.bn1.num_features = keep
        block.conv2.weight = nn.Parameter(block.conv2.weight[:, :keep])
    _check(block, x, "inner channels sliced off")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_storage_swapped_through_data_refolds(backend):
    """torch.nn.utils.vector_to_parameters sets `p.data` to slices of a new vector (the
    version counters do not move, the old storage is freed): twice between two calls, the
    third vector can take the first's address, yet each call computes with the vector it
    was last given."""
    channels = 8 if backend == "triton" else 64  # the interpreter's tiny shapes
    block = _block(backend, FusedBasicBlock, channels=channels)
    x = _x(channels=channels)
    flat = torch.nn.utils.parameters_to_vector(block.parameters()).detach()
    for scales in ((1.0, 0.5, 0.25), (2.0, 0.75, 1.5)):
        torch.nn.utils.vector_to_parameters(flat * scales[0], block.parameters())
        _check(block, x, f"vector x {scales[0]}")
        for scale in scales[1:]:  # two assignments, no call between them
            torch.nn.utils.vector_to_parameters(flat * scale, block.parameters())
        _check(block, x, f"vector x {scales[-1]}")
    with torch.no_grad():  # the same by hand: .data = a new tensor, twice between calls
        for _ in range(2):
            block.bn2.running_var.data = block.bn2.running_var.data * 2.0
            block.bn2.running_var.data = block.bn2.running_var.data * 0.25
            _check(block, x, "running_var.data = .data * 2, then * 0.25")


def test_move_and_cast_drop_the_folds():
    """.to / .double() / .float(): the folds go with the old tensors (not kept on the old
    device or in the old dtype until the next call), and the next call is right."""
    backend = "reference" if fr.backend.unavailable_reason("cpu", torch.device("cpu")) else "cpu"
    model = fr.models.cifar_resnet(8, backend=backend).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        model(x)
        if backend == "cpu":
            assert _FOLD in model.bn1.__dict__
        model.float()
        assert all(_FOLD not in m.__dict__ for m in model.modules())
        model.double()
    _check(model, x, "after float() and double()")


def test_copies_and_pickles_carry_no_folds():
    backend = "reference" if fr.backend.unavailable_reason("cpu", torch.device("cpu")) else "cpu"
    if backend == "reference":
        pytest.skip("the reference backend folds nothing")
    model = fr.models.cifar_resnet(8, backend=backend).eval()
    cold = io.BytesIO()
    torch.save(model, cold)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
    folded = [m for m in model.modules() if _FOLD in m.__dict__]
    assert len(folded) == 7  # the stem's BN and three blocks' two
    warm = io.BytesIO()
    torch.save(model, warm)
    assert len(warm.getvalue()) <= len(cold.getvalue()) + 4096
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)),
                 torch.load(io.BytesIO(warm.getvalue()), weights_only=False)):
        assert all(m.__dict__.get(_FOLD) is None for m in twin.modules())
        with torch.no_grad():
            torch.testing.assert_close(twin(x), want, rtol=0, atol=0)
    assert all(_FOLD in m.__dict__ for m in folded)  # the original keeps its own


def test_a_bn_of_another_dtype_is_named():
    """An fp64 model called under bf16 autocast (torch errors too): the message names the
    BN's tensor, not the folded shift ("bias") the fused conv is given, and nothing is
    cached."""
    backend = "reference" if fr.backend.unavailable_reason("cpu", torch.device("cpu")) else "cpu"
    if backend == "reference":
        pytest.skip("the reference backend folds nothing")
    model = fr.models.cifar_resnet(8, backend=backend).double().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(ValueError, match="BatchNorm running_mean must be"):
            model(torch.randn(2, 3, 8, 8))
    assert all(_FOLD not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_folds_made_in_inference_mode_serve_input_gradients(backend):
    """A frozen model first called under torch.inference_mode, then asked for the gradient
    of its input (saliency maps, adversarial examples): the folds cached by the first call
    are normal tensors, which the second saves for backward."""
    block = _block(backend).requires_grad_(False)
    x = _x()
    with torch.inference_mode():
        block(x)
    xg = x.clone().requires_grad_()
    (got,) = torch.autograd.grad(block(xg).square().sum(), xg)
    xg = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(_torch_forward(block, xg).square().sum(), xg)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_input_to_a_float_block_outside_autocast_is_refused(dtype):
    """torch's conv refuses an input of another dtype than its weight outside autocast; so
    does the folded path (which would otherwise fold in the input's dtype and run in it)."""
    if fr.backend.unavailable_reason("cpu", torch.device("cpu")):
        pytest.skip("the reference backend folds nothing (torch's conv refuses)")
    for module in (FusedBottleneck(16, 4, backend="cpu"), fr.models.cifar_resnet(8, backend="cpu")):
        module.eval()
        channels = 16 if isinstance(module, FusedBottleneck) else 3
        x = torch.randn(2, channels, 8, 8, dtype=dtype)
        with torch.no_grad(), pytest.raises(
                ValueError, match=f"weight dtype torch.float32 differs from x's dtype {dtype}"):
            module(x)
        assert all(_FOLD not in m.__dict__ for m in module.modules())
