"""`train --resume` with other settings than the checkpoint's run: another --amp works (an
fp16 run resuming an fp32 / bf16 checkpoint starts a fresh GradScaler) and is warned;
another --epochs, or --batch-size at an epoch boundary, is warned with what it changes
(schedule length, lr drops, the next lr, where the run ends); a refused resume warns of
nothing and leaves the checkpoint as it was; the CLI prints a warning as one line and
names --arch / --weights in their errors."""

import os
import warnings

import pytest
import torch

from fused_resnet.__main__ import main
from fused_resnet.train import TrainConfig, train
from fused_resnet.train.checkpoint import ResumeWarning, schedule_change

# 64 images in batches of 8: 8 steps an epoch, 16 in the run (on this machine's backend)
SMALL = dict(arch="cifar_resnet20", epochs=2, batch_size=8, synthetic_size=64, image_size=8,
             device="cpu", log_every=4, progress=False)


def _resume(folder, **change) -> tuple[dict, list[str]]:
    """train() resumed from `folder`'s checkpoint with `change`; its result and the
    ResumeWarnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(TrainConfig(**{**SMALL, **change}, out=str(folder),
                                   resume=str(folder / "checkpoint.pt")))
    return result, [str(w.message) for w in caught if w.category is ResumeWarning]


def _files(folder) -> dict:
    return {name: ((folder / name).read_bytes(), os.stat(folder / name).st_mtime_ns)
            for name in sorted(os.listdir(folder))}


@pytest.mark.parametrize("saved", ["fp32", "bf16"])
def test_an_fp16_run_resumes_a_checkpoint_without_scaler_state(tmp_path, saved):
    train(TrainConfig(**SMALL, out=str(tmp_path), amp=saved, max_iters=8))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["scaler"] == {}
    result, (note,) = _resume(tmp_path, amp="fp16", max_iters=10)
    assert note.startswith(f"--amp fp16 resumes the checkpoint of an --amp {saved} run")
    assert "holds no loss-scaler state, with a fresh GradScaler" in note
    assert result["iterations"][-1]["iteration"] == 8 and len(result["epochs"]) == 1
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["state"]["iteration"] == 10 and ckpt["scaler"]["scale"] > 0
    assert ckpt["config"]["amp"] == "fp16"


def test_an_fp32_run_resumes_an_fp16_checkpoint_without_its_loss_scale(tmp_path):
    train(TrainConfig(**SMALL, out=str(tmp_path), amp="fp16", max_iters=8))
    _, (note,) = _resume(tmp_path, max_iters=9)
    assert note.startswith("--amp fp32 resumes the checkpoint of an --amp fp16 run")
    assert "loss scale (its GradScaler state) is dropped" in note
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["scaler"] == {}


def test_the_same_settings_resume_without_a_warning(tmp_path):
    train(TrainConfig(**SMALL, out=str(tmp_path), max_iters=8))
    assert _resume(tmp_path, max_iters=9)[1] == []


def test_other_epochs_at_an_epoch_boundary_are_warned_with_the_lr_schedule(tmp_path):
    train(TrainConfig(**SMALL, out=str(tmp_path)))  # both epochs: lr 0.1, 0.01, 0.001
    _, (note,) = _resume(tmp_path, epochs=4, max_iters=17)
    assert note == ("--resume with --epochs 4 (the checkpoint's run: 2): the schedule is 32 "
                    "steps long, not 16; the lr drops 10x after steps 16, 24 (the "
                    "checkpoint's run: 8, 12); the next step's lr is 0.01, not 0.001")


def test_another_batch_size_at_an_epoch_boundary_is_warned(tmp_path):
    train(TrainConfig(**SMALL, out=str(tmp_path), max_iters=8))  # epoch 1 of 2 done
    _, (note,) = _resume(tmp_path, batch_size=4, max_iters=9)
    assert note == ("--resume with --batch-size 4 (the checkpoint's run: 8): the schedule is "
                    "32 steps long, not 16; an epoch is 16 steps, not 8, and the schedule "
                    "counts on from the 8 steps done; the lr drops 10x after steps 16, 24 (the "
                    "checkpoint's run: 8, 12); the next step's lr is 0.1, not 0.01")


def test_other_epochs_inside_an_epoch_are_warned(tmp_path):
    train(TrainConfig(**SMALL, out=str(tmp_path), max_iters=5))
    _, (note,) = _resume(tmp_path, epochs=3, max_iters=6)
    assert note.startswith("--resume with --epochs 3 (the checkpoint's run: 2): the schedule "
                           "is 24 steps long, not 16; the lr drops 10x after steps 12, 18")


def test_another_batch_size_inside_an_epoch_stays_refused_and_changes_nothing(tmp_path):
    train(TrainConfig(**SMALL, out=str(tmp_path), max_iters=5))
    before = _files(tmp_path)
    with warnings.catch_warnings(record=True) as caught, \
            pytest.raises(ValueError, match="continuing inside an epoch needs the same batches"):
        warnings.simplefilter("always")
        train(TrainConfig(**{**SMALL, "batch_size": 4, "epochs": 3, "amp": "fp16"},
                          out=str(tmp_path), resume=str(tmp_path / "checkpoint.pt")))
    assert [w for w in caught if w.category is ResumeWarning] == []
    assert _files(tmp_path) == before


def test_a_refused_resume_warns_of_nothing_and_changes_nothing(tmp_path):
    train(TrainConfig(**SMALL, out=str(tmp_path)))
    before = _files(tmp_path)
    with warnings.catch_warnings(record=True) as caught, \
            pytest.raises(ValueError, match="nothing left to train"):
        warnings.simplefilter("always")
        train(TrainConfig(**{**SMALL, "batch_size": 16, "amp": "fp16"}, out=str(tmp_path),
                          resume=str(tmp_path / "checkpoint.pt")))
    assert [w for w in caught if w.category is ResumeWarning] == []
    assert _files(tmp_path) == before


class _Cfg:
    epochs, batch_size, schedule, milestones, max_iters = 3, 16, "milestones", (0.5, 0.75), None


@pytest.mark.parametrize("batch_size, ends", [
    # 32 images: 2 steps an epoch at 16, after 1 epoch of 4 steps at 8: the schedule's 6
    # steps are done after epoch 2 of 3
    (16, "; the run ends at step 6 of the schedule's 6, with 2 of --epochs 3 finished"),
    # 8 steps an epoch at 4: epochs 2 and 3 end at step 20 of the schedule's 24
    (4, "; the run ends at step 20 of the schedule's 24, with 3 of --epochs 3 finished"),
])
def test_where_a_run_with_another_batch_size_ends(batch_size, ends):
    cfg = _Cfg()
    cfg.batch_size = batch_size
    state = {"epoch": 1, "iteration": 4}
    note = schedule_change({"epochs": 2, "batch_size": 8}, cfg, state, 0,
                           lambda batch: 32 // batch, lambda step, total: 0.1)
    assert note.endswith(ends), note
    assert note.startswith(f"--resume with --epochs 3 (the checkpoint's run: 2) and "
                           f"--batch-size {batch_size} (the checkpoint's run: 8)")


def test_the_cli_prints_a_resume_warning_as_one_line(capsys, tmp_path):
    args = ["train", "--arch", "cifar_resnet20", "--epochs", "1", "--batch-size", "8",
            "--synthetic-size", "16", "--image-size", "8", "--no-progress", "--out",
            str(tmp_path)]
    assert main(args) == 0
    capsys.readouterr()
    args[args.index("--epochs") + 1] = "2"
    assert main(args + ["--resume", str(tmp_path / "checkpoint.pt")]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "warning" in line]
    assert lines == ["python -m fused_resnet train: warning: --resume with --epochs 2 (the "
                     "checkpoint's run: 1): the schedule is 4 steps long, not 2; the lr drops "
                     "10x after steps 2, 3 (the checkpoint's run: 1, 2); the next step's lr "
                     "is 0.01, not 0.001"], err


@pytest.mark.parametrize("args, message", [
    (("--arch", "resnet51"), "--arch: unknown model 'resnet51'; expected one of resnet18"),
    (("--arch", "cifar_resnet21"), "--arch cifar_resnet21: depth must be 6n+2"),
    (("--arch", "resnet18", "--weights", "IMAGENET1K_V9"), "--weights must name one of"),
])
def test_train_model_errors_name_the_flag(capsys, tmp_path, monkeypatch, args, message):
    def must_not_run(*a, **k):
        raise AssertionError("ran before the arguments were checked")

    pytest.importorskip("torchvision")
    monkeypatch.setattr("fused_resnet.train.loop.make_datasets", must_not_run)
    rc = main(["train", *args, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"python -m fused_resnet train: error: {message}"), line
    assert not (tmp_path / "run").exists()
