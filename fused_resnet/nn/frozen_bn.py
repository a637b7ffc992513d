"""torchvision's FrozenBatchNorm2d (the BN of its detection backbones: Faster / Mask R-CNN,
RetinaNet, FCOS, keypoint R-CNN) as the fused blocks read a BN.

A FrozenBatchNorm2d is y = x * scale + shift with scale = weight / sqrt(running_var + eps),
shift = bias - running_mean * scale, all four tensors buffers that training never changes,
whatever the module's training flag says. The fused blocks read a BN's attributes
(`training`, `affine`, `momentum`, `track_running_stats`, `num_batches_tracked`, ...) to
mirror nn.BatchNorm2d; `FusedFrozenBatchNorm2d` answers them as an eval-mode affine
BatchNorm2d would: running statistics normalize, nothing is updated or counted, in training
too. `fr.convert` swaps the class of a block's FrozenBatchNorm2d modules for it (the same
object and buffers, state-dict keys and loading rules: FrozenBatchNorm2d's), so a frozen
block runs as one folded conv + bias (+ residual) + ReLU per conv, with gradients for the
convs' weights and the input. This module imports torchvision.
"""

from __future__ import annotations

from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = ["BN_TYPES", "FrozenBatchNorm2d", "FusedFrozenBatchNorm2d", "adopt"]


class FusedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """A FrozenBatchNorm2d whose `training` stays False (its forward never used it) and
    that answers nn.BatchNorm2d's attributes as an eval-mode affine BN: what the fused
    blocks read. Made by a class swap in `fr.convert`, not constructed."""

    affine = True
    track_running_stats = True
    momentum = 0.0
    num_batches_tracked = None  # a class attribute: no buffer, no state-dict key

    @property
    def num_features(self) -> int:
        return self.weight.shape[0]

    def train(self, mode: bool = True):
        super().train(mode)
        self.training = False  # frozen: running statistics normalize in training too
        return self


# The BN classes the fused code reads (where torchvision is loaded): torch's two, and
# torchvision's FrozenBatchNorm2d with the subclass `adopt` makes of it.
BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d, FusedFrozenBatchNorm2d)


def adopt(module: nn.Module) -> None:
    """Swaps the class of `module`, where it is a FrozenBatchNorm2d, for
    FusedFrozenBatchNorm2d (in place; anything else, already adopted ones too, untouched)."""
    if type(module) is FrozenBatchNorm2d:
        module.__class__ = FusedFrozenBatchNorm2d
        module.training = False
