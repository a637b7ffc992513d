"""Determinism (`fr.set_deterministic`: the same bits run to run) and state safety (state
dicts between fused, reference and torchvision models through torch.save / torch.load with
weights_only; convert's parameter identity; a checkpoint resumed on another backend)."""

import io

import pytest
import torch
import torch.nn.functional as F
import torchvision

import fused_resnet as fr
from fused_resnet.train import TrainConfig, train
from fused_resnet.triton import config as triton_config
from tests._backends import DEVICE, backend_param


@pytest.fixture
def deterministic():
    fr.set_deterministic(True)
    yield
    fr.set_deterministic(False)


def _two_steps(backend):
    torch.manual_seed(0)
    model = fr.models.cifar_resnet(20, backend=backend).to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        x = torch.randn(4, 3, 8, 8, generator=g).to(DEVICE)
        y = torch.randint(0, 10, (4,), generator=g).to(DEVICE)
        opt.zero_grad()
        logits = model(x)
        F.cross_entropy(logits, y).backward()
        out.append(logits.detach().clone())
        opt.step()
    return out, [t.detach().clone() for t in model.state_dict().values()]


@pytest.mark.parametrize("backend", [backend_param("triton"), backend_param(
    "cuda" if DEVICE == "cuda" else "cpu"), "reference"])
def test_deterministic_mode_gives_identical_bits(deterministic, backend):
    assert fr.is_deterministic()
    first, second = _two_steps(backend), _two_steps(backend)
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, b)


def test_deterministic_mode_pins_the_triton_config(deterministic, monkeypatch):
    # as compiled kernels would (whether they are interpreted is fixed when they are made)
    monkeypatch.setattr(triton_config, "_INTERPRETING", False)
    monkeypatch.delenv("FUSED_RESNET_TRITON_PIN", raising=False)
    assert triton_config.pinned_config() == triton_config.PINNED
    fr.set_deterministic(False)
    assert triton_config.pinned_config() is None  # autotuned again


def _roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("backend", [backend_param("cpu"), "reference"])
def test_state_dicts_move_between_fused_reference_and_torchvision(backend):
    torch.manual_seed(0)
    fused = fr.models.resnet18(backend=backend)
    fused.train()(torch.randn(2, 3, 64, 64))  # running stats away from their init
    tv = torchvision.models.resnet18()
    tv.load_state_dict(_roundtrip(fused.state_dict()))
    ref = fr.models.resnet18(backend="reference")
    ref.load_state_dict(_roundtrip(tv.state_dict()))
    back = fr.models.resnet18(backend=backend)
    back.load_state_dict(_roundtrip(ref.state_dict()))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = tv.eval()(x)
        for model in (fused, ref, back):
            torch.testing.assert_close(model.eval()(x), expected, rtol=1e-4, atol=1e-4)
    for (key, a), b in zip(back.state_dict().items(), fused.state_dict().values()):
        assert torch.equal(a, b), key


def test_convert_back_and_forth_keeps_the_very_same_tensors():
    tv = torchvision.models.resnet50()
    ids = {name: id(p) for name, p in tv.named_parameters()}
    ids.update({name: id(b) for name, b in tv.named_buffers()})
    keys = list(tv.state_dict())
    for backend in ("cpu", "reference", "auto"):
        fr.convert(tv, backend=backend)
        assert list(tv.state_dict()) == keys
        assert {n: id(p) for n, p in tv.named_parameters()} == {
            n: i for n, i in ids.items() if n in dict(tv.named_parameters())}
        assert all(id(b) == ids[n] for n, b in tv.named_buffers())


def test_checkpoint_resumed_on_another_backend(tmp_path):
    pytest.importorskip("fused_resnet._C")
    tiny = dict(arch="cifar_resnet20", epochs=2, batch_size=16, synthetic_size=64,
                image_size=8, log_every=1, progress=False)
    whole = train(TrainConfig(**tiny, backend="cpu", out=str(tmp_path / "whole")))
    train(TrainConfig(**tiny, backend="cpu", out=str(tmp_path / "cut"), max_iters=4))
    resumed = train(TrainConfig(**tiny, backend="reference", out=str(tmp_path / "cut"),
                                resume=str(tmp_path / "cut" / "checkpoint.pt")))
    for a, b in zip(resumed["iterations"][4:], whole["iterations"][4:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    reference = fr.models.cifar_resnet(20, backend="reference")
    reference.load_state_dict(ckpt["model"])  # the checkpoint holds a plain state dict
