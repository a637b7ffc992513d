"""What a CUDA graph needs of a step, and the captured training step.

On CPU: the fused models' training and inference steps and the training loop's step read
nothing back from the device (no `.item()`, `nonzero`, ...: each would stop the host until
the GPU drains, and none can be captured); the BN folds cached for inference are dropped
when a module enters training mode (a graph's replay changes weights without a version
counter seeing it); the captured step's and the loop's bad settings are named; the fp16
step a graph captures (GradScaler with a fused SGD from zero momentum buffers) reads nothing
back and takes the stock eager GradScaler steps, overflow skips included.
On a GPU: `CapturedTrainStep` replays the same steps as eager training (Triton, `_C`, plain
PyTorch; fp32, bf16, fp16 with a scaler), captures again when the learning rate changes, and
`train --cuda-graphs` runs.
"""

import copy
import traceback

import pytest
import torch
import torch.nn.functional as F
from _backends import FUSED_BACKENDS
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fused_resnet as fr
from fused_resnet.bench.timing import cuda_graph
from fused_resnet.nn import (
    FusedBasicBlock,
    FusedBottleneck,
    FusedMaxPool2d,
    clear_fold_cache,
    conv_bn_relu_pool,
)
from fused_resnet.train import (
    CapturedTrainStep,
    TrainConfig,
    prime_momentum_buffers,
    train,
    training_step,
)
from fused_resnet.train.loop import load_checkpoint, save_checkpoint

# ATen ops whose result the host must wait for (what `.item()`, `bool(t)`, `int(t)` call)
HOST_READS = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "allclose"}


class HostReads(TorchDispatchMode):
    """Records each host-reading op with the innermost frame of our code that called it,
    leaving out the data loader's (its samplers' and datasets' draws are CPU work on CPU
    tensors before a batch goes anywhere)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        stack = traceback.extract_stack()
        if func.__name__.split(".")[0] in HOST_READS and not any(
                "torch/utils/data/" in f.filename for f in stack):
            ours = [f for f in stack if "/fused_resnet/" in f.filename]
            where = (f"{ours[-1].filename.split('/fused_resnet/')[-1]}:{ours[-1].lineno} "
                     f"({ours[-1].name})") if ours else "outside fused_resnet"
            self.calls.append(f"{func.__name__} from {where}")
        return func(*args, **(kwargs or {}))


class TinyNet(nn.Module):
    """The ResNet stem and one block of each shortcut kind, small enough for the interpreter:
    8x8 after the stem's conv and pool, 4x4 after the stride-2 blocks."""

    def __init__(self, backend: str):
        super().__init__()
        self.backend = backend
        self.conv1 = nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.maxpool = FusedMaxPool2d(3, 2, 1, backend=backend)
        self.blocks = nn.Sequential(
            FusedBottleneck(8, 4, 2, backend=backend),  # projection, stride 2
            FusedBottleneck(16, 4, 1, backend=backend),  # identity
            FusedBasicBlock(16, 16, 1, shortcut="A", backend=backend),
            FusedBasicBlock(16, 8, 1, backend=backend))  # projection, stride 1
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = conv_bn_relu_pool(x, self.conv1, self.bn1, self.maxpool, backend=self.backend)
        return self.fc(F.adaptive_avg_pool2d(self.blocks(x), 1).flatten(1))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fused_steps_read_nothing_back(backend):
    torch.manual_seed(0)
    model = TinyNet(backend).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (2,))
    with HostReads() as reads:
        for _ in range(2):  # the second step: the launch caches' path
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            for _ in range(2):  # the first call (checked, folded) and the planned one
                model(x)
    assert reads.calls == []


@pytest.mark.parametrize("amp", ["fp32", "fp16"])
def test_the_loop_reads_the_device_at_log_rows_only(tmp_path, amp):
    with HostReads() as reads:
        train(TrainConfig(arch="cifar_resnet20", epochs=1, batch_size=16, synthetic_size=64,
                          image_size=8, log_every=2, progress=False, out=str(tmp_path),
                          amp=amp))
    # fp16: the scaler's scale and growth count, read once an epoch for its checkpoint
    saved = [c for c in reads.calls if c.endswith("(save_checkpoint)")]
    assert len(saved) == (0 if amp == "fp32" else 2)
    assert [c for c in reads.calls if c not in saved] == []


def _overflowing_scaler(device):
    """Its first step overflows (the scaled loss is inf in fp32) and is skipped; the scale
    then drops to 2^15 and doubles after every 3 finite steps."""
    return torch.amp.GradScaler(device, init_scale=2.0 ** 127, backoff_factor=2.0 ** -112,
                                growth_interval=3)


def _scaled_eager_step(model, opt, scaler, x, y, amp):
    """GradScaler's documented eager step (its host-read path with a non-fused optimizer)."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=amp):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss.detach()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_fp16_step_with_fused_sgd_reads_nothing_back(backend):
    """The step a captured fp16 run takes (GradScaler + fused SGD, zero momentum buffers)
    reads nothing on the host and takes the stock eager steps: its first step's overflow
    skipped (the weights unchanged), then the same updates and scales."""
    torch.manual_seed(0)
    model = TinyNet(backend).to(memory_format=torch.channels_last)
    twin = copy.deepcopy(model)
    start = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4,
                          fused=True)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scaler, twin_scaler = _overflowing_scaler("cpu"), _overflowing_scaler("cpu")
    prime_momentum_buffers(opt)
    g = torch.Generator().manual_seed(1)
    for i in range(5):
        x = torch.randn(2, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 5, (2,), generator=g)
        opt.zero_grad(set_to_none=True)
        with HostReads() as reads:
            loss, _ = training_step(model, opt, F.cross_entropy, x, y,
                                    amp_dtype=torch.float16, scaler=scaler)
        assert reads.calls == []
        expected = _scaled_eager_step(twin, twin_opt, twin_scaler, x, y, torch.float16)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
        assert scaler.get_scale() == twin_scaler.get_scale() == (2.0 ** 15 if i < 3 else 2.0 ** 16)
        if i == 0:  # skipped: weights as they were (running stats moved in the forward)
            for name, p in model.named_parameters():
                assert torch.equal(p, start[name]), name
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_primed_momentum_buffers():
    model = nn.Linear(4, 3)
    frozen = nn.Parameter(torch.ones(2), requires_grad=False)
    opt = torch.optim.SGD([{"params": model.parameters(), "momentum": 0.9},
                           {"params": [frozen], "momentum": 0.0}], lr=0.1)
    opt.state[model.bias]["momentum_buffer"] = kept = torch.full((3,), 5.0)
    prime_momentum_buffers(opt)
    assert torch.equal(opt.state[model.weight]["momentum_buffer"], torch.zeros(3, 4))
    assert opt.state[model.bias]["momentum_buffer"] is kept  # buffers it has are left
    assert frozen not in opt.state  # no momentum: no buffer
    damped = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.1)
    with pytest.raises(ValueError, match="optimizer: param group 0 has dampening 0.1"):
        prime_momentum_buffers(damped)
    assert len(damped.state) == 0  # nothing made by the failed call


def test_resume_keeps_the_runs_update_implementation(tmp_path):
    """A checkpoint of a run with the stock SGD resumed by one that fuses it (fp16 under
    CUDA graphs), and back: each run keeps its own `fused` flag."""
    model = nn.Linear(4, 3)
    state = {"epoch": 1, "iteration": 8, "plateau": {"scale": 1.0, "best": 2.0, "bad": 0},
             "iterations": [], "epochs": []}  # a loop state as `train` saves it
    for saved, resumed in ((None, True), (True, None)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=saved)
        scaler = torch.amp.GradScaler("cpu")
        save_checkpoint(str(tmp_path / "c.pt"), model, opt, scaler, state, TrainConfig())
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=resumed)
        assert load_checkpoint(str(tmp_path / "c.pt"), model, opt, scaler,
                               torch.device("cpu")) == state
        assert opt.param_groups[0]["fused"] is resumed


def test_training_mode_drops_folds_a_version_counter_cannot_see():
    """A CUDA graph's replay writes weights as `.data` does here: no version counter moves,
    so only entering training mode (or `clear_fold_cache`) tells the eval path to refold."""
    torch.manual_seed(0)
    model = fr.models.resnet18(backend="cpu", num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)

    def unseen_write():
        with torch.no_grad():
            for p in model.parameters():
                p.data.mul_(0.9)
            for name, b in model.named_buffers():
                if name.endswith("running_var"):
                    b.data.mul_(1.2)

    def expected():
        ref = fr.models.set_backend(copy.deepcopy(model), "reference")
        with torch.no_grad():
            return ref(x)

    with torch.no_grad():
        model(x)
    unseen_write()
    with torch.no_grad():
        stale = model(x)
    assert (stale - expected()).abs().max() > 1e-2  # the cache did not see it
    model.train()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected(), rtol=1e-5, atol=1e-5)
    unseen_write()
    clear_fold_cache(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected(), rtol=1e-5, atol=1e-5)


def test_captured_step_and_loop_settings_are_named():
    model = TinyNet("reference")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="model: CUDA graphs need every parameter on a CUDA"):
        CapturedTrainStep(model, opt)
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        CapturedTrainStep(model, opt, warmup=0)
    with pytest.raises(ValueError, match="optimizer: Adam keeps its step count"):
        CapturedTrainStep(model, torch.optim.Adam(model.parameters()))
    with pytest.raises(ValueError, match="optimizer: GradScaler reads the inf check on the "
                                         "host before stepping SGD"):
        CapturedTrainStep(model, opt, scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="model: CUDA graphs"):  # past the scaler's check
        CapturedTrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1, fused=True),
                          scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="model: CUDA graphs"):  # a disabled one: bf16 / fp32
        CapturedTrainStep(model, opt, scaler=torch.amp.GradScaler("cpu", enabled=False))
    model.blocks[1].bn2.momentum = None
    with pytest.raises(ValueError, match=r"model.blocks.1.bn2: momentum=None"):
        CapturedTrainStep(model, opt)
    model.blocks[1].bn2.momentum = 0.1
    with pytest.raises(ValueError, match=r"model.bn1: a synchronized BN"):
        CapturedTrainStep(fr.nn.convert_sync_bn(model), opt)
    for bad, message in ((dict(ddp=True), "use one GPU without sync_bn"),
                         (dict(sync_bn=True, amp="bf16"), "sync_bn=True")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(cuda_graphs=True, **bad).check()
    for amp in ("fp32", "bf16", "fp16"):  # fp16: a fused SGD takes the scaler's inf check
        TrainConfig(cuda_graphs=True, amp=amp).check()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--cuda-graphs needs a CUDA device"):
            train(TrainConfig(arch="cifar_resnet20", epochs=1, batch_size=16,
                              synthetic_size=64, image_size=8, progress=False,
                              cuda_graphs=True, device="cpu"))


# --- on a GPU ---------------------------------------------------------------------------------

def _pair_on_cuda(backend, fused=None):
    """A ResNet-18 and its twin, each with SGD (the first's `fused` as given, the twin's
    the stock one)."""
    torch.manual_seed(0)
    model = fr.models.resnet18(backend=backend, num_classes=10).cuda()
    model = model.to(memory_format=torch.channels_last)
    twin = copy.deepcopy(model)
    make_opt = lambda m, fused: torch.optim.SGD(  # noqa: E731
        m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4, fused=fused)
    return model, make_opt(model, fused), twin, make_opt(twin, None)


def _batches(n, batch=8, size=64):
    g = torch.Generator(device="cuda").manual_seed(1)
    return [(torch.randn(batch, 3, size, size, device="cuda", generator=g)
             .contiguous(memory_format=torch.channels_last),
             torch.randint(0, 10, (batch,), device="cuda", generator=g)) for _ in range(n)]


def _eager_step(model, opt, x, y, amp):
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    opt.step()
    return loss.detach()


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [None, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("backend", ["triton", "cuda", "reference"])
def test_captured_step_replays_eager_training(backend, amp):
    """fp16: a GradScaler with a fused SGD, against the stock eager GradScaler step; the
    first (eager) step overflows, and so does step 5 (replayed: the scale set to 2^127)."""
    half = amp is torch.float16
    model, opt, twin, twin_opt = _pair_on_cuda(backend, fused=True if half else None)
    scalers = [_overflowing_scaler("cuda") for _ in range(2)] if half else [None, None]
    step = CapturedTrainStep(model, opt, amp_dtype=amp, scaler=scalers[0], warmup=2)
    tol = 2e-4 if amp is None else 2e-2  # atomics in the weight gradients; bf16 rounding
    for i, (x, y) in enumerate(_batches(7)):
        if i == 5:  # a new learning rate: the next call captures again
            for o in (opt, twin_opt):
                o.param_groups[0]["lr"] = 0.01
        if half and i == 4:
            for scaler in scalers:
                scaler.update(2.0 ** 127)  # in place: the graph reads the new scale
        loss, _ = step(x, y)
        if half:
            expected = _scaled_eager_step(twin, twin_opt, scalers[1], x, y, amp)
            assert scalers[0].get_scale() == scalers[1].get_scale(), i
        else:
            expected = _eager_step(twin, twin_opt, x, y, amp)
        torch.testing.assert_close(loss, expected, rtol=tol, atol=tol)
    assert step.captures == 2 and step.calls == 7
    if half:  # skipped at steps 0 and 4, grown after steps 1-3
        assert scalers[0].get_scale() == 2.0 ** 15
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        if a.is_floating_point():
            scale = max(b.abs().max().item(), 1.0)
            assert (a - b).abs().max().item() <= tol * scale, name
        else:
            assert torch.equal(a, b), name  # num_batches_tracked counted by the replays
    with pytest.raises(ValueError, match=r"x: shape \(4, 3, 64, 64\)"):
        step(torch.zeros(4, 3, 64, 64, device="cuda"), torch.zeros(4, dtype=torch.long,
                                                                    device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_train_with_cuda_graphs_matches_eager(tmp_path, amp):
    runs = {}
    for graphs in (False, True):
        runs[graphs] = train(TrainConfig(
            arch="cifar_resnet20", backend="triton", epochs=2, batch_size=32,
            synthetic_size=256, log_every=2, amp=amp, progress=False,
            cuda_graphs=graphs, out=str(tmp_path / str(graphs))))
    for a, b in zip(runs[False]["epochs"], runs[True]["epochs"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=0.05)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=0.05)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_captured_inference_matches_eager(backend):
    """An eval-mode fused model captured (after its first, folding and planning, calls) and
    replayed on new inputs gives the eager call's logits; after a training step and
    `model.train()` / `model.eval()` a new capture gives the new weights' logits."""
    model, opt, _, _ = _pair_on_cuda(backend)
    (x0, y0), (x1, _), (x2, _) = _batches(3)
    static_x = x0.clone()

    def capture():  # (replay, the graph's output): the bench's capture, after 2 warm-ups
        model.eval()
        outs = []
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16,
                                             cache_enabled=False):
            replay = cuda_graph(lambda: outs.append(model(static_x)), warmup=2)
        return replay, outs[-1]  # the last call was the captured one

    def eager(x):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return model(x)

    replay, out = capture()
    for x in (x1, x2):
        static_x.copy_(x)
        replay()
        torch.testing.assert_close(out, eager(x), rtol=1e-3, atol=1e-3)
    del replay, out
    model.train()
    _eager_step(model, opt, x0, y0, torch.bfloat16)
    replay, out = capture()
    static_x.copy_(x1)
    replay()
    torch.testing.assert_close(out, eager(x1), rtol=1e-3, atol=1e-3)
