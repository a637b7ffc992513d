"""The checkpoint of `python -m fused_resnet train`: all a resumed run needs to take the very
steps the uninterrupted run would take.

It holds the model, the optimizer (its momentum buffers), the GradScaler, the run's config
and the loop state: epoch, global iteration, the plateau schedule's memory, the log rows so
far, and each rank's running sums (`RANK_SUMS`: those the epoch row and the next
iterations.csv row average). `train` writes one after every epoch, and one where --max-iters
stops a run inside an epoch: then "epoch" is still the unfinished epoch and "in_epoch" says
how many of its steps are done, with the batch size and number of processes that define a
step, and the images and seconds the epoch's img/s needs. At an epoch boundary "in_epoch" is
None. Checkpoints written before "in_epoch" and "rank_sums" existed load as boundaries with
empty sums.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import torch
from torch import nn

CHECKPOINT_KEYS = ("model", "optimizer", "scaler", "state")
# the loop state's keys every checkpoint has; newer ones add "in_epoch" and "rank_sums"
STATE_KEYS = ("epoch", "iteration", "plateau", "iterations", "epochs")
# one rank's running sums: over the epoch so far, and since the last iterations.csv row
RANK_SUMS = ("epoch_loss", "epoch_wrong", "epoch_images", "log_loss", "log_wrong",
             "log_images")


def new_loop_state() -> dict:
    """The loop's state at the start of a run (a checkpoint's "state" has these keys)."""
    return {"epoch": 0, "iteration": 0, "plateau": {"scale": 1.0, "best": math.inf, "bad": 0},
            "iterations": [], "epochs": [], "in_epoch": None,
            "rank_sums": [[0.0] * len(RANK_SUMS)]}


def save_checkpoint(path: str, model: nn.Module, opt, scaler, state: dict, cfg) -> None:
    """Everything a resumed run needs, written atomically (temp file, then rename)."""
    payload = {"model": model.state_dict(), "optimizer": opt.state_dict(),
               "scaler": scaler.state_dict(), "state": state, "config": dataclasses.asdict(cfg)}
    torch.save(payload, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path: str, model: nn.Module, opt, scaler, dev: torch.device) -> dict:
    """Restores model, optimizer and scaler from `path`; returns the loop state as saved.

    The optimizer keeps this run's hyperparameters (momentum, weight decay, dampening,
    nesterov, the update's implementation: what the command line asked for) and takes only
    the checkpoint's per-parameter state, the momentum buffers: `load_state_dict` alone would
    bring back the saved run's settings while this run's config records its own."""
    if not os.path.isfile(path):
        raise ValueError(f"--resume: no checkpoint at {path!r}")
    try:
        payload = torch.load(path, map_location=dev, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever the reader met, the file is unreadable
        raise ValueError(f"--resume {path!r} is not a checkpoint torch can read "
                         f"({type(exc).__name__}); give the checkpoint.pt a train run wrote"
                         ) from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise ValueError(f"--resume {path!r} is not a checkpoint of `train` (it lacks "
                         f"{', '.join(missing)}); give the checkpoint.pt a train run wrote")
    saved = payload.get("config", {}).get("arch") if isinstance(payload.get("config"), dict) \
        else None
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError:
        of = f" of {saved}" if saved else ""
        raise ValueError(f"--resume {path!r} is a checkpoint{of} whose weights do not fit "
                         f"this run's model; resume with the --arch it was trained with"
                         ) from None
    # this run's group settings, put back over the saved ones after loading
    chosen = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    try:
        opt.load_state_dict(payload["optimizer"])
        scaler.load_state_dict(payload["scaler"])
        state = payload["state"]
        if not isinstance(state, dict) or not set(STATE_KEYS) <= set(state):
            raise KeyError("state")
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ValueError(f"--resume {path!r}: its optimizer, scaler or loop state does not "
                         f"fit this run ({type(exc).__name__}: {exc})") from None
    for group, settings in zip(opt.param_groups, chosen):
        group.update(settings)
    return state


def check_steps_left(state: dict, path: str, epochs: int, max_iters: Optional[int],
                     stop: int) -> None:
    """Raises ValueError where a resumed run's --epochs / --max-iters (`stop`: the step it
    ends at) leave it no step to take."""
    if state["epoch"] < epochs and state["iteration"] < stop:
        return
    limit = (f"--max-iters {max_iters}" if max_iters is not None
             and state["iteration"] >= max_iters else f"--epochs {epochs}")
    done = f"{state['epoch']} epoch{'' if state['epoch'] == 1 else 's'}"
    if state.get("in_epoch"):
        done += f" and {state['in_epoch']['steps']} steps of epoch {state['epoch'] + 1}"
    raise ValueError(f"--resume {path!r} has already run {done} ({state['iteration']} "
                     f"iterations), as far as {limit} goes: nothing left to train; raise "
                     f"{limit.split()[0]} to continue it")


def steps_done_in_epoch(state: dict, path: str, batch_size: int, world: int,
                        per_epoch: int) -> int:
    """How many steps of `state["epoch"]` a checkpoint has taken (0 at an epoch boundary).
    A resume inside an epoch skips that many batches of the epoch's loader, so they must be
    the same batches: the same --batch-size and number of processes (a ValueError else)."""
    in_epoch: Optional[dict] = state.get("in_epoch")
    if not in_epoch:
        return 0
    steps, saved_batch, saved_world = (in_epoch["steps"], in_epoch["batch_size"],
                                       in_epoch["world"])
    where = f"stopped after step {steps} of epoch {state['epoch'] + 1}"
    if (saved_batch, saved_world) != (batch_size, world):
        raise ValueError(
            f"--resume {path!r} {where}, with --batch-size {saved_batch} on {saved_world} "
            f"process(es); continuing inside an epoch needs the same batches: resume with "
            f"--batch-size {saved_batch} on {saved_world} process(es) (got --batch-size "
            f"{batch_size} on {world})")
    if steps >= per_epoch:
        raise ValueError(f"--resume {path!r} {where}, but an epoch of this run's data has "
                         f"{per_epoch} steps; resume with the --data (and --synthetic-size) it "
                         "was trained on")
    return steps


def restored_sums(state: dict, rank: int, world: int) -> list[float]:
    """This rank's `RANK_SUMS` from a loop state. Saved by as many processes as now run:
    each rank takes its own. Saved by another number (only at an epoch boundary, where the
    epoch's sums are zero; `steps_done_in_epoch` refuses the rest): rank 0 takes every
    rank's log sums added up, the other ranks zeros, so the next row's all-reduce still
    counts each step once."""
    saved = state.get("rank_sums") or [[0.0] * len(RANK_SUMS)]
    if len(saved) == world:
        return [float(v) for v in saved[rank]]
    if rank != 0:
        return [0.0] * len(RANK_SUMS)
    return [float(sum(column)) for column in zip(*saved)]
