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
empty sums. A resume with another --amp, --epochs or --batch-size (the last at a boundary
only) than the checkpoint's run goes on, with a ResumeWarning saying what that changes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Optional

import torch
from torch import nn

from fused_resnet.flags import flag

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


def read_checkpoint(path: str, dev: torch.device) -> dict:
    """The checkpoint at `path` (tensors on `dev`), with the keys every one has; a
    ValueError naming --resume and the file where it is none."""
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
    return payload


def saved_config(payload: dict) -> dict:
    """The config of the run that wrote `payload` ({} in checkpoints without one)."""
    config = payload.get("config")
    return config if isinstance(config, dict) else {}


def restore_checkpoint(payload: dict, path: str, model: nn.Module, opt, scaler) -> dict:
    """Restores model, optimizer and scaler from a `read_checkpoint`; returns the loop state
    as saved.

    The optimizer keeps this run's hyperparameters (momentum, weight decay, dampening,
    nesterov, the update's implementation: what the command line asked for) and takes only
    the checkpoint's per-parameter state, the momentum buffers: `load_state_dict` alone would
    bring back the saved run's settings while this run's config records its own. An fp16
    run (its scaler enabled) resuming a checkpoint without loss-scaler state (an fp32 or
    bf16 run's: a disabled GradScaler saves {}) keeps its fresh scaler, as a new fp16 run
    starts: the state is only the dynamic loss scale, which the scaler finds again within
    its first steps (`amp_change` says so). A disabled scaler ignores a saved state."""
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError:
        saved = saved_config(payload).get("arch")
        of = f" of {saved}" if saved else ""
        raise ValueError(f"--resume {path!r} is a checkpoint{of} whose weights do not fit "
                         f"this run's model; resume with the --arch it was trained with"
                         ) from None
    # this run's group settings, put back over the saved ones after loading
    chosen = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    try:
        opt.load_state_dict(payload["optimizer"])
        if payload["scaler"]:  # {} (no fp16 run's): this run's scaler stays as it is
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


def load_checkpoint(path: str, model: nn.Module, opt, scaler, dev: torch.device) -> dict:
    """`restore_checkpoint` of `read_checkpoint(path, dev)`: the loop state as saved."""
    return restore_checkpoint(read_checkpoint(path, dev), path, model, opt, scaler)


class ResumeWarning(UserWarning):
    """A resume whose command line changes what the checkpoint's run would have done next
    (`train` continues as asked; `python -m fused_resnet train` prints it as one line)."""


def amp_change(payload: dict, amp: str) -> Optional[str]:
    """A warning where this run's --amp is not the checkpoint's (its config's; in a
    checkpoint without one, fp16 where it holds a loss scale), else None."""
    saved = saved_config(payload).get("amp") or ("fp16" if payload["scaler"] else None)
    if saved == amp or (saved is None and amp != "fp16"):
        return None
    run = f"an --amp {saved} run" if saved else "a run without fp16"
    text = f"--amp {amp} resumes the checkpoint of {run}: the steps from here compute in {amp}"
    if amp == "fp16" and not payload["scaler"]:
        text += (", and, as the checkpoint holds no loss-scaler state, with a fresh "
                 "GradScaler (as a new fp16 run: it skips the first steps whose scaled "
                 "gradients overflow while it finds its scale)")
    elif saved == "fp16":
        text += ", and the checkpoint's loss scale (its GradScaler state) is dropped"
    return text


def schedule_change(saved: dict, cfg, state: dict, skip: int, steps: Callable[[int], int],
                    lr: Callable[[int, int], float]) -> Optional[str]:
    """A warning where this run's --epochs or --batch-size is not the checkpoint's config's
    (`saved`), saying what that changes: the schedule counts steps (the lr milestones are
    fractions of epochs x steps per epoch), the steps done count as they are, so the lr
    milestones move and the lr can jump, and the run can end at a step other than the
    schedule's last. `steps(batch_size)`: steps per epoch of this run's data; `lr(step,
    total)`: this run's lr at a step of a schedule `total` steps long; `skip`: steps done
    in the unfinished epoch. None where both flags are as saved (or not saved)."""
    changed = [(name, saved[name], getattr(cfg, name)) for name in ("epochs", "batch_size")
               if name in saved and saved[name] != getattr(cfg, name)]
    if not changed:
        return None
    per_epoch = steps(cfg.batch_size)
    saved_per_epoch = steps(saved.get("batch_size", cfg.batch_size))
    total, saved_total = cfg.epochs * per_epoch, saved.get("epochs", cfg.epochs) * saved_per_epoch
    done = state["iteration"]
    given = " and ".join(f"{flag(n)} {new} (the checkpoint's run: {old})"
                         for n, old, new in changed)
    text = [f"--resume with {given}: the schedule is {total} steps long, not {saved_total}"]
    if per_epoch != saved_per_epoch:
        text.append(f"an epoch is {per_epoch} steps, not {saved_per_epoch}, and the schedule "
                    f"counts on from the {done} steps done")
    if cfg.schedule == "milestones":
        text.append("the lr drops 10x after steps " + _drops(cfg.milestones, total)
                    + f" (the checkpoint's run: {_drops(cfg.milestones, saved_total)})")
    if lr(done, total) != lr(done, saved_total):
        text.append(f"the next step's lr is {lr(done, total):g}, not "
                    f"{lr(done, saved_total):g}")
    step, epoch = done, state["epoch"]  # where this run's loop stops
    stop = total if cfg.max_iters is None else min(total, cfg.max_iters)
    while epoch < cfg.epochs and step < stop:
        taken = min(per_epoch - skip, stop - step)
        step, skip = step + taken, skip + taken
        if skip < per_epoch:
            break
        epoch, skip = epoch + 1, 0
    if step < stop or (epoch < cfg.epochs and step < (cfg.max_iters or math.inf)):
        text.append(f"the run ends at step {step} of the schedule's {total}, with {epoch} "
                    f"of --epochs {cfg.epochs} finished")
    return "; ".join(text)


def _drops(milestones, total: int) -> str:
    """The steps after which `lr_at` divides the lr by 10 (it does from the 0-based step
    at or after each fraction of `total`: after that many steps)."""
    return ", ".join(str(math.ceil(m * total)) for m in milestones)


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
