"""The input check of the model families: an image batch, and in training a batch that
leaves every BatchNorm more than one value per channel (or none: an empty batch, as torch),
checked before any layer runs (so a batch that would fail at the last stage cannot first
move the running stats of the earlier ones). The feature-map sizes are worked out from the
model's own modules (its stem conv and pool, every block's convs), so a modified stem (a
CIFAR-style 3x3 stride-1 conv1, maxpool an Identity) is checked as it is."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from fused_resnet.nn.module_calls import tracing_layers
from fused_resnet.nn.pool import FusedMaxPool2d
from fused_resnet.nn.sync_bn import FusedSyncBatchNorm


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _window_out(size: tuple[int, int], kernel, stride, padding, dilation=1,
                ceil_mode=False) -> tuple[int, int]:
    """The output size of a conv or pool window: floor (or ceil) of
    (h + 2p - d(k - 1) - 1) / s, plus 1, per dimension (a ceil-mode window may not start
    in the right padding, as ATen's rule)."""
    out = []
    for h, k, s, p, d in zip(size, _pair(kernel), _pair(stride), _pair(padding),
                             _pair(dilation)):
        span = h + 2 * p - d * (k - 1) - 1
        o = (span + (s - 1 if ceil_mode else 0)) // s + 1
        if ceil_mode and (o - 1) * s >= h + p:
            o -= 1
        out.append(o)
    return tuple(out)


def _stem_pairs(model: nn.Module) -> Optional[list[tuple[nn.Conv2d, Optional[nn.Module]]]]:
    """(conv, the module after it) for each conv of the stem: conv1 and bn1, or in a deep
    stem (ResNet-D: conv1 a Sequential of conv, BN, ReLU, ..., conv) each conv and the
    module after it, the last conv with bn1; None for a conv1 of another kind."""
    conv1, bn1 = model.conv1, getattr(model, "bn1", None)
    if isinstance(conv1, nn.Conv2d):
        return [(conv1, bn1)]
    if not isinstance(conv1, nn.Sequential) or not isinstance(conv1[0], nn.Conv2d):
        return None
    mods = list(conv1) + [bn1]
    return [(m, mods[i + 1]) for i, m in enumerate(mods[:-1]) if isinstance(m, nn.Conv2d)]


def _stage_sizes(model: nn.Module, size: tuple[int, int],
                 pairs: Optional[list[tuple]] = None) -> Optional[list[tuple]]:
    """((h, w), BN or None) for each map of `model`, in order, for an (H, W) = `size`
    input: the conv outputs with the BN that normalizes each (a projection's BN normalizes
    a map of its block's output size), the pool's output with None; None where a module's
    effect on the size is unknown (a pool or block of another kind). `pairs`: the stem's
    `_stem_pairs`, where the caller has them."""
    pairs = _stem_pairs(model) if pairs is None else pairs
    if pairs is None:
        return None
    maps = []
    for conv, bn in pairs:
        maps.append((_window_out(maps[-1][0] if maps else size, conv.kernel_size, conv.stride,
                                 conv.padding, conv.dilation), bn))
    pool = getattr(model, "maxpool", None)
    if isinstance(pool, nn.MaxPool2d):
        maps.append((_window_out(maps[-1][0], pool.kernel_size, pool.stride, pool.padding,
                                 pool.dilation, pool.ceil_mode), None))
    elif isinstance(pool, FusedMaxPool2d):
        maps.append((_window_out(maps[-1][0], pool.kernel_size, pool.stride, pool.padding),
                     None))
    elif not (pool is None or isinstance(pool, nn.Identity)):
        return None
    for name in ("layer1", "layer2", "layer3", "layer4"):
        stage = getattr(model, name, None)
        if stage is None or isinstance(stage, nn.Identity):  # a stage cut off: no map
            continue
        if not isinstance(stage, nn.Sequential):
            return None
        for block in stage:
            for i in (1, 2, 3):
                conv = getattr(block, f"conv{i}", None)
                if i < 3 and not isinstance(conv, nn.Conv2d):
                    return None  # not a block of this package's (or torchvision's) kind
                if isinstance(conv, nn.Conv2d):
                    maps.append((_window_out(maps[-1][0], conv.kernel_size, conv.stride,
                                             conv.padding, conv.dilation),
                                 getattr(block, f"bn{i}", None)))
            downsample = getattr(block, "downsample", None)
            if isinstance(downsample, nn.Sequential) and len(downsample) > 1:
                maps.append((maps[-1][0], downsample[-1]))
    return maps


def bn_map_sizes(model: nn.Module, size: tuple[int, int]) -> Optional[list[tuple[int, int]]]:
    """The (h, w) of every map a BN of `model` normalizes for an (H, W) = `size` input, in
    order; None where `_stage_sizes` cannot tell or a map would be empty (the model's
    forward names that problem)."""
    maps = _stage_sizes(model, size)
    if maps is None or any(h < 1 or w < 1 for (h, w), _ in maps):
        return None
    return [hw for hw, bn in maps if bn is not None]


def _batch_statistics(bn: Optional[nn.Module]) -> bool:
    """Whether `bn` normalizes with this process's batch statistics (a BatchNorm2d in
    training or without running statistics; not a frozen or synchronized one)."""
    return (isinstance(bn, nn.BatchNorm2d) and not isinstance(bn, FusedSyncBatchNorm)
            and (bn.training or bn.running_mean is None))


def check_image_batch(model: nn.Module, x: Tensor) -> None:
    """x must be (N, C, H, W) floating with the stem conv's C; in training no feature map
    may be empty, and N * h * w must not be 1 at a map a BN normalizes with batch statistics
    (the model's layers are walked: `_stage_sizes`). Nothing to check while torch.fx traces
    (x is a proxy without a shape)."""
    if tracing_layers():
        return
    if x.dim() != 4:
        raise ValueError(f"x must be an image batch (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    pairs = _stem_pairs(model)
    in_channels = pairs[0][0].in_channels if pairs else x.shape[1]
    if x.shape[1] != in_channels:
        raise ValueError(f"x has {x.shape[1]} channels; the model takes {in_channels}")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"x must have H, W >= 1, got {tuple(x.shape)}")
    if not model.training:
        return
    maps = _stage_sizes(model, tuple(x.shape[2:]), pairs)
    if maps is None:
        return  # each layer checks its own input
    # plain loops, no min(key=...): torch.compile traces this check (fullgraph)
    for (h, w), _ in maps:
        if h < 1 or w < 1:
            raise ValueError(f"x of shape {tuple(x.shape)} is too small for this model: a "
                             f"feature map would be {h}x{w}; use a larger image")
    for (h, w), bn in maps:
        if x.shape[0] * h * w == 1 and _batch_statistics(bn):
            raise ValueError(
                f"Expected more than 1 value per channel when training: input of shape "
                f"{tuple(x.shape)} leaves a {h}x{w} map per image for a batch of "
                f"{x.shape[0]}; use a larger batch or image (or eval mode)")
