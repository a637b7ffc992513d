"""The input check of the model families: an image batch, and in training a batch that
leaves every BatchNorm more than one value per channel, checked before any layer runs (so a
batch that would fail at the last stage cannot first move the running stats of the
earlier ones)."""

from __future__ import annotations

from torch import Tensor, nn

from fused_resnet.nn.sync_bn import FusedSyncBatchNorm


def halve(size: int, times: int) -> int:
    """The size after `times` stride-2 steps of a 3x3 pad-1 (or 1x1 pad-0) conv or pool:
    each maps h to floor((h - 1) / 2) + 1."""
    for _ in range(times):
        size = (size - 1) // 2 + 1
    return size


def check_image_batch(model: nn.Module, x: Tensor, stride2_steps: int) -> None:
    """x must be (N, C, H, W) floating with the stem conv's C; in training, N * h * w at the
    smallest feature map (after `stride2_steps` halvings) must exceed 1."""
    if x.dim() != 4:
        raise ValueError(f"x must be an image batch (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.shape[1] != model.conv1.in_channels:
        raise ValueError(f"x has {x.shape[1]} channels; the model takes "
                         f"{model.conv1.in_channels}")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"x must have H, W >= 1, got {tuple(x.shape)}")
    if model.training and not isinstance(model.bn1, FusedSyncBatchNorm):  # (global batch)
        h, w = halve(x.shape[2], stride2_steps), halve(x.shape[3], stride2_steps)
        if x.shape[0] * h * w <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training: input of shape "
                f"{tuple(x.shape)} leaves the last stage a {h}x{w} map per image for a batch "
                f"of {x.shape[0]}; use a larger batch or image (or eval mode)")
