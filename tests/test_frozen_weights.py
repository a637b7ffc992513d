"""Weight gradients nobody uses are not computed, as ATen's convolution_backward leaves them
out of its mask: frozen conv weights (requires_grad=False: BN-only fine-tuning, gradients
taken through a frozen network to its input; the backward ops' `need_dw`), and weights a
backward pass does not want (`torch.autograd.grad(loss, [x])`, `backward(inputs=...)`:
`ops.grad_needs`). Each frozen weight removes exactly one
weight-gradient launch (Triton: its wgrad, or for a conv done without its output y the Gram
that only its dw needs; `_C`: ATen's mask), its .grad stays None, and every other gradient is
the one computed with all weights trainable (or the reference's)."""

import pytest
import torch
from _backends import DEVICE, FUSED_BACKENDS, skip_without_triton
from _block_cases import BLOCKS, block_args, kernels_or_skip
from torch.utils.flop_counter import FlopCounterMode

import fused_resnet as fr
from fused_resnet.testing import assert_close

OPS = torch.ops.fused_resnet


def _freeze_patterns(weights, shortcut):
    """Index sets of the weights to freeze: the first, the last main conv, the projection,
    and all."""
    main = len(weights) - (shortcut == "projection")
    patterns = {(0,), (main - 1,), (len(weights) - 1,), tuple(range(len(weights)))}
    return sorted(patterns)


def _recording_weight_gradients(monkeypatch):
    """A list of the weight gradients the fused backwards compute: one entry per Triton
    wgrad launch (the conv and block ops; conv 3 or a projection done without its y launches
    it twice: G = g^T a, which their BN's backward needs frozen or not, then the Gram, which
    only dw needs) or per ATen backward asked for one."""
    import fused_resnet.ops.native_block as native_block
    import fused_resnet.ops.native_kernels as native_kernels
    import fused_resnet.ops.triton_block as triton_block
    import fused_resnet.ops.triton_kernels as triton_kernels

    computed = []

    def wgrad_recorder(inner):
        def recording(x, dy, weight_shape, **kwargs):
            computed.append(tuple(weight_shape))
            return inner(x, dy, weight_shape, **kwargs)
        return recording

    def aten_recorder(inner):
        def recording(dy, x, weight, *args):
            if len(args) < 6 or args[5]:  # need_dw
                computed.append(tuple(weight.shape))
            return inner(dy, x, weight, *args)
        return recording

    for module in (triton_block, triton_kernels):
        monkeypatch.setattr(module, "conv_wgrad", wgrad_recorder(module.conv_wgrad))
    for module in (native_block, native_kernels):
        monkeypatch.setattr(module, "conv_backward", aten_recorder(module.conv_backward))
    return computed


@pytest.mark.parametrize("kernels", ["native", "triton"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_op_skips_frozen_weight_gradients(name, kernels, monkeypatch):
    kernels_or_skip(kernels)
    from fused_resnet.ops.block_ops import block_train_call

    computed = _recording_weight_gradients(monkeypatch)
    args = block_args(name)
    dz = None

    def run(frozen, x_grad=True):
        """(leaves' grads, weight gradients computed) of the custom op and its eager twin."""
        nonlocal dz
        x = args[0].detach().requires_grad_(x_grad)
        leaves = [[t.detach().clone().requires_grad_() for t in ts] for ts in args[1:4]]
        for i in frozen:
            leaves[0][i].requires_grad_(False)
        computed.clear()
        for call in (OPS.block_train, block_train_call):
            z = call(x, *leaves, *args[4:], kernels)[0]
            dz = torch.linspace(-1, 1, z.numel(), device=DEVICE).view_as(z) if dz is None else dz
            z.backward(dz)
        return [x.grad] + [t.grad for ts in leaves for t in ts], len(computed)

    base, base_count = run(())
    weights = args[1]
    assert base_count >= 2 * len(weights)  # at least one each, two calls
    for frozen in _freeze_patterns(weights, args[8]):
        for x_grad in (True, False):
            grads, count = run(frozen, x_grad)
            assert count == base_count - 2 * len(frozen), (frozen, x_grad)
            for j, (got, want) in enumerate(zip(grads, base)):
                if j - 1 in frozen or (j == 0 and not x_grad):  # x, then the weights
                    assert got is None, (frozen, j)
                else:
                    assert_close(got, want, kind="grad", name=f"grad {j} with {frozen} frozen")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_conv_op_skips_a_frozen_weights_gradient(training, backend, monkeypatch):
    """conv + BN (+ residual) + ReLU, in training (batch statistics) and in eval (BN folded:
    `conv_bias_act`, whose weight w * gamma / sqrt(var + eps) needs a gradient while gamma
    trains, so gamma is frozen too), with its weight frozen: no weight gradient; the other
    gradients equal the reference's."""
    import fused_resnet.ops.native_kernels as native
    import fused_resnet.ops.triton_kernels as triton_kernels

    def no_wgrad(*args, **kwargs):
        raise AssertionError("the weight gradient was computed")

    monkeypatch.setattr(triton_kernels, "conv_wgrad", no_wgrad)
    aten_backward, masks = native.conv_backward, []

    def recording_backward(*args):
        masks.append(args[7:])
        return aten_backward(*args)

    monkeypatch.setattr(native, "conv_backward", recording_backward)
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(2, 4, 9, 9, generator=g), torch.randn(2, 8, 5, 5, generator=g)
    w = torch.randn(8, 4, 3, 3, generator=g) * 0.3
    gamma, beta = torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
    mean, var = torch.randn(8, generator=g) * 0.1, torch.rand(8, generator=g) + 0.5
    kwargs = {"stride": 2, "padding": 1, "training": training, "relu": True}
    grads, frozen = {}, (1,) if training else (1, 2)
    for run in (backend, "reference"):
        leaves = [t.clone().to(DEVICE).requires_grad_(i not in frozen)
                  for i, t in enumerate((x, w, gamma, beta, r))]
        out = fr.ops.conv_bn_act(*leaves[:4], mean.clone().to(DEVICE), var.clone().to(DEVICE),
                                 residual=leaves[4], backend=run, **kwargs)
        out.backward(torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out))
        assert all(leaves[i].grad is None for i in frozen)
        grads[run] = [t.grad for t in leaves]
    if backend != "triton":
        assert masks == [(True, False)]
    for name, got, want in zip(("x", "w", "gamma", "beta", "residual"), *grads.values()):
        if want is not None:
            assert_close(got, want, kind="grad", name=f"d{name}")


@pytest.mark.parametrize("x_grad", [True, False], ids=["dx", "no_dx"])
def test_stem_op_skips_a_frozen_weights_gradient(x_grad, monkeypatch):
    """The fused stem (conv 7x7 + BN + ReLU + max-pool) with its weight frozen: no weight
    gradient, and the BN's and x's gradients equal the reference's (fp64). Without x's
    either (an input image), only the BN's: no dy is made."""
    skip_without_triton()
    import fused_resnet.triton.conv_bwd as conv_bwd
    import fused_resnet.triton.pool as pool

    def no_wgrad(*args, **kwargs):
        raise AssertionError("the weight gradient was computed")

    def no_dy(*args, **kwargs):
        raise AssertionError("dy was made")

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 20, 20, generator=g, dtype=torch.float64)
    w = torch.randn(8, 3, 7, 7, generator=g, dtype=torch.float64) * 0.2
    gamma = torch.rand(8, generator=g, dtype=torch.float64) + 0.5
    beta = torch.randn(8, generator=g, dtype=torch.float64)
    grads = {}
    for backend in ("reference", "triton"):
        if backend == "triton":
            monkeypatch.setattr(conv_bwd, "conv_wgrad", no_wgrad)
            if not x_grad:
                monkeypatch.setattr(pool, "max_pool_bn_bwd", no_dy)
        leaves = [t.clone().to(DEVICE).requires_grad_(i != 1 and (i > 0 or x_grad))
                  for i, t in enumerate((x, w, gamma, beta))]
        stats = [torch.zeros(8, dtype=torch.float64, device=DEVICE),
                 torch.ones(8, dtype=torch.float64, device=DEVICE)]
        out = fr.ops.conv_bn_relu_max_pool(*leaves, *stats, backend=backend)
        out.backward(torch.linspace(-1, 1, out.numel(), device=DEVICE,
                                    dtype=out.dtype).view_as(out))
        grads[backend] = [leaves[0].grad, leaves[1].grad, leaves[2].grad, leaves[3].grad]
    assert grads["triton"][1] is None and (grads["triton"][0] is None) == (not x_grad)
    for i in (0, 2, 3) if x_grad else (2, 3):
        torch.testing.assert_close(grads["triton"][i], grads["reference"][i], rtol=1e-10,
                                   atol=1e-10)


def _cifar_pair(backend):
    """(reference, fused) CIFAR ResNet-8s with projections (option B), same weights, and a
    channels_last batch of 4 8x8 images."""
    torch.manual_seed(0)
    reference = fr.models.cifar_resnet(8, shortcut="B", backend="reference").to(DEVICE)
    fused = fr.models.cifar_resnet(8, shortcut="B", backend=backend).to(DEVICE)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(4, 3, 8, 8, device=DEVICE).contiguous(memory_format=torch.channels_last)
    return reference, fused, x


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_bn_only_fine_tuning_matches_the_reference_and_counts_as_torch(backend):
    """A CIFAR ResNet-8 with projections, every conv and the fc frozen, BNs trained: the BN
    gradients equal the reference model's, the convs get none, and FlopCounterMode counts
    what it counts for torch's layers (no weight gradient of a frozen conv)."""
    reference, fused, x = _cifar_pair(backend)
    for model in (reference, fused):
        for name, p in model.named_parameters():  # the BNs' gamma and beta
            p.requires_grad_(p.dim() == 1 and not name.startswith("fc"))
    counts = []
    for model in (reference, fused):
        with FlopCounterMode(display=False) as counter:
            model(x).square().mean().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1]
    trained = 0
    for (name, p), q in zip(fused.named_parameters(), reference.parameters()):
        if not p.requires_grad:
            assert p.grad is None, name
            continue
        trained += 1
        assert_close(p.grad, q.grad, kind="grad", name=name)
    assert trained > 0
    for a, b in zip(fused.buffers(), reference.buffers()):  # running stats alike
        if a.is_floating_point():
            assert_close(a, b, name="buffer")


def test_the_backward_ops_take_need_dw_with_a_default():
    """Schema: one flag per weight in the block op, one in the conv and stem ops, each with a
    default that computes every weight gradient, so that a backward graph torch.compile cached
    before need_dw existed (it calls the op without it) still runs."""
    schema = str(OPS.block_train_backward.default._schema)
    assert "bool need_dx, bool[]? need_dw=None)" in schema
    names = ["conv_bn_train_backward", "conv_bias_act_backward"]
    names += ["stem_train_backward"] if hasattr(OPS, "stem_train_backward") else []
    for name in names:
        assert "bool need_dx, bool need_dw=True)" in str(getattr(OPS, name).default._schema)


@pytest.mark.parametrize("kernels", ["native", "triton"])
def test_a_backward_called_without_need_dw_computes_every_weight_gradient(kernels):
    """The call an older cached backward graph makes: no need_dw argument."""
    kernels_or_skip(kernels)
    args = block_args("bottleneck projection")
    z, mask, ys, means, _, affines = OPS.block_train(*args, kernels)
    x, weights, gammas, betas, *rest = (a.detach() if torch.is_tensor(a) else a for a in args)
    detach = [[t.detach() for t in ts] for ts in (weights, gammas, betas)]
    bwd_args = (torch.randn_like(z), x, mask if mask.numel() else z.detach(), *detach, ys,
                means, affines, *rest, kernels, True)
    old = OPS.block_train_backward(*bwd_args)
    new = OPS.block_train_backward(*bwd_args, [True] * len(weights))
    for got, want in zip(old[1], new[1]):
        assert got.shape == want.shape
        assert_close(got, want, kind="grad")
    w = torch.randn(8, 4, 3, 3, device=DEVICE)
    gamma = torch.rand(8, device=DEVICE) + 0.5
    x = torch.randn(2, 4, 6, 6, device=DEVICE)
    z, y, mean, var = OPS.conv_bn_train(x, w, gamma, torch.zeros_like(gamma), None, 1, 1, 1, 1,
                                        1e-5, True, kernels)
    dw = OPS.conv_bn_train_backward(torch.randn_like(z), x, w, gamma, y, z, mean, var, 1, 1, 1,
                                    1, 1e-5, True, False, kernels, True)[1]
    assert dw.shape == w.shape


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_a_pass_that_wants_the_input_gradient_computes_no_weight_gradient(backend, train,
                                                                          monkeypatch):
    """torch.autograd.grad(loss, [x]) (an adversarial attack's step, a saliency map) uses no
    weight gradient: like ATen's conv backward, the fused ones skip them (`ops.grad_needs`)
    and x's gradient equals the reference's. A later .backward() of the same graph
    (retain_graph) computes them all, as the reference's."""
    computed = _recording_weight_gradients(monkeypatch)
    reference, fused, x = _cifar_pair(backend)
    losses, grads = [], []
    for model in (fused, reference):
        model.train(train)
        xi = x.clone().requires_grad_()
        losses.append(model(xi).logsumexp(1).sum())
        computed.clear()
        grads.append(torch.autograd.grad(losses[-1], [xi], retain_graph=True)[0])
        if model is fused:
            # Triton's projection blocks without y_d still reduce G = g^T x for their BN
            # (`_shortcut_bn_backward_without_y`): one launch each, never a weight's dw
            assert len(computed) == (2 if backend == "triton" and train else 0), computed
        assert all(p.grad is None for p in model.parameters())
    assert_close(grads[0], grads[1], kind="grad", name="dx")
    for loss in losses:
        loss.backward()
    for (name, p), q in zip(fused.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, kind="grad", name=name)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_backward_with_inputs_computes_only_those_weight_gradients(backend, monkeypatch):
    """loss.backward(inputs=[...]): only the listed weights' gradients are computed."""
    computed = _recording_weight_gradients(monkeypatch)
    reference, fused, x = _cifar_pair(backend)
    for model in (fused, reference):
        wanted = [model.layer3[0].conv2.weight, model.layer3[0].bn1.weight, model.conv1.weight]
        computed.clear()
        model(x).square().mean().backward(inputs=wanted)
        if model is fused:  # conv2's and conv1's, and on Triton each projection's G = g^T x
            projections = [model.layer2[0].downsample[0].weight,
                           model.layer3[0].downsample[0].weight] if backend == "triton" else []
            assert sorted(computed) == sorted(tuple(w.shape) for w in
                                              [wanted[0], wanted[2], *projections])
    for (name, p), q in zip(fused.named_parameters(), reference.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert_close(p.grad, q.grad, kind="grad", name=name)
