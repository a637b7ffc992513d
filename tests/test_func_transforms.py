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
            warnings.filterwarnings("error", message=".*(runs unfused|reference ops)")
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


def _op_calls():
    """fr.ops calls of (x, p: a dict of tensors, backend): training ones without running
    stats (a transform refuses in-place updates of captured tensors, as for torch's BN)."""
    bn = ("bn_w", "bn_b")
    return {
        "conv_bn_act train": lambda x, p, b: fr.ops.conv_bn_act(
            x, p["w"], p["bn_w"], p["bn_b"], None, None, padding=1, backend=b),
        "conv_bn_act eval": lambda x, p, b: fr.ops.conv_bn_act(
            x, p["w"], p["bn_w"], p["bn_b"], p["mean"], p["var"], padding=1,
            training=False, backend=b),
        "conv_bias_act": lambda x, p, b: fr.ops.conv_bias_act(
            x, p["w"], p["bn_b"], padding=1, residual=x, backend=b),
        "bn_add_relu": lambda x, p, b: fr.ops.bn_add_relu(x, *(p[k] for k in bn), x, backend=b),
        "max_pool2d": lambda x, p, b: fr.ops.max_pool2d(x * p["bn_w"][:, None, None],
                                                        backend=b),
        "conv_bn_relu_max_pool": lambda x, p, b: fr.ops.conv_bn_relu_max_pool(
            x, p["w"], p["bn_w"], p["bn_b"], None, None, stride=1, padding=1, backend=b),
        "residual_block_train": lambda x, p, b: fr.ops.residual_block_train(
            x, [p["w"], p["w2"]], [p["bn_w"]] * 2, [p["bn_b"]] * 2, [None] * 2, [None] * 2,
            strides=[1, 1], paddings=[1, 1], momenta=[0.1] * 2, eps=[1e-5] * 2,
            shortcut="identity", backend=b),
        "residual_block_eval": lambda x, p, b: fr.ops.residual_block_eval(
            x, [p["w"], p["w2"]], [p["bn_b"]] * 2, strides=[1, 1], paddings=[1, 1],
            shortcut="identity", backend=b),
        "bottleneck_eval": lambda x, p, b: fr.ops.bottleneck_eval(
            x, [p["w1"], p["w"], p["w3"]], [p["bn_b"], p["bn_b"], p["b3"]], backend=b),
    }


def _op_tensors():
    torch.manual_seed(2)
    d = dict(dtype=torch.float64, device=DEVICE)
    x = torch.randn(2, 4, 6, 6, **d)
    p = {"w": torch.randn(4, 4, 3, 3, **d) / 6, "w2": torch.randn(4, 4, 3, 3, **d) / 6,
         "w1": torch.randn(4, 4, 1, 1, **d) / 2, "w3": torch.randn(4, 4, 1, 1, **d) / 2,
         "bn_w": torch.rand(4, **d) + 0.5, "bn_b": torch.randn(4, **d) / 4,
         "b3": torch.randn(4, **d) / 4, "mean": torch.randn(4, **d) / 4,
         "var": torch.rand(4, **d) + 0.5}
    return x, p


@pytest.mark.parametrize("op", list(_op_calls()))
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_functional_ops_run_the_reference_under_transforms(backend, op):
    """fr.ops under torch.func.grad and forward-mode AD: the reference ops run (warned),
    whatever backend is named, and give the reference's autograd results."""
    call = _op_calls()[op]
    x, p = _op_tensors()
    grads = {k for k in p if k not in ("mean", "var")}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.func.grad(lambda xx, pp: call(xx, p | pp, backend).square().sum(),
                              argnums=(0, 1))(x, {k: p[k] for k in grads})
    assert any("runs on the reference ops" in str(w.message) for w in caught)
    leaves = {k: v.clone().requires_grad_(k in grads) for k, v in p.items()}
    xr = x.clone().requires_grad_()
    expected = torch.autograd.grad(call(xr, leaves, "reference").square().sum(),
                                   [xr] + [leaves[k] for k in sorted(grads)], allow_unused=True)
    _close(got[0], expected[0])
    for k, e in zip(sorted(grads), expected[1:]):
        _close(got[1][k], torch.zeros_like(p[k]) if e is None else e)
    tangent = torch.randn_like(x)
    out, jvp = torch.func.jvp(lambda xx: call(xx, p, backend), (x,), (tangent,))
    ref_out, ref_jvp = torch.func.jvp(lambda xx: call(xx, p, "reference"), (x,), (tangent,))
    _close(out, ref_out)
    _close(jvp, ref_jvp)


def test_sync_ops_refuse_transforms_and_change_nothing():
    """The synchronized BN's all_reduces have no functorch rules (nor have torch's
    nn.SyncBatchNorm's): refused by name before anything runs."""
    x, p = _op_tensors()
    mean, var = p["mean"].clone(), p["var"].clone()
    calls = {
        "sync_batch_norm": lambda xx: fr.ops.sync_batch_norm(
            xx, p["bn_w"], p["bn_b"], mean, var, momentum=0.1, eps=1e-5, group=None),
        "sync_conv_bn_act": lambda xx: fr.ops.sync_conv_bn_act(
            xx, p["w"], p["bn_w"], p["bn_b"], mean, var, stride=1, padding=1, groups=1,
            momentum=0.1, eps=1e-5, residual=None, relu=True, group=None),
    }
    for call in calls.values():
        with pytest.raises(NotImplementedError, match="torch.func transform"):
            torch.func.grad(lambda xx, f=call: f(xx).sum())(x)
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            _dual_call(call, x)
    torch.testing.assert_close(mean, p["mean"], rtol=0, atol=0)
    torch.testing.assert_close(var, p["var"], rtol=0, atol=0)


def _dual_call(call, x):
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        return call(fwad.make_dual(x, torch.ones_like(x)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_transforms_equal_eager_torchvision(backend):
    """torch.compile around torch.func.grad / jvp over a fused block (and over fr.ops):
    the transform is seen while dynamo traces, and the results are torch's (they were
    zeros when the fused ops ran inside the traced transform)."""
    import torchvision

    torch.manual_seed(0)
    block = fr.nn.FusedBasicBlock(4, 4, backend=backend).double().to(DEVICE).eval()
    with torch.no_grad():
        block.bn1.weight.uniform_(0.5, 1.5), block.bn2.bias.uniform_(-0.5, 0.5)
    twin = torchvision.models.resnet.BasicBlock(4, 4).double().to(DEVICE).eval()
    twin.load_state_dict(block.state_dict())
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, device=DEVICE)
    params = {k: v.detach() for k, v in block.named_parameters()}

    def loss(p, module, xx):
        return torch.func.functional_call(module, p, (xx,)).square().sum()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "runs unfused" (it breaks the compiled graph)
        got = torch.compile(lambda p, xx: torch.func.grad(loss)(p, block, xx),
                            backend="aot_eager")(params, x)
        tangent = torch.compile(lambda xx: torch.func.jvp(block, (xx,), (xx,))[1],
                                backend="aot_eager")(x)
        _, op_p = _op_tensors()
        op = _op_calls()["conv_bn_act eval"]
        op_x = torch.randn(2, 4, 6, 6, dtype=torch.float64, device=DEVICE)
        op_tangent = torch.compile(lambda xx: torch.func.jvp(
            lambda t: op(t, op_p, backend), (xx,), (xx,))[1], backend="aot_eager")(op_x)
    expected = torch.func.grad(loss)(params, twin, x)
    for name in expected:
        _close(got[name], expected[name])
    _close(tangent, torch.func.jvp(twin, (x,), (x,))[1])
    _close(op_tangent, torch.func.jvp(lambda t: op(t, op_p, "reference"), (op_x,), (op_x,))[1])
