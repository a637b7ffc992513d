"""The training loop of `python -m fused_resnet train`.

SGD with momentum 0.9 and weight decay 1e-4 (the paper's), learning rate 0.1 divided by 10 at
fixed fractions of the run's iterations (the paper's CIFAR schedule: at 32k and 48k of 64k
iterations, i.e. 0.5 and 0.75) or, with `schedule="plateau"`, when the validation loss has
not improved for `patience` epochs; optional warm-up at lr / 10 (the paper's 110-layer net).
Mixed precision: bf16 autocast, or fp16 autocast with a GradScaler (the fused SGD update
reads its inf check on the device, so fp16 steps read nothing back either). Everything a
resumed run needs is in the checkpoint (checkpoint.py) written after every epoch and where
--max-iters stops the run inside one: model, optimizer, scaler, schedule, epoch, iteration,
the steps done in an unfinished epoch, the running sums of the next log row and epoch row,
the log so far. The data order and the augmentations' draws depend only on (seed, epoch),
and a resume inside an epoch draws and drops the batches already trained on, so a resumed
run takes the very steps the uninterrupted run takes (on CPU bit for bit).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fused_resnet.flags import flag
from fused_resnet.models import build_model, is_cifar, with_classes
from fused_resnet.testing import DTYPES
from fused_resnet.train.checkpoint import (
    ResumeWarning,
    amp_change,
    check_steps_left,
    load_checkpoint,  # noqa: F401 - re-exported: tests import it from here
    new_loop_state,
    read_checkpoint,
    restore_checkpoint,
    restored_sums,
    save_checkpoint,
    saved_config,
    schedule_change,
    steps_done_in_epoch,
)
from fused_resnet.train.data import data_workers, make_datasets, make_loader
from fused_resnet.train.graphed import prime_momentum_buffers, training_step

AMP = ("fp32", "bf16", "fp16")
SCHEDULES = ("milestones", "plateau")


@dataclass
class TrainConfig:
    arch: str = "cifar_resnet56"
    data: str = "synthetic"
    epochs: int = 2
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "milestones"
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of all iterations
    patience: int = 2  # epochs without a better validation loss, for "plateau"
    warmup_iters: int = 0  # iterations at lr / 10 first
    amp: str = "fp32"
    backend: str = "auto"
    out: str = "runs"
    resume: Optional[str] = None
    seed: int = 0
    workers: Optional[int] = None  # data-loading processes; None: `data.data_workers` decides
    synthetic_size: int = 2048
    image_size: Optional[int] = None  # synthetic data only: 32 for CIFAR nets, else 224
    log_every: int = 10
    max_iters: Optional[int] = None  # stop after this many steps (the schedule keeps epochs)
    device: Optional[str] = None
    channels_last: bool = True
    sync_bn: bool = False
    ddp: bool = False
    cuda_graphs: bool = False  # replay each step from a CUDA graph (train/graphed.py)
    weights: Optional[str] = None  # torchvision's pretrained weights to fine-tune from
    progress: bool = True

    def check(self) -> None:
        """Raises ValueError naming the first bad field by its flag (--batch-size for
        batch_size: the fields are `python -m fused_resnet train`'s arguments)."""
        for name in ("epochs", "batch_size", "log_every", "synthetic_size"):
            _at_least(name, getattr(self, name), 1)
        for name in ("image_size", "max_iters"):  # None: the default / no limit
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 1)
        for name in ("warmup_iters", "patience"):
            _at_least(name, getattr(self, name), 0)
        for name, value in (("lr", self.lr), ("momentum", self.momentum),
                            ("weight_decay", self.weight_decay)):
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{flag(name)} must be a finite number, got {value}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.amp not in AMP:
            raise ValueError(f"--amp must be one of {AMP}, got {self.amp!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if any(not 0 < m < 1 for m in self.milestones):
            raise ValueError(f"--milestones are fractions of the run in (0, 1), got "
                             f"{self.milestones}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"--workers must be >= 0 (or left out: chosen for the data), got "
                             f"{self.workers}")
        from fused_resnet.validate import check_model_flags

        check_model_flags(self.arch, self.weights)  # a bad name fails here, before any data
        if self.cuda_graphs and (self.ddp or self.sync_bn):
            raise ValueError("--cuda-graphs: a captured step cannot read the device on the host, "
                             "as DDP's and sync BN's steps do; use one GPU without sync_bn "
                             f"(got ddp={self.ddp}, sync_bn={self.sync_bn})")


def _at_least(name: str, value, low: int) -> None:
    if not isinstance(value, int) or value < low:
        raise ValueError(f"{flag(name)} must be an integer >= {low}, got {value!r}")


def lr_at(cfg: TrainConfig, iteration: int, total: int, plateau_scale: float) -> float:
    """The learning rate of `iteration` (0-based) of `total`."""
    if iteration < cfg.warmup_iters:
        return cfg.lr / 10
    if cfg.schedule == "plateau":
        return cfg.lr * plateau_scale
    return cfg.lr * 0.1 ** sum(iteration >= m * total for m in cfg.milestones)


def _setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device); with cfg.ddp the process group from torchrun's env."""
    if not cfg.ddp:
        dev = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return 0, 1, dev
    if "RANK" not in os.environ:
        raise ValueError("--ddp needs torchrun (RANK, WORLD_SIZE, MASTER_ADDR in the env): "
                         "torchrun --nproc-per-node N -m fused_resnet train --ddp ...")
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    return dist.get_rank(), dist.get_world_size(), dev


def _all_sum(values: list[float], dev: torch.device, world: int) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.tolist()


def _to_device(x: torch.Tensor, y: torch.Tensor, dev: torch.device,
               fmt: torch.memory_format) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch on `dev`; from pinned memory (the loader pins on CUDA) the copies are
    asynchronous, where a pageable one would wait for the GPU to drain its queue."""
    return (x.to(dev, non_blocking=True).contiguous(memory_format=fmt),
            y.to(dev, non_blocking=True))


def _batch_sums(loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
                n: int) -> torch.Tensor:
    """[loss * n, wrong predictions] of one batch, fp64 on the batch's device: summed there
    and read at log rows only, so that a step does not wait for the GPU (`.item()` per step
    would: the host could not queue step k + 1 while step k runs)."""
    return torch.stack([loss.detach().double() * n,
                        (logits.detach().argmax(1) != y).sum(dtype=torch.float64)])


def _gather(values: list[float], dev: torch.device, world: int) -> list[list[float]]:
    """Every rank's `values`, in rank order (a checkpoint keeps each rank's own sums)."""
    values = [float(v) for v in values]
    if world == 1:
        return [values]
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t)
    return [part.tolist() for part in parts]


def evaluate(model: nn.Module, loader, dev, dtype, fmt, world: int) -> tuple[float, float]:
    """(mean loss, error %) over the loader: under DDP each rank scores its own images (an
    unpadded split: `make_loader`) and the sums are all-reduced. `model` is the module, not
    its DDP wrapper: the wrapper's first forward after training would broadcast buffers, a
    collective a rank without validation images never joins; the broadcast is done here, so
    every rank scores with rank 0's BN running statistics, those the checkpoint saves."""
    if world > 1:
        with torch.no_grad():
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=dev)  # loss sum, wrong: read once
    count = 0
    with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
        for x, y in loader:
            x, y = _to_device(x, y, dev, fmt)
            logits = model(x).float()
            sums += _batch_sums(F.cross_entropy(logits, y, reduction="sum"), logits, y, 1)
            count += len(y)
    loss_sum, wrong, count = _all_sum([*sums.tolist(), count], dev, world)
    model.train()
    return loss_sum / max(count, 1), 100.0 * wrong / max(count, 1)


def train(cfg: TrainConfig) -> dict:
    """Runs the training; returns {"iterations": [...], "epochs": [...], "out": folder}."""
    cfg.check()
    rank, world, dev = _setup_distributed(cfg)
    cifar = is_cifar(cfg.arch)
    size = cfg.image_size if cfg.image_size is not None else 32 if cifar else 224
    train_set, val_set, classes = make_datasets(cfg.data, size, cifar, cfg.synthetic_size,
                                                cfg.seed)
    workers = data_workers(cfg, size, world)
    torch.manual_seed(cfg.seed)
    if cfg.weights is None:
        model = build_model(cfg.arch, backend=cfg.backend, num_classes=classes)
    else:  # fine-tuning: the pretrained net, with a fresh classifier for the data's classes
        from fused_resnet.validate import load_model

        model = with_classes(load_model(cfg.arch, cfg.weights, backend=cfg.backend), classes)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(dev, memory_format=fmt)
    if cfg.sync_bn:
        from fused_resnet.nn import convert_sync_bn

        model = convert_sync_bn(model)
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
    # the fused update: one multi-tensor kernel, and in fp16 GradScaler's inf check read on
    # the device (the stock SGD has GradScaler.step read it on the host every step); zero
    # momentum buffers, exact for dampening 0 and safe after an overflowed first step
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, fused=True)
    prime_momentum_buffers(opt)
    dtype = DTYPES[cfg.amp] if cfg.amp != "fp32" else None
    scaler = torch.amp.GradScaler(dev.type, enabled=cfg.amp == "fp16")
    captured = None
    if cfg.cuda_graphs:
        if dev.type != "cuda":
            raise ValueError(f"--cuda-graphs needs a CUDA device, got {dev}")
        from fused_resnet.train.graphed import CapturedTrainStep

        captured = CapturedTrainStep(net, opt, amp_dtype=dtype, scaler=scaler)
    state = new_loop_state()
    if cfg.resume:
        # the optimizer keeps this run's --momentum / --weight-decay (restore_checkpoint);
        # one that saved no momentum buffers (momentum 0 then) gets zero ones, as a fresh run
        payload = read_checkpoint(cfg.resume, dev)
        saved, notes = saved_config(payload), [amp_change(payload, cfg.amp)]
        state = restore_checkpoint(payload, cfg.resume, model, opt, scaler)
        del payload  # (the saved weights: a second copy on the device)
        prime_momentum_buffers(opt)

    def steps(batch_size: int) -> int:  # per epoch, on each rank
        return len(make_loader(train_set, batch_size, train=True, seed=cfg.seed, workers=0,
                               rank=rank, world=world))

    per_epoch = steps(cfg.batch_size)
    if per_epoch == 0:
        raise ValueError(f"batch_size {cfg.batch_size} x {world} ranks exceeds the "
                         f"{len(train_set)} training images")
    total = cfg.epochs * per_epoch  # the schedule's length
    stop = total if cfg.max_iters is None else min(total, cfg.max_iters)
    skip = 0  # steps of state["epoch"] the checkpoint has taken
    if cfg.resume:
        check_steps_left(state, cfg.resume, cfg.epochs, cfg.max_iters, stop)
        skip = steps_done_in_epoch(state, cfg.resume, cfg.batch_size, world, per_epoch)
        notes.append(schedule_change(saved, cfg, state, skip, steps, lambda step, length:
                                     lr_at(cfg, step, length, state["plateau"]["scale"])))
        for note in filter(None, notes if rank == 0 else ()):
            warnings.warn(note, ResumeWarning, stacklevel=2)
    try:
        os.makedirs(cfg.out, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {cfg.out!r}: cannot create the output folder "
                         f"({exc.strerror or exc})") from None
    from fused_resnet.train.report import epoch_bar, write_logs

    # this rank's running sums, on the device: row 0 over the epoch so far, row 1 since the
    # last iterations.csv row (kept across epochs: a row averages every step since the one
    # before), each [loss * n, wrong]; their image counts on the host
    restored = restored_sums(state, rank, world)
    sums = torch.tensor([restored[0:2], restored[3:5]], dtype=torch.float64, device=dev)
    images = [int(restored[2]), int(restored[5])]
    while state["epoch"] < cfg.epochs and state["iteration"] < stop:
        epoch = state["epoch"]
        torch.manual_seed(cfg.seed * 7919 + epoch)  # the augmentations' draws
        loader = make_loader(train_set, cfg.batch_size, train=True, seed=cfg.seed,
                             workers=workers, rank=rank, world=world, epoch=epoch,
                             pin_memory=dev.type == "cuda")
        bar = epoch_bar(loader, epoch, cfg.epochs, enabled=cfg.progress and rank == 0)
        batches = iter(bar)
        # images and seconds of the epoch before a stop inside it, for its img/s
        seen_before, seconds_before = 0, 0.0
        if skip:
            # resumed inside the epoch: the batches the stopped run trained on are drawn
            # again and dropped, which leaves the sampler's order and the augmentations'
            # random draws exactly where that run had them. It costs loading and augmenting
            # `skip` batches (no forward or backward), at most one epoch's data loading.
            for _ in range(skip):
                next(batches)
            seen_before = state["in_epoch"]["images"]
            seconds_before = state["in_epoch"]["seconds"]
        step_in_epoch, skip = skip, 0
        start = time.perf_counter()
        seen = 0
        for x, y in batches:
            lr = lr_at(cfg, state["iteration"], total, state["plateau"]["scale"])
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = _to_device(x, y, dev, fmt)
            if captured is not None:
                loss, logits = captured(x, y)
            else:  # the step a graph would capture, run eagerly (a disabled scaler passes)
                opt.zero_grad(set_to_none=True)
                loss, logits = training_step(net, opt, F.cross_entropy, x, y,
                                             amp_dtype=dtype, scaler=scaler)
            state["iteration"] += 1
            step_in_epoch += 1
            seen += len(y) * world
            sums += _batch_sums(loss, logits, y, len(y))  # both rows
            images[0] += len(y)
            images[1] += len(y)
            # a row every log_every steps of the run, each the mean of those steps
            if state["iteration"] % cfg.log_every == 0:
                loss_sum, wrong, n = _all_sum([*sums[1].tolist(), images[1]], dev, world)
                state["iterations"].append({
                    "iteration": state["iteration"], "epoch": epoch, "lr": lr,
                    "loss": loss_sum / n, "train_err": 100.0 * wrong / n})
                sums[1].zero_()
                images[1] = 0
                bar.set_postfix(loss=f"{loss_sum / n:.3f}", err=f"{100 * wrong / n:.1f}%",
                                img_s=f"{seen / (time.perf_counter() - start):.0f}")
            if state["iteration"] >= stop:
                break
        epoch_values = sums[0].tolist()  # waits for the epoch's last step: then the clock
        seconds = seconds_before + time.perf_counter() - start
        if step_in_epoch < per_epoch:
            # --max-iters stopped the run inside the epoch: no epoch row, no validation; the
            # checkpoint says how far the epoch got (steps_done_in_epoch reads it back)
            state["in_epoch"] = {"steps": step_in_epoch, "batch_size": cfg.batch_size,
                                 "world": world, "images": seen_before + seen,
                                 "seconds": seconds}
        else:
            val_loss, val_err = evaluate(model, make_loader(
                val_set, cfg.batch_size, train=False, seed=cfg.seed, workers=workers,
                rank=rank, world=world, pin_memory=dev.type == "cuda"), dev, dtype, fmt, world)
            loss_sum, wrong, n = _all_sum([*epoch_values, images[0]], dev, world)
            state["epochs"].append({
                "epoch": epoch + 1, "iteration": state["iteration"], "lr": lr,
                "train_loss": loss_sum / max(n, 1), "train_err": 100.0 * wrong / max(n, 1),
                "val_loss": val_loss, "val_err": val_err,
                "images_per_s": (seen_before + seen) / seconds, "seconds": seconds})
            _plateau_step(cfg, state["plateau"], val_loss)
            state["epoch"] = epoch + 1
            state["in_epoch"] = None
            sums[0].zero_()
            images[0] = 0
        state["rank_sums"] = _gather([*sums[0].tolist(), images[0], *sums[1].tolist(),
                                      images[1]], dev, world)
        if rank == 0:
            save_checkpoint(os.path.join(cfg.out, "checkpoint.pt"), model, opt, scaler, state,
                            cfg)
            write_logs(cfg.out, state, cfg.arch)
    if world > 1:
        dist.barrier()
    return {"out": cfg.out, "iterations": state["iterations"], "epochs": state["epochs"]}


def _plateau_step(cfg: TrainConfig, plateau: dict, val_loss: float) -> None:
    """lr / 10 after `patience` epochs without a better validation loss ("plateau")."""
    if val_loss < plateau["best"] - 1e-4:
        plateau["best"], plateau["bad"] = val_loss, 0
        return
    plateau["bad"] += 1
    if cfg.schedule == "plateau" and plateau["bad"] >= cfg.patience:
        plateau["scale"] *= 0.1
        plateau["bad"] = 0
