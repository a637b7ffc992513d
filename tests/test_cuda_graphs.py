"""What a CUDA graph needs of a step, and the captured training step.

On CPU: the fused models' training and inference steps and the training loop's step read
nothing back from the device (no `.item()`, `nonzero`, ...: each would stop the host until
the GPU drains, and none can be captured); the BN folds cached for inference are dropped
when a module enters training mode (a graph's replay changes weights without a version
counter seeing it); the captured step's and the loop's bad settings are named.
On a GPU: `CapturedTrainStep` replays the same steps as eager training (Triton, `_C`, plain
PyTorch), captures again when the learning rate changes, and `train --cuda-graphs` runs.
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
from fused_resnet.train import CapturedTrainStep, TrainConfig, train

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
            where = f"{ours[-1].filename.split('/fused_resnet/')[-1]}:{ours[-1].lineno}" \
                if ours else "outside fused_resnet"
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


def test_the_loop_reads_the_device_at_log_rows_only(tmp_path):
    with HostReads() as reads:
        train(TrainConfig(arch="cifar_resnet20", epochs=1, batch_size=16, synthetic_size=64,
                          image_size=8, log_every=2, progress=False, out=str(tmp_path)))
    assert reads.calls == []


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
    model.blocks[1].bn2.momentum = None
    with pytest.raises(ValueError, match=r"model.blocks.1.bn2: momentum=None"):
        CapturedTrainStep(model, opt)
    model.blocks[1].bn2.momentum = 0.1
    with pytest.raises(ValueError, match=r"model.bn1: a synchronized BN"):
        CapturedTrainStep(fr.nn.convert_sync_bn(model), opt)
    for bad, message in ((dict(amp="fp16"), "fp16's GradScaler"),
                         (dict(ddp=True), "use amp bf16 or fp32 on one GPU"),
                         (dict(sync_bn=True, amp="bf16"), "sync_bn=True")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(cuda_graphs=True, **bad).check()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
            train(TrainConfig(arch="cifar_resnet20", epochs=1, batch_size=16,
                              synthetic_size=64, image_size=8, progress=False,
                              cuda_graphs=True, device="cpu"))


# --- on a GPU ---------------------------------------------------------------------------------

def _pair_on_cuda(backend):
    torch.manual_seed(0)
    model = fr.models.resnet18(backend=backend, num_classes=10).cuda()
    model = model.to(memory_format=torch.channels_last)
    twin = copy.deepcopy(model)
    make_opt = lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9,  # noqa: E731
                                         weight_decay=1e-4)
    return model, make_opt(model), twin, make_opt(twin)


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
@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["triton", "cuda", "reference"])
def test_captured_step_replays_eager_training(backend, amp):
    model, opt, twin, twin_opt = _pair_on_cuda(backend)
    step = CapturedTrainStep(model, opt, amp_dtype=amp, warmup=2)
    tol = 2e-4 if amp is None else 2e-2  # atomics in the weight gradients; bf16 rounding
    for i, (x, y) in enumerate(_batches(7)):
        if i == 5:  # a new learning rate: the next call captures again
            for o in (opt, twin_opt):
                o.param_groups[0]["lr"] = 0.01
        loss, _ = step(x, y)
        expected = _eager_step(twin, twin_opt, x, y, amp)
        torch.testing.assert_close(loss, expected, rtol=tol, atol=tol)
    assert step.captures == 2 and step.calls == 7
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
def test_train_with_cuda_graphs_matches_eager(tmp_path):
    runs = {}
    for graphs in (False, True):
        runs[graphs] = train(TrainConfig(
            arch="cifar_resnet20", backend="triton", epochs=2, batch_size=32,
            synthetic_size=256, log_every=2, amp="bf16", progress=False,
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
