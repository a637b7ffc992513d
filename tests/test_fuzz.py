"""Property-based fuzzing (hypothesis) of the fused ops, the stem and the blocks against the
reference, on every backend that runs here: random shapes, kernel / stride / padding, batch,
residual, ReLU, train / eval, dtype, memory format, pool window. Bounded example counts keep
CI in time (the Triton interpreter is slow: shapes stay tiny); `pytest --fuzz-long` runs 20x
more, unseeded, for the GPU machine. The number of cases tried per backend is printed in
pytest's summary."""

import copy
import os
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fused_resnet import ops
from fused_resnet.nn import FusedBasicBlock, FusedBottleneck
from tests._backends import DEVICE, backend_param
from tests._report import record

LONG = os.environ.get("FUSED_RESNET_FUZZ_LONG") == "1"
EXAMPLES = {"triton": 30, "cpu": 80, "cuda": 80}
STEM_EXAMPLES = {"triton": 20, "cpu": 60, "cuda": 60}
BACKENDS = [backend_param("triton"), backend_param("cuda" if DEVICE == "cuda" else "cpu")]
TRIED: Counter = Counter()


def _settings(backend: str, examples: dict = EXAMPLES):
    n = examples[backend] * (20 if LONG else 1)
    return settings(max_examples=n, deadline=None, derandomize=not LONG, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _dtypes(backend):
    if backend == "triton" and DEVICE == "cpu":
        return [torch.float32, torch.float64]  # the interpreter's exact dots
    return [torch.float32, torch.float64] if DEVICE == "cpu" else [torch.float32]


@st.composite
def conv_cases(draw, dtypes):
    k = draw(st.sampled_from([1, 3, 5, 7]))
    case = dict(
        n=draw(st.integers(1, 3)), c_in=draw(st.integers(1, 9)), c_out=draw(st.integers(1, 9)),
        h=draw(st.integers(1, 9)), w=draw(st.integers(1, 9)), k=k,
        stride=draw(st.integers(1, 2)), padding=draw(st.integers(0, k // 2 + 1)),
        residual=draw(st.booleans()), relu=draw(st.booleans()), training=draw(st.booleans()),
        channels_last=draw(st.booleans()), dtype=draw(st.sampled_from(dtypes)),
        seed=draw(st.integers(0, 2**16)))
    ho = (case["h"] + 2 * case["padding"] - k) // case["stride"] + 1
    wo = (case["w"] + 2 * case["padding"] - k) // case["stride"] + 1
    assume(ho >= 1 and wo >= 1)
    assume(not case["training"] or case["n"] * ho * wo > 1)
    return case, (case["n"], case["c_out"], ho, wo)


def _run(backend, case, out_shape):
    g = torch.Generator().manual_seed(case["seed"])
    dt = case["dtype"]

    def rand(*shape, positive=False):
        t = torch.rand(*shape, generator=g, dtype=dt) + 0.5 if positive else torch.randn(
            *shape, generator=g, dtype=dt)
        return t.to(DEVICE)

    fmt = torch.channels_last if case["channels_last"] else torch.contiguous_format
    x = rand(case["n"], case["c_in"], case["h"], case["w"]).contiguous(memory_format=fmt)
    w = rand(case["c_out"], case["c_in"], case["k"], case["k"])
    gamma, beta = rand(case["c_out"], positive=True), rand(case["c_out"])
    mean, var = rand(case["c_out"]), rand(case["c_out"], positive=True)
    r = rand(*out_shape) if case["residual"] else None
    dz = rand(*out_shape)
    if dt == torch.float32:
        def fp64():
            ops.conv_bn_act(*(t.double() for t in (x, w, gamma, beta, mean, var)),
                            stride=case["stride"], padding=case["padding"],
                            training=case["training"], relu=case["relu"], backend="reference",
                            residual=None if r is None else r.double())
        assume(_decision_margin(fp64) > DECISION_MARGIN)
    results = []
    for name in (backend, "reference"):
        xs, ws, gs, bs = (t.clone().requires_grad_() for t in (x, w, gamma, beta))
        ms, vs = mean.clone(), var.clone()
        out = ops.conv_bn_act(xs, ws, gs, bs, ms, vs, stride=case["stride"],
                              padding=case["padding"], training=case["training"],
                              residual=r, relu=case["relu"], backend=name)
        out.backward(dz)
        results.append((out.detach(), ms, vs, xs.grad, ws.grad, gs.grad, bs.grad))
    return results


def _decision_margin(run_fp64) -> float:
    """The smallest |input| / max |input| of any ReLU the reference meets in `run_fp64()` (a
    run in fp64), and the smallest gap between a max-pool window's two largest values over
    the pool input's max |value| (windows whose max is positive): where either is under
    ~1e-5, fp32 rounding may put that element on the other side of 0 (or make the other
    element the window's max) in one computation and not the other, and its gradient with it
    (a decision, not an error: the op tests compare gradients at the fused output's
    decisions)."""
    seen = [float("inf")]
    relus = torch.nn.functional.relu, torch.relu
    pool = torch.nn.functional.max_pool2d

    def spy(real):
        def relu(t, *args, **kwargs):
            if t.numel():
                seen.append((t.abs().min() / t.abs().max().clamp_min(1e-300)).item())
            return real(t, *args, **kwargs)
        return relu

    def pool_spy(t, kernel_size, stride=None, padding=0, *args, **kwargs):
        seen.append(_pool_tie_margin(t, kernel_size, stride or kernel_size, padding))
        return pool(t, kernel_size, stride, padding, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "relu", spy(relus[0]))
        patch.setattr(torch, "relu", spy(relus[1]))
        patch.setattr(torch.nn.functional, "max_pool2d", pool_spy)
        run_fp64()
    return min(seen)


def _pool_tie_margin(t, kernel_size: int, stride: int, padding: int) -> float:
    """min over the windows of max_pool2d(t) whose max is positive of (largest - second
    largest) / max |t|; inf where no window has two values or a positive max."""
    if t.numel() == 0 or kernel_size < 2:
        return float("inf")
    padded = torch.nn.functional.pad(t, (padding,) * 4, value=float("-inf"))
    n, c = t.shape[:2]
    windows = torch.nn.functional.unfold(padded, kernel_size, stride=stride)
    top = windows.view(n, c, kernel_size * kernel_size, -1).topk(2, dim=2).values
    gap = (top[:, :, 0] - top[:, :, 1])[top[:, :, 0] > 0]
    if gap.numel() == 0:
        return float("inf")
    return (gap.min() / t.abs().max().clamp_min(1e-300)).item()


DECISION_MARGIN = 1e-5  # fp32 cases closer to a ReLU or max-pool decision are not compared


def test_decision_margin_sees_relu_inputs_and_pool_ties():
    """The screening itself: a pre-activation near 0 and a pool window's near tie each give a
    margin under DECISION_MARGIN; a plain random case does not."""
    w = torch.ones(1, 1, 1, 1, dtype=torch.float64)

    def margin(x):
        stats = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
        return _decision_margin(lambda: ops.conv_bn_relu_max_pool(
            x, w, None, None, *stats, stride=1, padding=0, training=False,
            backend="reference"))

    x = torch.arange(1.0, 26.0, dtype=torch.float64).view(1, 1, 5, 5)
    assert margin(x) > DECISION_MARGIN
    near_zero = x.clone()
    near_zero[0, 0, 0, 0] = 1e-8
    tie = x.clone()
    tie[0, 0, 4, 3] = 25 - 1e-7  # beside the last 3x3 / 2 window's max (25, the corner)
    assert margin(near_zero) < DECISION_MARGIN
    assert margin(tie) < DECISION_MARGIN


def _close(a, b, what, dtype, grad=False):
    tol = (1e-3 if grad else 1e-4) if dtype == torch.float32 else 1e-9
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_conv_bn_act_against_the_reference(backend):
    @_settings(backend)
    @given(conv_cases(_dtypes(backend)))
    def check(drawn):
        case, out_shape = drawn
        TRIED[(backend, "conv_bn_act")] += 1
        got, expected = _run(backend, case, out_shape)
        names = ("output", "running_mean", "running_var", "dx", "dw", "dgamma", "dbeta")
        for name, a, b in zip(names, got, expected):
            _close(a, b, f"{name} {case}", case["dtype"], grad=name.startswith("d"))

    check()
    tried = TRIED[(backend, "conv_bn_act")]
    record("fuzz cases tried per backend",
           f"{backend} conv_bn_act: {tried} (derandomized: {not LONG})")


@st.composite
def stem_cases(draw, dtypes):
    """The stem's conv -> BN -> ReLU -> max-pool with any conv and pool window (padding at
    most half the pool's kernel, as ATen requires) on an input the pool's window fits."""
    k, pk = draw(st.sampled_from([1, 3, 5, 7])), draw(st.integers(1, 3))
    case = dict(
        n=draw(st.integers(1, 2)), c_in=draw(st.integers(1, 4)), c_out=draw(st.integers(1, 9)),
        h=draw(st.integers(1, 12)), w=draw(st.integers(1, 12)), k=k,
        stride=draw(st.integers(1, 2)), padding=draw(st.integers(0, k // 2)),
        pool=(pk, draw(st.integers(1, 3)), draw(st.integers(0, pk // 2))),
        affine=draw(st.booleans()), running=draw(st.booleans()),
        x_grad=draw(st.booleans()), training=draw(st.booleans()),
        channels_last=draw(st.booleans()), dtype=draw(st.sampled_from(dtypes)),
        seed=draw(st.integers(0, 2**16)))
    assume(min(case["h"], case["w"]) + 2 * case["padding"] >= k)
    ho, wo = ((size + 2 * case["padding"] - k) // case["stride"] + 1
              for size in (case["h"], case["w"]))
    assume(min(ho, wo) + 2 * case["pool"][2] >= pk)
    assume(case["running"] or case["training"])  # inference needs the running stats
    assume(not case["training"] or case["n"] * ho * wo > 1)
    return case


def _run_stem(backend, case):
    g = torch.Generator().manual_seed(case["seed"])
    dt, c = case["dtype"], case["c_out"]

    def rand(*shape, positive=False):
        t = torch.randn(*shape, generator=g, dtype=dt)
        return (t.abs() + 0.5 if positive else t).to(DEVICE)

    fmt = torch.channels_last if case["channels_last"] else torch.contiguous_format
    x = rand(case["n"], case["c_in"], case["h"], case["w"]).contiguous(memory_format=fmt)
    w = rand(c, case["c_in"], case["k"], case["k"])
    gamma, beta = rand(c, positive=True), rand(c)
    mean, var = rand(c), rand(c, positive=True)
    pk, ps, pp = case["pool"]
    if dt == torch.float32:
        def fp64():
            affine = (gamma, beta) if case["affine"] else (None, None)
            ops.conv_bn_relu_max_pool(
                *(t if t is None else t.double() for t in (x, w, *affine, mean, var)),
                stride=case["stride"], padding=case["padding"], training=case["training"],
                pool_kernel=pk, pool_stride=ps, pool_padding=pp, backend="reference")
        assume(_decision_margin(fp64) > DECISION_MARGIN)
    results = []
    for name in (backend, "reference"):
        xs = x.clone().requires_grad_(case["x_grad"])
        ws = w.clone().requires_grad_()
        gs, bs = (t.clone().requires_grad_() if case["affine"] else None for t in (gamma, beta))
        ms, vs = (t.clone() if case["running"] else None for t in (mean, var))
        out = ops.conv_bn_relu_max_pool(
            xs, ws, gs, bs, ms, vs, stride=case["stride"], padding=case["padding"],
            training=case["training"], pool_kernel=pk, pool_stride=ps, pool_padding=pp,
            backend=name)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dt)
        out.backward(dout.to(DEVICE))
        named = {"output": out.detach(), "running_mean": ms, "running_var": vs,
                 "dx": xs.grad, "dw": ws.grad, "dgamma": gs.grad if gs is not None else None,
                 "dbeta": bs.grad if bs is not None else None}
        results.append({k: v for k, v in named.items() if v is not None})
    return results


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_stem_against_the_reference(backend):
    """`ops.conv_bn_relu_max_pool` (on Triton in training one op: the pool applies the BN +
    ReLU to the conv output it loads) against the reference's conv_bn_act then max_pool2d:
    output, running stats and every gradient."""
    @_settings(backend, STEM_EXAMPLES)
    @given(stem_cases(_dtypes(backend)))
    def check(case):
        TRIED[(backend, "stem")] += 1
        got, expected = _run_stem(backend, case)
        assert got.keys() == expected.keys()
        for name in got:
            _close(got[name], expected[name], f"{name} {case}", case["dtype"],
                   grad=name.startswith("d"))

    check()
    record("fuzz cases tried per backend", f"{backend} stem: {TRIED[(backend, 'stem')]}")


@st.composite
def block_cases(draw):
    kind = draw(st.sampled_from(["basic", "basic-A", "basic-proj", "bottleneck",
                                 "bottleneck-proj", "bottleneck-proj-s1", "plain"]))
    return dict(kind=kind, n=draw(st.integers(1, 2)), c=draw(st.sampled_from([2, 4, 8])),
                h=draw(st.integers(2, 6)), w=draw(st.integers(2, 6)),
                channels_last=draw(st.booleans()), training=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


def _block(kind, c, backend):
    return {"basic": lambda: FusedBasicBlock(c, c, backend=backend),
            "basic-A": lambda: FusedBasicBlock(c, 2 * c, 2, shortcut="A", backend=backend),
            "basic-proj": lambda: FusedBasicBlock(c, 2 * c, 2, backend=backend),
            "bottleneck": lambda: FusedBottleneck(4 * c, c, backend=backend),
            "bottleneck-proj": lambda: FusedBottleneck(c, c, 2, backend=backend),
            # ResNet-50's layer1 entry: a projection to 4c channels at stride 1
            "bottleneck-proj-s1": lambda: FusedBottleneck(c, c, backend=backend),
            "plain": lambda: FusedBasicBlock(c, c, shortcut=None, backend=backend)}[kind]()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_blocks_against_the_reference(backend):
    @_settings(backend)
    @given(block_cases())
    def check(case):
        stride = 2 if case["kind"] in ("basic-A", "basic-proj", "bottleneck-proj") else 1
        ho, wo = ((size - 1) // stride + 1 for size in (case["h"], case["w"]))
        assume(not case["training"] or case["n"] * ho * wo > 1)
        TRIED[(backend, "blocks")] += 1
        torch.manual_seed(case["seed"])
        fused = _block(case["kind"], case["c"], backend).to(DEVICE).train(case["training"])
        ref = _block(case["kind"], case["c"], "reference").to(DEVICE).train(case["training"])
        ref.load_state_dict(fused.state_dict())
        if case["kind"] == "bottleneck-proj-s1":
            assert fused.downsample is not None and fused.conv1.in_channels == case["c"]
        c_in = fused.conv1.in_channels
        fmt = torch.channels_last if case["channels_last"] else torch.contiguous_format
        x = torch.randn(case["n"], c_in, case["h"], case["w"], device=DEVICE)
        x = x.contiguous(memory_format=fmt)
        assume(_decision_margin(lambda: copy.deepcopy(ref).double()(x.double())) > DECISION_MARGIN)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, expected = fused(xa), ref(xb)
        dz = torch.randn_like(expected)
        out.backward(dz)
        expected.backward(dz)
        _close(out, expected, f"output {case}", torch.float32)
        _close(xa.grad, xb.grad, f"dx {case}", torch.float32, grad=True)
        for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
            _close(p.grad, q.grad, f"{name} {case}", torch.float32, grad=True)
        for (name, b), e in zip(fused.named_buffers(), ref.buffers()):
            _close(b.float(), e.float(), f"{name} {case}", torch.float32)

    check()
    record("fuzz cases tried per backend", f"{backend} blocks: {TRIED[(backend, 'blocks')]}")
