"""Synchronized BatchNorm for the fused blocks: `FusedSyncBatchNorm` and `convert_sync_bn`.

`FusedSyncBatchNorm` is an `nn.BatchNorm2d` (same parameters, buffers and state-dict keys)
with a `process_group`. In training under torch.distributed, with more than one rank in the
group, its batch statistics are those of the group's global batch: a fused conv + BN op
whose BN is one of these all-reduces per-channel sums once per BN (`ops.sync_conv_bn_act`),
and the module on its own (a torchvision stem after `convert(..., sync_bn=True)`) does the
same without the conv (`ops.sync_batch_norm`). Otherwise it is plain BatchNorm2d. It is not
an `nn.SyncBatchNorm` subclass: that class runs only on GPUs, and DistributedDataParallel
refuses it in CPU modules; this one runs wherever the process group does (gloo on CPU, NCCL).
"""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from torch import Tensor, nn

from fused_resnet import ops
from fused_resnet.ops.sync_bn import check_process_group


class FusedSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d over the batch of every rank of `process_group` (None: the world)."""

    def __init__(self, num_features: int, *args, process_group=None, **kwargs):
        super().__init__(num_features, *args, **kwargs)
        self.process_group = check_process_group(process_group)

    def __prepare_scriptable__(self):
        # torch.jit.script asks every module this first: refuse by name, not in TorchScript's
        # parser (nn.SyncBatchNorm does not compile either)
        raise NotImplementedError(
            "torch.jit.script cannot compile FusedSyncBatchNorm (nor torch's nn.SyncBatchNorm): "
            "script a model built without sync_bn / process_group, or use torch.jit.trace or "
            "torch.export")

    def forward(self, input: Tensor) -> Tensor:
        group = sync_group(self)
        if group is None:
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        counting = self.track_running_stats and self.num_batches_tracked is not None
        if counting and self.momentum is None:
            factor = 1.0 / (int(self.num_batches_tracked) + 1)
        out = ops.sync_batch_norm(
            input, self.weight, self.bias,
            self.running_mean if self.track_running_stats else None,
            self.running_var if self.track_running_stats else None,
            momentum=factor, eps=self.eps, group=group)
        if counting:
            self.num_batches_tracked.add_(1)
        return out


def sync_group(bn: nn.Module) -> Optional[object]:
    """The process group `bn` synchronizes over in this call: for a FusedSyncBatchNorm in
    training when torch.distributed is initialized and the group has more than one rank;
    None otherwise (the batch statistics of this process)."""
    if not isinstance(bn, FusedSyncBatchNorm) or not bn.training:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def convert_sync_bn(module: nn.Module, process_group=None) -> nn.Module:
    """Replaces every BatchNorm2d (and nn.SyncBatchNorm) inside `module`, in place, by a
    FusedSyncBatchNorm over `process_group` holding the very same parameter and buffer
    tensors (same state-dict keys); returns `module` (or its replacement if it is a BN)."""
    check_process_group(process_group)
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)) and not isinstance(
            module, FusedSyncBatchNorm):
        new = FusedSyncBatchNorm(module.num_features, module.eps, module.momentum,
                                 module.affine, module.track_running_stats,
                                 process_group=process_group)
        new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    if isinstance(module, FusedSyncBatchNorm):
        module.process_group = process_group
        return module
    for name, child in module.named_children():
        new = convert_sync_bn(child, process_group)
        if new is not child:
            setattr(module, name, new)
    return module
