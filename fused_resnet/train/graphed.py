"""A training step replayed from a CUDA graph: `python -m fused_resnet train --cuda-graphs`.

A ResNet-50 training step launches some 350 Triton kernels and a few thousand ATen ops; on
the host that is ~15-25 ms of Python and launch calls, as much as the GPU's work at batch 256
in bf16 on an H100. Captured once into a CUDA graph, the whole step (forward under autocast,
the loss, backward, the optimizer's update and the BNs' running stats) is one replay call.

What capture needs, and `CapturedTrainStep` checks or arranges:
- fixed shapes and addresses: the batch is copied into the graph's input tensors, so every
  call takes the first call's shapes (a loader that drops the last partial batch);
- nothing that reads the device on the host inside the step: no BN with `momentum=None`
  (its factor 1 / num_batches_tracked is read on the host), no optimizer that keeps its
  step count on the host (torch.optim's Adam family needs `capturable=True`; SGD has no
  count); fp16's GradScaler only with an optimizer that takes the inf check on the device
  (`SGD(..., fused=True)`: GradScaler hands it the scale and the found-inf flag, the fused
  update unscales and skips itself when the flag is set, and the scale's update is a
  device op), else `GradScaler.step` reads the flag to decide whether to step;
- state made before the capture: the first `warmup` calls run eagerly on a side stream
  (Triton's autotuner, the optimizer's momentum buffers, cuBLAS workspaces), and the
  gradients are set to None before capture so that backward allocates them in the
  graph's memory pool;
- autocast without its cast cache (a cached cast made before the capture would be freed
  while the graph still reads it);
- values the graph bakes in: the learning rate is a constant of the captured update, so a
  call that finds any param group's lr changed captures the step again (a schedule with a
  few milestones recaptures a few times; one that changes lr every step gains nothing).

Fused SGD with a GradScaler has a hazard of its own (torch's, eager too): its first update
makes the momentum buffers with `empty_like` and, when that step's gradients overflow, skips
writing them, so the next update reads uninitialized memory. With a scaler this class gives
a fused SGD zero momentum buffers before the first step: with dampening 0 the first update
is then b = momentum * 0 + g = g, what a first step computes, and a skipped first step
leaves the zeros.

Replays move no version counter, so the BN folds cached for inference would not see the
weights change: this package's modules drop them when they enter training mode
(`model.train()`), which every eval-then-train round trip does.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def prime_momentum_buffers(optimizer: torch.optim.Optimizer) -> None:
    """Gives each parameter of a momentum SGD group a zero momentum buffer where it has none
    (see the module's note on fused SGD with a GradScaler). Exact only with dampening 0:
    raises ValueError naming the group otherwise, before any buffer is made."""
    groups = [g for g in optimizer.param_groups if g.get("momentum", 0) != 0]
    for i, group in enumerate(groups):
        if group.get("dampening", 0) != 0:
            raise ValueError(f"optimizer: param group {i} has dampening "
                             f"{group['dampening']}; zero momentum buffers (what a fused "
                             "SGD under a GradScaler starts from here) give SGD's first "
                             "update only with dampening 0")
    for group in groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if p.requires_grad and state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(
                    p, memory_format=torch.preserve_format)


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                  loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor, *,
                  amp_dtype: Optional[torch.dtype] = None,
                  scaler: Optional[torch.amp.GradScaler] = None) -> tuple[Tensor, Tensor]:
    """The step `CapturedTrainStep` runs and captures, and `train` runs eagerly without
    graphs (gradients already None or zero):
    forward under autocast on x's device without its cast cache, the loss in fp32,
    backward, the update; with a scaler, GradScaler's scale / step / update (with a fused
    optimizer all on the device). Returns (loss, logits), detached, the loss unscaled."""
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None,
                        cache_enabled=False):
        logits = model(x)
    loss = loss_fn(logits.float(), y)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return loss.detach(), logits.detach()


class CapturedTrainStep:
    """`step(x, y)` is one training step on the batch (x, y): logits = model(x) under
    autocast to `amp_dtype` (None: no autocast), loss = loss_fn(logits.float(), y),
    backward, optimizer.step(); with an enabled `scaler` (fp16) the loss is scaled before
    backward and the scaler steps the optimizer and updates its scale, all on the device.
    Returns (loss, logits) as tensors the next call overwrites (the loss unscaled). The first
    `warmup` calls run eagerly, the next captures the step and every call from then on
    replays it."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy, *,
                 amp_dtype: Optional[torch.dtype] = None,
                 scaler: Optional[torch.amp.GradScaler] = None, warmup: int = 3):
        from fused_resnet.nn import FusedSyncBatchNorm

        for name, m in model.named_modules():
            if isinstance(m, (nn.SyncBatchNorm, FusedSyncBatchNorm)):
                raise ValueError(f"model.{name}: a synchronized BN exchanges statistics "
                                 "between processes, reading counts on the host; CUDA graphs "
                                 "here take one process's BNs")
            if (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is None
                    and m.track_running_stats):
                raise ValueError(f"model.{name}: momentum=None (a cumulative average) reads "
                                 "num_batches_tracked on the host every step, which a CUDA "
                                 "graph cannot replay; give it a momentum")
        if optimizer.defaults.get("capturable") is False:
            raise ValueError(f"optimizer: {type(optimizer).__name__} keeps its step count on "
                             "the host; construct it with capturable=True")
        scaling = scaler is not None and scaler.is_enabled()
        if scaling and not getattr(optimizer, "_step_supports_amp_scaling", False):
            raise ValueError(f"optimizer: GradScaler reads the inf check on the host before "
                             f"stepping {type(optimizer).__name__}; give it an optimizer "
                             "that skips overflowed steps on the device, e.g. "
                             "torch.optim.SGD(..., fused=True)")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (eager steps before the capture), got "
                             f"{warmup}")
        params = list(model.parameters())
        if not params or any(p.device.type != "cuda" for p in params):
            raise ValueError("model: CUDA graphs need every parameter on a CUDA device")
        if scaling and isinstance(optimizer, torch.optim.SGD):
            prime_momentum_buffers(optimizer)
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.scaler = scaler if scaling else None
        self.amp_dtype, self.warmup = amp_dtype, warmup
        self.calls = 0  # steps taken
        self.captures = 0  # how many times the step was captured (lr changes recapture)
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._lrs: list[float] = []
        self._static: tuple[Tensor, ...] = ()  # x, y, loss, logits of the graph

    def _step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return training_step(self.model, self.optimizer, self.loss_fn, x, y,
                             amp_dtype=self.amp_dtype, scaler=self.scaler)

    def _check_batch(self, x: Tensor, y: Tensor) -> None:
        for name, t in (("x", x), ("y", y)):
            if not isinstance(t, Tensor) or t.device.type != "cuda":
                raise ValueError(f"{name}: expected a CUDA tensor, got "
                                 f"{getattr(t, 'device', type(t).__name__)}")
        if self._static:
            for name, t, s in (("x", x, self._static[0]), ("y", y, self._static[1])):
                if t.shape != s.shape or t.dtype != s.dtype:
                    raise ValueError(f"{name}: shape {tuple(t.shape)} {t.dtype} differs from "
                                     f"the captured {tuple(s.shape)} {s.dtype}; a CUDA graph "
                                     "replays fixed shapes (drop the last partial batch)")

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        self._check_batch(x, y)
        if self.calls < self.warmup:
            self.optimizer.zero_grad(set_to_none=True)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self._step(x, y)
            torch.cuda.current_stream().wait_stream(side)
            self.calls += 1
            return out
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        if self._graph is None or lrs != self._lrs:
            self._capture(x, y)
            self._lrs = lrs
        static_x, static_y, loss, logits = self._static
        static_x.copy_(x)
        static_y.copy_(y)
        self._graph.replay()
        self.calls += 1
        return loss, logits

    def _capture(self, x: Tensor, y: Tensor) -> None:
        """Captures the step with inputs shaped (and laid out) like x, y; replaces the graph
        (and its memory pool) of an earlier capture."""
        if any(isinstance(g["lr"], Tensor) for g in self.optimizer.param_groups):
            raise ValueError("optimizer: a tensor learning rate is read on the host by the "
                             "update; use a float lr")
        self._graph, self._static = None, ()
        static_x = torch.empty_like(x, memory_format=torch.preserve_format)
        static_y = torch.empty_like(y)
        self.optimizer.zero_grad(set_to_none=True)  # backward allocates them in the pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss, logits = self._step(static_x, static_y)
        self._graph, self._static = graph, (static_x, static_y, loss, logits)
        self.captures += 1
