"""`train --resume` on CPU: a run stopped by --max-iters inside an epoch and resumed ends bit
for bit where the uninterrupted run ends (weights, BN running statistics, momentum buffers,
both logs), on synthetic data and on an augmented ImageFolder; iterations.csv rows average
every step since the row before, across epochs and resumes; a resume takes the command
line's optimizer settings; a resume inside an epoch with other batches is refused before
anything is written."""

import csv
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fused_resnet.train import TrainConfig, train

pytest.importorskip("fused_resnet._C")

# 64 images in batches of 8: 8 steps an epoch, 16 in the run
SMALL = dict(arch="cifar_resnet20", epochs=2, batch_size=8, synthetic_size=64, image_size=8,
             backend="cpu", device="cpu", log_every=3, progress=False)
TIMING = ("images_per_s", "seconds")  # the clock's columns: never equal between two runs


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _checkpoint(folder):
    return torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=True)


def _assert_same_run(whole, resumed):
    """The two run folders' final checkpoints and logs are bit-equal (timing aside)."""
    a, b = _checkpoint(whole), _checkpoint(resumed)
    assert a["model"].keys() == b["model"].keys()
    for name, value in a["model"].items():  # weights and BN running statistics
        assert torch.equal(value, b["model"][name]), name
    buffers = [(s["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])
               for i, s in a["optimizer"]["state"].items()]
    assert buffers and all(torch.equal(x, y) for x, y in buffers)
    assert a["state"]["iterations"] == b["state"]["iterations"]
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in a["state"]["epochs"]] \
        == [{k: v for k, v in r.items() if k not in TIMING} for r in b["state"]["epochs"]]
    assert a["state"].get("rank_sums") == b["state"].get("rank_sums")
    for name in ("iterations.csv", "epochs.csv"):
        assert [{k: v for k, v in r.items() if k not in TIMING}
                for r in rows(os.path.join(whole, name))] == \
            [{k: v for k, v in r.items() if k not in TIMING}
             for r in rows(os.path.join(resumed, name))], name


def test_stop_inside_an_epoch_records_the_step_and_no_epoch_row(tmp_path):
    train(TrainConfig(**SMALL, out=str(tmp_path), max_iters=5))
    state = _checkpoint(tmp_path)["state"]
    assert (state["epoch"], state["iteration"]) == (0, 5)  # epoch 1 is not finished
    assert state["in_epoch"]["steps"] == 5 and state["in_epoch"]["images"] == 40
    assert state["epochs"] == [] and not (tmp_path / "epochs.csv").exists()
    assert [int(r["iteration"]) for r in rows(tmp_path / "iterations.csv")] == [3]
    # steps 4 and 5, since the row at step 3, wait in the checkpoint for the row at step 6
    epoch_loss, epoch_wrong, epoch_images, log_loss, log_wrong, log_images = \
        state["rank_sums"][0]
    assert (epoch_images, log_images) == (40, 16)
    assert 0 < log_loss < epoch_loss and log_wrong <= epoch_wrong


def test_resume_inside_an_epoch_is_bit_equal_to_the_uninterrupted_run(tmp_path):
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    train(TrainConfig(**SMALL, out=whole))
    # stopped at step 5 of epoch 1, then at step 11 (step 3 of epoch 2), then run to the end
    train(TrainConfig(**SMALL, out=cut, max_iters=5))
    train(TrainConfig(**SMALL, out=cut, max_iters=11, resume=cut + "/checkpoint.pt"))
    result = train(TrainConfig(**SMALL, out=cut, resume=cut + "/checkpoint.pt"))
    assert [r["iteration"] for r in result["iterations"]] == [3, 6, 9, 12, 15]
    assert [r["iteration"] for r in result["epochs"]] == [8, 16]
    _assert_same_run(whole, cut)


def _image_folder(root, size=32):
    """Two classes of 6 random images, size x size."""
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        os.makedirs(root / name)
        for i in range(6):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return str(root)


def test_resume_inside_an_epoch_of_augmented_images_is_bit_equal(tmp_path):
    """Random crops and flips draw from the global RNG as batches load: the resumed run
    must draw the skipped batches' augmentations too to crop the next ones alike."""
    data = _image_folder(tmp_path / "images")
    folder = dict(arch="cifar_resnet20", data=data, epochs=2, batch_size=4, workers=0,
                  backend="cpu", device="cpu", log_every=2, progress=False)
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    train(TrainConfig(**folder, out=whole))  # 3 steps an epoch
    train(TrainConfig(**folder, out=cut, max_iters=2))
    train(TrainConfig(**folder, out=cut, resume=cut + "/checkpoint.pt"))
    _assert_same_run(whole, cut)


def test_log_rows_average_every_step_since_the_row_before(tmp_path):
    """log_every 3 over epochs of 8 steps: rows at 3, 6, 9, 12 and 15, each the mean of the
    3 steps before it; the row at 9 holds epoch 1's steps 7 and 8 too."""
    per_step = train(TrainConfig(**{**SMALL, "log_every": 1}, out=str(tmp_path / "one")))
    loss = {r["iteration"]: r["loss"] for r in per_step["iterations"]}
    err = {r["iteration"]: r["train_err"] for r in per_step["iterations"]}
    logged = train(TrainConfig(**SMALL, out=str(tmp_path / "three")))["iterations"]
    previous = 0
    for row in logged:
        steps = range(previous + 1, row["iteration"] + 1)
        assert row["loss"] == pytest.approx(sum(loss[i] for i in steps) / len(steps),
                                            rel=1e-12), row["iteration"]
        assert row["train_err"] == pytest.approx(sum(err[i] for i in steps) / len(steps),
                                                 rel=1e-12), row["iteration"]
        previous = row["iteration"]
    assert [r["iteration"] for r in logged] == [3, 6, 9, 12, 15]


def test_resume_takes_the_command_lines_momentum_and_weight_decay(tmp_path):
    out = str(tmp_path)
    train(TrainConfig(**SMALL, out=out, max_iters=8))
    train(TrainConfig(**SMALL, out=out, resume=out + "/checkpoint.pt", weight_decay=0.05,
                      momentum=0.5))
    saved = _checkpoint(out)
    for group in saved["optimizer"]["param_groups"]:
        assert (group["momentum"], group["weight_decay"]) == (0.5, 0.05)
    assert (saved["config"]["momentum"], saved["config"]["weight_decay"]) == (0.5, 0.05)


def test_resume_that_turns_momentum_on_starts_from_zero_buffers(tmp_path):
    out = str(tmp_path)
    train(TrainConfig(**SMALL, out=out, max_iters=8, momentum=0.0))
    assert _checkpoint(out)["optimizer"]["state"] == {}  # momentum 0: no buffers saved
    train(TrainConfig(**SMALL, out=out, resume=out + "/checkpoint.pt", momentum=0.9))
    state = _checkpoint(out)["optimizer"]["state"]
    assert state and all(s["momentum_buffer"] is not None for s in state.values())


@pytest.mark.parametrize("change, message", [
    ({"batch_size": 4}, "stopped after step 5 of epoch 1, with --batch-size 8 on 1 process"),
    ({"synthetic_size": 40}, "an epoch of this run's data has 5 steps"),
])
def test_resume_inside_an_epoch_with_other_batches_is_refused(tmp_path, change, message):
    out = str(tmp_path)
    train(TrainConfig(**SMALL, out=out, max_iters=5))
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    with pytest.raises(ValueError, match=message):
        train(TrainConfig(**{**SMALL, **change}, out=out, resume=out + "/checkpoint.pt"))
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before


def test_nothing_left_names_the_steps_done_in_the_epoch(tmp_path):
    out = str(tmp_path)
    train(TrainConfig(**SMALL, out=out, max_iters=5))
    with pytest.raises(ValueError, match=r"already run 0 epochs and 5 steps of epoch 1 "
                                         r"\(5 iterations\), as far as --max-iters 5 goes"):
        train(TrainConfig(**SMALL, out=out, max_iters=5, resume=out + "/checkpoint.pt"))
