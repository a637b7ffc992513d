"""`python -m fused_resnet train` on CPU: tiny epochs on synthetic data, the files it writes,
resume with the identical next loss, the schedule, DDP under torchrun, the degradation demo."""

import csv
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fused_resnet.models import build_model
from fused_resnet.train import TrainConfig, train
from fused_resnet.train.data import SyntheticImages, make_datasets
from fused_resnet.train.loop import data_workers, lr_at

TINY = dict(arch="cifar_resnet20", epochs=2, batch_size=16, synthetic_size=64, image_size=8,
            log_every=1, progress=False)


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_two_epochs_write_checkpoint_logs_and_curves(tmp_path):
    result = train(TrainConfig(**TINY, out=str(tmp_path)))
    for name in ("checkpoint.pt", "iterations.csv", "epochs.csv", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    epochs = rows(tmp_path / "epochs.csv")
    assert [int(r["epoch"]) for r in epochs] == [1, 2] and int(epochs[-1]["iteration"]) == 8
    assert len(rows(tmp_path / "iterations.csv")) == 8 == len(result["iterations"])
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["state"]["epoch"] == 2 and ckpt["config"]["arch"] == "cifar_resnet20"
    assert set(ckpt) == {"model", "optimizer", "scaler", "state", "config"}


def test_resume_continues_with_the_identical_next_loss(tmp_path):
    whole = train(TrainConfig(**TINY, out=str(tmp_path / "whole")))
    train(TrainConfig(**TINY, out=str(tmp_path / "cut"), max_iters=4))  # stops after epoch 1
    resumed = train(TrainConfig(**TINY, out=str(tmp_path / "cut"),
                                resume=str(tmp_path / "cut" / "checkpoint.pt")))
    first_after = [r for r in resumed["iterations"] if r["iteration"] == 5]
    expected = [r for r in whole["iterations"] if r["iteration"] == 5]
    assert first_after[0]["loss"] == pytest.approx(expected[0]["loss"], rel=1e-6, abs=1e-7)
    assert resumed["iterations"][-1]["loss"] == pytest.approx(whole["iterations"][-1]["loss"],
                                                              rel=1e-5, abs=1e-6)
    assert len(resumed["epochs"]) == 2  # the log carries on from the checkpoint


def test_resume_with_fp16_scaler_and_bf16(tmp_path):
    for amp in ("bf16", "fp16"):
        out = tmp_path / amp
        train(TrainConfig(**{**TINY, "epochs": 1}, out=str(out), amp=amp))
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        assert (ckpt["scaler"] != {}) == (amp == "fp16")
        for key, value in ckpt["model"].items():
            if value.is_floating_point():
                assert value.dtype == torch.float32, key


def test_schedule_milestones_warmup_and_plateau():
    cfg = TrainConfig(lr=0.1, milestones=(0.5, 0.75), warmup_iters=3)
    assert [lr_at(cfg, i, 100, 1.0) for i in (0, 2, 3, 49, 50, 74, 75, 99)] == pytest.approx(
        [0.01, 0.01, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    plateau = TrainConfig(lr=0.1, schedule="plateau")
    assert lr_at(plateau, 10, 100, 0.01) == pytest.approx(0.001)


def test_synthetic_data_is_deterministic_and_learnable():
    a, b = SyntheticImages(8, 4, seed=3), SyntheticImages(8, 4, seed=3)
    for i in range(8):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    assert not torch.equal(a[0][0], SyntheticImages(8, 4, seed=4)[0][0])


@pytest.mark.parametrize("field, value, message", [
    ("epochs", 0, "--epochs must be an integer >= 1, got 0"),
    ("lr", 0.0, "--lr must be > 0, got 0.0"),
    ("amp", "fp8", "amp must be one of"),
    ("workers", -1, "workers must be >= 0"),
    ("schedule", "cosine", "schedule must be one of"),
    ("milestones", (1.5,), "milestones are fractions"),
    ("data", "/no/such/folder", "not a directory"),
    ("resume", "/no/such/checkpoint.pt", "no checkpoint at"),
    ("batch_size", 1000, "exceeds the 64 training images"),
])
def test_bad_settings_are_named(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        train(TrainConfig(**{**TINY, field: value}, out=str(tmp_path)))


def test_data_workers():
    cores = os.cpu_count() or 1
    assert data_workers(TrainConfig(), 32, 1) == 0  # CIFAR-size synthetic: drawn in-process
    assert data_workers(TrainConfig(), 224, 1) == max(1, min(8, cores))
    assert data_workers(TrainConfig(data="/images"), 32, 1) == max(1, min(8, cores))
    assert data_workers(TrainConfig(data="/images"), 224, 10_000) == 1
    assert data_workers(TrainConfig(workers=3), 224, 1) == 3
    assert data_workers(TrainConfig(workers=0), 224, 1) == 0


def _cli(*args, cwd, env=None):
    result = subprocess.run([sys.executable, "-m", "fused_resnet", "train", *args],
                            capture_output=True, text=True, timeout=900, cwd=cwd,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


CLI_TINY = ["--epochs", "1", "--batch-size", "8", "--synthetic-size", "32", "--image-size",
            "8", "--log-every", "1", "--no-progress"]


def test_compare_plain_and_residual_nets(tmp_path):
    out = _cli("--compare", "plain_net,cifar_resnet", "--depths", "8,14", *CLI_TINY,
               "--out", str(tmp_path), cwd=tmp_path)
    assert "| plain_net    | 8 " in out and "| cifar_resnet | 14 " in out
    table = rows(tmp_path / "compare.csv")
    assert {(r["family"], r["depth"]) for r in table} == {
        ("plain_net", "8"), ("plain_net", "14"), ("cifar_resnet", "8"), ("cifar_resnet", "14")}
    assert (tmp_path / "compare.png").stat().st_size > 0
    assert (tmp_path / "plain_cifar14" / "checkpoint.pt").exists()


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")
def test_torchrun_ddp_with_sync_bn(tmp_path):
    """2 ranks on 36 synthetic images: 2 steps of 8 per rank, and 9 validation images
    scored once each (5 on rank 0, 4 on rank 1: no padded repeat), as one process scores
    them with the checkpoint's model."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "fused_resnet",
         "train", "--ddp", "--sync-bn", "--arch", "cifar_resnet20", *CLI_TINY,
         "--synthetic-size", "36", "--out", str(tmp_path), "--device", "cpu"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    epochs = rows(tmp_path / "epochs.csv")
    assert int(epochs[0]["iteration"]) == 2  # 36 images // (8 per rank x 2 ranks)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    model = build_model("cifar_resnet20", backend="reference", num_classes=10)
    model.load_state_dict(ckpt["model"])
    _, val_set, _ = make_datasets("synthetic", 8, True, 36, 0)
    x = torch.stack([val_set[i][0] for i in range(len(val_set))])
    y = torch.tensor([val_set[i][1] for i in range(len(val_set))])
    with torch.no_grad():
        logits = model.eval()(x)
    assert len(y) == 9
    assert float(epochs[0]["val_loss"]) == pytest.approx(
        F.cross_entropy(logits, y).item(), rel=1e-5)
    assert float(epochs[0]["val_err"]) == pytest.approx(
        100 * (logits.argmax(1) != y).sum().item() / 9)
