"""FLOP formulas of the fused ops for `torch.utils.flop_counter.FlopCounterMode`.

FlopCounterMode counts the ATen ops it sees; a custom op is one op to it, and what runs
inside is hidden (a Triton model counted nothing but its `fc`, and the `_C` backends' eval
with autograd on likewise). Each op of this package that runs convolutions is registered
here with the count torch gives those convolutions as ATen ops
(`flop_counter.conv_flop_count`), so that a fused model counts what the same model of
torch's layers counts (Lightning's `measure_flops`, MFU in training loops):

    conv forward:     F = 2 * N * Ho * Wo * C_out * (C_in / groups) * kh * kw
    input gradient:   F, where the op computes one (need_dx; a block's inner convs always)
    weight gradient:  F * groups (torch's formula takes all C_in channels for it), where the
                      op computes one (need_dw: not for a frozen weight, as torch's count)

The extra products of the Triton block's backward (the Gram of a bottleneck without y3,
`ops.triton_block`) are the fused algorithm's, not the model's, and are not counted; nor is
BN, ReLU or max-pool work, which torch counts as 0 too.
"""

import math
from typing import Callable, Optional

import torch

from fused_resnet.ops.layout import conv_output_size

OpArgs = dict


def conv_flops(x_shape, w_shape, stride: int, padding: int,
               dilation: int = 1) -> tuple[int, tuple[int, ...]]:
    """(torch's FLOPs for conv2d(x, w), its output shape) from the shapes: 2 * N * Ho * Wo *
    prod(w_shape), w_shape holding C_in / groups."""
    out = conv_output_size(x_shape, w_shape, stride, padding, dilation)
    return 2 * out[0] * out[2] * out[3] * math.prod(w_shape), out


def backward_flops(forward: int, groups: int, need_dx: bool, need_dw: bool = True) -> int:
    """torch's count of a conv's backward from its forward count: the weight gradient's
    (times groups) and the input gradient's, each where one is computed."""
    return (forward * groups if need_dw else 0) + (forward if need_dx else 0)


def block_convs(a: OpArgs) -> list[tuple[int, int, bool]]:
    """(forward FLOPs, groups, whether it reads x) of each conv of a block op's arguments:
    the main convs in a chain from x, then a projection's from x."""
    weights = a["weights"]
    main = len(weights) - (a["shortcut"] == "projection")
    convs, shape = [], tuple(a["x"].shape)
    for i in range(main):
        groups = shape[1] // weights[i].shape[1]
        f, shape = conv_flops(shape, weights[i].shape, a["strides"][i], a["paddings"][i],
                              a["dilations"][i])
        convs.append((f, groups, i == 0))
    if a["shortcut"] == "projection":
        f = conv_flops(a["x"].shape, weights[-1].shape, a["shortcut_stride"], 0)[0]
        convs.append((f, 1, True))
    return convs


def _block_forward(a: OpArgs) -> int:
    return sum(f for f, _, _ in block_convs(a))


def _block_backward(a: OpArgs) -> int:
    convs = block_convs(a)
    need_dw = a.get("need_dw") or [True] * len(convs)  # None / left out: every one
    return sum(backward_flops(f, groups, a["need_dx"] or not reads_x, need)
               for (f, groups, reads_x), need in zip(convs, need_dw))


def _conv_forward(a: OpArgs) -> int:
    return conv_flops(a["x"].shape, a["weight"].shape, a["stride"], a["padding"],
                      a.get("dilation", 1))[0]


def _conv_backward(a: OpArgs) -> int:
    groups = a["x"].shape[1] // a["weight"].shape[1]
    return backward_flops(_conv_forward(a), groups, a["need_dx"], a.get("need_dw", True))


def _bottleneck_eval(a: OpArgs) -> int:
    """The single-launch bottleneck: 1x1, 3x3 (padding 1), 1x1, all at stride 1."""
    shape, total = tuple(a["x"].shape), 0
    for w in a["weights"]:
        f, shape = conv_flops(shape, w.shape, 1, w.shape[-1] // 2)
        total += f
    return total


FORMULAS: dict[str, Callable[[OpArgs], int]] = {
    "block_train": _block_forward,
    "block_train_backward": _block_backward,
    "conv_bn_train": _conv_forward,
    "conv_bn_train_backward": _conv_backward,
    "conv_bias_act": _conv_forward,
    "conv_bias_act_backward": _conv_backward,
    "stem_train": _conv_forward,
    "stem_train_backward": _conv_backward,
    "bottleneck_eval": _bottleneck_eval,
}


def _counter(packet, formula: Callable[[OpArgs], int]) -> Callable[..., int]:
    names = [arg.name for arg in packet.default._schema.arguments]

    def count(*args, out_val=None, **kwargs) -> int:
        return formula({**dict(zip(names, args)), **kwargs})

    return count


def register() -> list[str]:
    """Registers FORMULAS for the ops of `torch.ops.fused_resnet` that exist (the Triton
    bottleneck only with Triton); returns their names. Once: a second call adds nothing.
    Does nothing where torch has no `register_flop_formula`."""
    try:
        from torch.utils import flop_counter
    except ImportError:  # pragma: no cover - torch >= 2.5 has it
        return []
    registry: Optional[dict] = getattr(flop_counter, "flop_registry", None)
    add = getattr(flop_counter, "register_flop_formula", None)
    if registry is None or add is None:
        return []
    ops = torch.ops.fused_resnet
    done = []
    for name, formula in FORMULAS.items():
        try:
            packet = getattr(ops, name)
        except (AttributeError, RuntimeError):  # an op this install does not define
            continue
        if packet not in registry:
            add(packet, get_raw=True)(_counter(packet, formula))
        done.append(name)
    return done
