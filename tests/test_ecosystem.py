"""The fused ResNet in PyTorch's machinery: torch.compile (fullgraph, train and eval),
torch.export (train and eval, save / load),
autocast (bf16 / fp16) with fp32 BN parameters and statistics, GradScaler, and both memory
formats in and out. CPU tests run the `_C` backend (the reference where `_C` is not built);
`gpu` tests run Triton."""

import copy

import pytest
import torch
import torch.nn.functional as F

import fused_resnet as fr
from fused_resnet.backend import unavailable_reason
from fused_resnet.testing import compare_norm

GPU_BACKEND = "triton"
# the CPU tests run CPU tensors: the `_C` CPU kernels where built, else the reference
CPU_FUSED = "cpu" if unavailable_reason("cpu", torch.device("cpu")) is None else "reference"


def _cifar(backend, device="cpu"):
    torch.manual_seed(0)
    return fr.models.cifar_resnet(20, backend=backend).to(device)


def _step(model, x, y, opt):
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


def _check_compiled_matches_eager(backend, device, compile_backend, frozen=()):
    eager = _cifar(backend, device).to(memory_format=torch.channels_last)
    for name in frozen:  # fine-tuning: these layers get no gradient, nor does their output
        getattr(eager, name).requires_grad_(False)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=compile_backend)
    x = torch.randn(4, 3, 16, 16, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (4,), device=device)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    opt_c = torch.optim.SGD(compiled_model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        torch.testing.assert_close(_step(compiled, x, y, opt_c), _step(eager, x, y, opt_e),
                                   rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(compiled_model.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    for (name, p), q in zip(compiled_model.named_parameters(), eager.parameters()):
        assert (p.grad is None) == (q.grad is None) == (name.split(".")[0] in frozen), name
    eager.eval()
    compiled_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_train_and_eval_match_eager(compile_backend):
    _check_compiled_matches_eager(CPU_FUSED, "cpu", compile_backend)


def test_compile_with_frozen_early_layers_matches_eager():
    """The stem and layer1 frozen: layer2's first block gets an input that needs no gradient
    (its backward op runs with need_dx=False inside the compiled graph)."""
    _check_compiled_matches_eager(CPU_FUSED, "cpu", "aot_eager",
                                  frozen=("conv1", "bn1", "layer1"))


@pytest.mark.gpu
def test_compile_fullgraph_on_gpu_with_triton():
    _check_compiled_matches_eager(GPU_BACKEND, "cuda", "inductor")


@pytest.mark.gpu
def test_compile_reduce_overhead_on_gpu_replays_eval():
    """torch.compile(mode="reduce-overhead"), the usual way to put inference in CUDA graphs:
    the fused eval model is captured (inductor counts no cudagraph skip: nothing in it reads
    the host or needs CPU tensors) and its replays match eager on new inputs."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    cl = torch.channels_last
    model = fr.models.resnet18(num_classes=10, backend=GPU_BACKEND).cuda().eval()
    model = model.to(memory_format=cl)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    counters.clear()
    with torch.no_grad():
        for _ in range(4):  # warm-up, capture, replays
            x = torch.randn(2, 3, 32, 32, device="cuda").contiguous(memory_format=cl)
            torch.testing.assert_close(compiled(x).clone(), model(x), rtol=1e-4, atol=1e-4)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


def _check_export(model, x, fused_op: bool, tmp_path):
    """torch.export of `model` (its mode as given) with a dynamic batch size: the program's
    module computes what the eager model computes (and, in training, updates the running
    stats alike); it survives torch.export.save / load and runs another batch size, in
    training from the buffers it was exported with, the fused ops named in the saved graph.
    (A training program failed to save: the running-stat update switched grad mode inside
    the forward, and its n / (n - 1) was a symbolic float graph input.)"""
    eager, fresh = copy.deepcopy(model), copy.deepcopy(model)
    batch = {"x": {0: torch.export.Dim("batch", min=2, max=1024)}}
    program = torch.export.export(model, (x,), dynamic_shapes=batch)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    if fused_op:
        assert any(t.startswith("fused_resnet.") for t in targets), targets
    torch.export.save(program, tmp_path / "model.pt2")  # (before its module runs: that
    loaded = torch.export.load(tmp_path / "model.pt2")  # updates the program's buffers)
    if model.training:  # the program's module carries its own copy of the buffers
        _check_trained_alike(program.module(), eager, x)
    other = torch.randn(3, *x.shape[1:], device=x.device).contiguous(
        memory_format=torch.channels_last)
    if model.training:
        _check_trained_alike(loaded.module(), fresh, other)
        return
    with torch.no_grad():
        for inputs in (x, other):
            torch.testing.assert_close(loaded.module()(inputs), eager(inputs), rtol=1e-5,
                                       atol=1e-5)


def _check_trained_alike(exported, eager, x) -> None:
    """One training call of each: the same output and the same buffers after it."""
    torch.testing.assert_close(exported(x), eager(x), rtol=1e-5, atol=1e-5)
    got = dict(exported.named_buffers())
    assert got.keys() == dict(eager.named_buffers()).keys()
    for name, b in eager.named_buffers():  # by name: torch 2.5 orders them otherwise
        torch.testing.assert_close(got[name], b, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("arch", ["cifar_resnet8", "resnet18"])
def test_torch_export_matches_eager(arch, train, tmp_path):
    """cifar_resnet8 (option-A shortcuts) and resnet18 (stem + pool, projections)."""
    torch.manual_seed(0)
    if arch == "resnet18":
        model, size = fr.models.resnet18(num_classes=10, backend=CPU_FUSED), 32
    else:
        model, size = fr.models.cifar_resnet(8, backend=CPU_FUSED), 16
    model.train(train)
    x = torch.randn(2, 3, size, size).contiguous(memory_format=torch.channels_last)
    _check_export(model.to(memory_format=torch.channels_last), x, CPU_FUSED != "reference",
                  tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_torch_export_on_gpu_with_triton(train, tmp_path):
    torch.manual_seed(0)
    model = fr.models.resnet18(num_classes=10, backend=GPU_BACKEND).cuda().train(train)
    x = torch.randn(2, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    _check_export(model.to(memory_format=torch.channels_last), x, True, tmp_path)


def _autocast_step(backend, device, dtype, fmt, x, y):
    """One autocast forward + backward; returns the model and the logits."""
    model = _cifar(backend, device).to(memory_format=fmt)
    with torch.autocast(device, dtype=dtype):
        logits = model(x.to(device).contiguous(memory_format=fmt))
    F.cross_entropy(logits.float(), y.to(device)).backward()
    return model, logits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_bn_in_fp32_and_meets_the_precision_rule(dtype):
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    cl = torch.channels_last
    model, logits = _autocast_step(CPU_FUSED, "cpu", dtype, cl, x, y)
    eager, eager_logits = _autocast_step("reference", "cpu", dtype, cl, x, y)
    truth = _cifar("reference").double()
    expected = truth(x.double())
    assert logits.dtype == eager_logits.dtype
    assert compare_norm(logits, expected, eager_logits).ok
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
    for name, b in model.named_buffers():
        assert b.dtype == (torch.float32 if b.is_floating_point() else torch.int64), name
    for (name, b), e in zip(model.named_buffers(), eager.buffers()):  # running stats moved alike
        if b.is_floating_point():
            torch.testing.assert_close(b, e, rtol=2e-2, atol=2e-2, msg=lambda m, n=name: n + m)


def test_grad_scaler_fp16_step_updates_and_skips_on_inf():
    model = _cifar(CPU_FUSED)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    before = copy.deepcopy(model.state_dict())
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(model(x).float(), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(model.fc.weight, before["fc.weight"])
    assert scaler.get_scale() == 2.0**8
    # an inf gradient: the step is skipped and the scale halves
    weights = copy.deepcopy(model.state_dict())
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(model(x).float(), y) * float("inf")
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(model.fc.weight, weights["fc.weight"])
    assert scaler.get_scale() == 2.0**7


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("block", ["basic", "bottleneck", "option-A"])
def test_output_keeps_the_input_memory_format(fmt, train, block):
    make = {"basic": lambda: fr.nn.FusedBasicBlock(8, 8, backend=CPU_FUSED),
            "bottleneck": lambda: fr.nn.FusedBottleneck(8, 4, 2, backend=CPU_FUSED),
            "option-A": lambda: fr.nn.FusedBasicBlock(8, 16, 2, shortcut="A", backend=CPU_FUSED)}
    module = make[block]().train(train)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=fmt)
    with torch.set_grad_enabled(train):
        out = module(x)
    assert out.is_contiguous(memory_format=fmt)
    if fmt == torch.channels_last:
        assert not out.is_contiguous()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_on_gpu_routes_to_triton(dtype):
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    model, logits = _autocast_step(GPU_BACKEND, "cuda", dtype, torch.channels_last, x, y)
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
