"""torchvision's pretrained weights for the ImageNet models: `resnet50(weights=...)` as in
torchvision, the same files in the same cache (`torch.hub.get_dir()/checkpoints`).

What a call does, in order, so that a refused call downloads nothing: the weights are
resolved against the architecture's torchvision enum (`"DEFAULT"`, `"IMAGENET1K_V2"`,
`"ResNet50_Weights.IMAGENET1K_V2"` or the enum member); the model's keyword arguments are
checked against what the weights were trained as (torchvision's v1.5 bottleneck, projection
shortcuts, `num_classes` = the weights' categories, as torchvision sets it); the model is
built and its state-dict keys and shapes compared with torchvision's model of that name
(built on the meta device: no memory, no init); then the file is read (downloaded the first
time) and loaded strictly.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn


def _torchvision_models():
    try:
        import torchvision.models as models
    except ImportError as err:
        raise ImportError(
            "weights: loading pretrained weights needs torchvision (pip install torchvision); "
            "pass weights=None for a randomly initialised model"
        ) from err
    return models


def resolve_weights(arch: str, weights: Any) -> Any:
    """The member of torchvision's weights enum for `arch` that `weights` names: an enum
    member, or its name as a string, with or without the enum's class name ("DEFAULT" is
    the recommended one)."""
    models = _torchvision_models()
    try:
        enum = models.get_model_weights(arch)
    except (ValueError, KeyError) as err:
        raise ValueError(f"weights: torchvision has no weights for {arch!r}") from err
    names = ", ".join(["DEFAULT"] + [m.name for m in enum])
    if isinstance(weights, str):
        name = weights[len(enum.__name__) + 1:] if weights.startswith(enum.__name__ + ".") \
            else weights
        try:
            return enum[name]
        except KeyError:
            raise ValueError(
                f"weights must name one of {enum.__name__}'s members ({names}) for {arch}; "
                f"got {weights!r}") from None
    if isinstance(weights, enum):
        return weights
    raise ValueError(
        f"weights must be None, a member of torchvision.models.{enum.__name__} or its name "
        f"({names}) for {arch}; got {weights!r}")


def pretrained_kwargs(weights: Any, kwargs: dict, bottleneck: bool) -> dict:
    """`kwargs` (of `resnet50(...)` etc.) checked against what `weights` were trained as,
    with num_classes set from the weights' categories. Raises ValueError naming the
    argument that does not fit. `variant` matters only where the blocks are bottlenecks."""
    classes = len(weights.meta["categories"])
    if kwargs.get("num_classes", classes) != classes:
        raise ValueError(
            f"num_classes must be {classes} (the categories of {weights}) or left out; got "
            f"{kwargs['num_classes']} (to fine-tune on {kwargs['num_classes']} classes, load "
            "the weights and replace model.fc)")
    if bottleneck and kwargs.get("variant", "v1.5") != "v1.5":
        raise ValueError(
            f"variant must be 'v1.5' with weights ({weights} were trained with the stride on "
            f"the 3x3, torchvision's layout); got {kwargs['variant']!r}")
    if kwargs.get("shortcut", "B") != "B":
        raise ValueError(
            f"shortcut must be 'B' with weights ({weights} have projection shortcuts where "
            f"the shape changes); got {kwargs['shortcut']!r}")
    return {**kwargs, "num_classes": classes}


def _check_layout(model: nn.Module, arch: str, weights: Any) -> None:
    """Raises ValueError where `model`'s state-dict keys or shapes differ from torchvision's
    `arch` (whose layout the weights have), before anything is downloaded."""
    models = _torchvision_models()
    with torch.device("meta"):
        twin = getattr(models, arch)(weights=None, num_classes=model.fc.out_features)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    if ours == theirs:
        return
    missing = sorted(theirs.keys() - ours.keys())
    extra = sorted(ours.keys() - theirs.keys())
    shapes = [k for k in sorted(ours.keys() & theirs.keys()) if ours[k] != theirs[k]]
    what = (f"{shapes[0]} is {ours[shapes[0]]}, theirs {theirs[shapes[0]]}" if shapes
            else f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}")
    raise ValueError(
        f"the model's keyword arguments build a network that {weights} do not fit (torchvision's "
        f"{arch} layout): {what}; leave out groups and width_per_group with weights")


def checkpoint_path(weights: Any) -> str:
    """Where torch.hub keeps (or looks for) the file of `weights`."""
    name = os.path.basename(urlparse(weights.url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", name)


def load_pretrained(model: nn.Module, arch: str, weights: Any, progress: bool) -> nn.Module:
    """Loads `weights` into `model` (built from `pretrained_kwargs`), strictly."""
    _check_layout(model, arch, weights)
    try:
        state = weights.get_state_dict(progress=progress, check_hash=True, weights_only=True)
    except OSError as err:  # URLError and friends: no network on this machine
        raise RuntimeError(
            f"could not download {weights} from {weights.url} ({err}); on a machine without "
            f"network put that file at {checkpoint_path(weights)}") from err
    model.load_state_dict(state)
    return model


def with_classes(model: nn.Module, num_classes: int) -> nn.Module:
    """`model` with a classifier for `num_classes`: its `fc` where that already has them, else
    a fresh `nn.Linear` (PyTorch's default init) on the old one's device and dtype, the
    usual start of fine-tuning pretrained weights on another label set."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    old = getattr(model, "fc", None)
    if not isinstance(old, nn.Linear):
        raise ValueError(f"model must have its classifier as an nn.Linear `fc` (the ResNets' "
                         f"head); got {type(old).__name__}")
    if old.out_features != num_classes:
        model.fc = nn.Linear(old.in_features, num_classes, device=old.weight.device,
                             dtype=old.weight.dtype)
    return model
