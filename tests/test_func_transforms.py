"""torch.func transforms, forward-mode AD and torch.jit.trace over fused nets. Fused ops
are autograd Functions without functorch rules or a jvp and Triton launches a tracer does
not record, so under a torch.func transform (grad, vmap, jvp, ...) or inside a
forward_ad.dual_level the blocks and the stem call their modules as torch does (warned),
and while torch.jit.trace records they do so too (a TorchScript graph of aten convs and
batch norms). `torch.func.functional_call` alone is no transform: it keeps the fused ops,
with the tensors it is given. fp64: differences are bugs (the transformed
results are compared with the fused path's own autograd results)."""

import copy
import warnings

import pytest
import torch
from _backends import DEVICE, FUSED_BACKENDS
from torch import nn

import fused_resnet as fr
from fused_resnet.nn import module_calls

BACKENDS = [*FUSED_BACKENDS, "reference"]


def _net(backend: str, seed: int = 0) -> nn.Module:
    """A CIFAR ResNet-8 (stem, identity and option-A blocks) with random BN affines."""
    torch.manual_seed(seed)
    model = fr.models.cifar_resnet(depth=8, backend=backend).double().to(DEVICE)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _data(n: int = 3):
    torch.manual_seed(1)
    x = torch.randn(n, 3, 8, 8, dtype=torch.float64, device=DEVICE)
    return x, torch.randint(0, 10, (n,), device=DEVICE)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_transform_reason_only_under_a_transform():
    seen = []

    def probe(x):
        seen.append(module_calls.transform_reason())
        return x.sum()

    assert module_calls.transform_reason() is None
    torch.func.grad(probe)(torch.ones(2))
    torch.func.vmap(probe)(torch.ones(2, 2))
    assert all(r is not None and "torch.func" in r for r in seen) and len(seen) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_func_grad_equals_autograd_in_eval(backend):
    model = _net(backend).eval()
    x, y = _data()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p):
        out = torch.func.functional_call(model, p, (x,))
        return nn.functional.cross_entropy(out, y)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grads = torch.func.grad(loss)(params)
    if backend != "reference":
        assert any("torch.func transform" in str(w.message) for w in caught)
    nn.functional.cross_entropy(model(x), y).backward()  # the fused ops' own backward
    assert grads.keys() == dict(model.named_parameters()).keys()
    for name, p in model.named_parameters():
        _close(grads[name], p.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_grads_without_running_stats(backend):
    """Opacus-style per-sample gradients: BN without running stats
    (`replace_all_batch_norm_modules_`, as torch.func's docs advise), vmap over grad of one
    sample each; equal to the fused training path's gradient of each sample alone."""
    model = _net(backend)
    torch.func.replace_all_batch_norm_modules_(model)
    x, y = _data()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        out = torch.func.functional_call(model, p, (xi[None].expand(2, -1, -1, -1),))
        return nn.functional.cross_entropy(out, yi[None].expand(2))

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(x.shape[0]):
        model.zero_grad()
        two = x[i:i + 1].expand(2, -1, -1, -1).contiguous()
        nn.functional.cross_entropy(model(two), y[i:i + 1].expand(2)).backward()
        for name, p in model.named_parameters():
            _close(per_sample[name][i], p.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmapped_ensemble_equals_each_model(backend):
    """torch.func's model-ensembling recipe: stacked states, a meta copy, vmap over
    functional_call, in eval mode."""
    models = [_net(backend, seed).eval() for seed in range(3)]
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x, _ = _data()
    out = torch.func.vmap(lambda p, b: torch.func.functional_call(base, (p, b), (x,)))(
        params, buffers)
    for i, model in enumerate(models):
        _close(out[i], model(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_call_keeps_the_fused_ops_and_given_tensors(backend):
    """functional_call is no transform: no warning, the fused path, and the tensors given
    (not the module's own, nor folds cached from them) in eval; running stats given are
    the ones updated in training."""
    model, twin = _net(backend), _net("reference")
    x, _ = _data()
    params = {k: v.detach() * 1.25 for k, v in model.named_parameters()}
    for mode in ("eval", "train"):
        model.train(mode == "train"), twin.train(mode == "train")
        model(x)  # in eval: folds of the module's own tensors cached
        buffers = {k: v.clone() for k, v in model.named_buffers()}
        twin_buffers = {k: v.clone() for k, v in model.named_buffers()}
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "runs unfused"
            out = torch.func.functional_call(model, (params, buffers), (x,))
        _close(out, torch.func.functional_call(twin, (params, twin_buffers), (x,)))
        for name in buffers:
            _close(buffers[name].double(), twin_buffers[name].double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_jit_trace_records_standard_layers(backend, channels_last):
    model = _net(backend).eval()
    x, _ = _data()
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, x)  # check_trace runs it again and compares graphs
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert "aten::_convolution" in kinds and "aten::batch_norm" in kinds
    assert not any(kind.startswith("fused_resnet::") for kind in kinds)
    x2 = torch.randn(5, 3, 8, 8, dtype=torch.float64, device=DEVICE)
    _close(traced(x2), model(x2))
    with torch.no_grad():  # the trace reads the parameters, not constants folded from them
        model.layer1[0].bn1.weight.mul_(2)
    _close(traced(x2), model(x2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_ad_equals_the_reference(backend):
    """torch.autograd.forward_ad's dual tensors and torch.func.jvp: the fused ops have no
    jvp, so inside a dual level the modules are called as torch does."""
    import torch.autograd.forward_ad as fwad

    model, twin = _net(backend).eval(), _net("reference").eval()
    x, _ = _data()
    tangent = torch.randn_like(x)
    with fwad.dual_level():
        assert module_calls.transform_reason() is not None
        dual = fwad.unpack_dual(model(fwad.make_dual(x, tangent)))
    assert module_calls.transform_reason() is None
    with fwad.dual_level():
        expected = fwad.unpack_dual(twin(fwad.make_dual(x, tangent)))
    _close(dual.primal, expected.primal)
    _close(dual.tangent, expected.tangent)
    out, jvp = torch.func.jvp(model, (x,), (tangent,))
    _close(out, expected.primal)
    _close(jvp, expected.tangent)
