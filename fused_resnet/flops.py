"""MACs / parameters / activation-memory counter for any model built from torch ops.

`count_flops(model, input_size)` runs one forward pass on a zero input and records, per op:
- conv and fc rows: multiply-accumulates (MACs) = output elements x (C_in / groups) x kernel
  elements for a conv (1-D, 2-D or 3-D; transposed: input elements x C_out / groups x kernel
  elements), M x K x N for a matrix product (B x M x K x N batched: `bmm`, 3-D `matmul`,
  `einsum`; attention's two products in torch's fused attention ops). These are the "FLOPs"
  of the ResNet paper's Table 1 and the "GFLOPS" torchvision lists (both count
  multiply-adds); of the whole batch (per image at N = 1);
- BatchNorm, ReLU, residual add and pooling rows: their elementwise work (`elementwise`:
  output elements for BN/ReLU/add, input elements for pooling), reported apart from MACs;
- for every row, the bytes of its outputs that autograd keeps for the backward pass of a
  training step (`activation_bytes`, counted once per storage; parameters and buffers
  excluded; the input image is counted in the row named "input"). Zero when
  `training=False`.

Rows are named after the module owning the op's weight (`layer1.0.conv1`), so they are
named alike for torchvision models and for this package's functional blocks; ReLU / add rows
take the name of the BN they follow (`layer1.0.bn2.add`), pooling rows are `maxpool` /
`avgpool`; batched products `<last named>.matmul`. Under torch.autocast the weights' cast
copies count as the weights (named rows; not activations). Running statistics changed by
the training-mode pass, and every module's train / eval mode, are restored afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fused_resnet.backend import forced_backend

aten = torch.ops.aten
_RELU = {aten.relu.default, aten.relu_.default}
_ADD = {aten.add.Tensor, aten.add_.Tensor}
_MATMUL = {aten.addmm.default, aten.mm.default}
_BATCHED_MATMUL = {aten.bmm.default, aten.baddbmm.default}
# torch's fused attention kernels (q, k, v first): B x H x L x S x (E + Ev) MACs
_ATTENTION = {getattr(aten, name).default for name in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    if hasattr(aten, name)}
_POOL = {aten.max_pool2d_with_indices.default, aten.max_pool2d.default,
         aten._adaptive_avg_pool2d.default, aten.avg_pool2d.default, aten.mean.dim}


@dataclass
class LayerRow:
    name: str
    kind: str  # conv | linear | matmul | batch_norm | relu | add | pool | input
    output_shape: tuple[int, ...]
    macs: int = 0
    params: int = 0
    elementwise: int = 0
    activation_bytes: int = 0

    @property
    def stage(self) -> str:
        """'stem', 'layerN' or 'head', from the row's name."""
        head = self.name.split(".")[0]
        if head.startswith("layer"):
            return head
        return "head" if head in ("fc", "avgpool") or self.kind == "linear" else "stem"


@dataclass
class FlopsReport:
    rows: list[LayerRow] = field(default_factory=list)
    params: int = 0  # all parameters of the model, counted once

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.rows)

    @property
    def elementwise(self) -> int:
        return sum(r.elementwise for r in self.rows)

    @property
    def activation_bytes(self) -> int:
        return sum(r.activation_bytes for r in self.rows)

    def by_stage(self) -> dict[str, dict[str, int]]:
        """Totals of macs / params / elementwise / activation_bytes per stage, in order."""
        stages: dict[str, dict[str, int]] = {}
        for r in self.rows:
            s = stages.setdefault(r.stage, dict.fromkeys(
                ("macs", "params", "elementwise", "activation_bytes"), 0))
            for key in s:
                s[key] += getattr(r, key)
        return stages


def _storage_key(t: Tensor) -> int:
    """Which storage `t` views: its address, or on the meta device (every address 0) the
    storage object's own handle."""
    storage = t.untyped_storage()
    return storage._cdata if t.device.type == "meta" else storage.data_ptr()


class _Recorder(TorchDispatchMode):
    """Records one LayerRow per counted aten op; remembers which row produced each storage."""

    def __init__(self, param_owner: dict[int, tuple[str, int]], not_activations: set[int]):
        super().__init__()
        self.param_owner = param_owner
        self.not_activations = not_activations  # grows by autocast's weight copies
        self.report = FlopsReport()
        self.producer: dict[int, int] = {}
        self.last_named = ""

    def _owner(self, t: Optional[Tensor]) -> Optional[tuple[str, int]]:
        if isinstance(t, Tensor):
            return self.param_owner.get(_storage_key(t))
        return None

    def _follows(self, t) -> str:
        """The name a ReLU / add row of input `t` takes, before its suffix: the BN whose output
        `t` is (a residual add reads its main path's last BN first), that of the add whose
        output `t` is, else the last named row. So a projection block's add and ReLU are
        `bn3.add` / `bn3.relu` whether its shortcut ran before its main path (the fused blocks)
        or after it (torchvision's)."""
        index = self.producer.get(_storage_key(t)) if isinstance(t, Tensor) else None
        row = None if index is None else self.report.rows[index]
        if row is not None and row.kind == "batch_norm":
            return row.name
        if row is not None and row.kind == "add":
            return row.name.removesuffix(".add")
        return self.last_named

    def _row(self, func, args, out: Tensor) -> Optional[LayerRow]:
        shape = tuple(out.shape)
        if func is aten.convolution.default:
            name, params = self._owner(args[1]) or ("conv", 0)
            # weight (C_out, C_in / g, *k), or transposed (C_in, C_out / g, *k): each output
            # (input, transposed) element takes one MAC per weight of its group's slice
            per_element = args[1][0].numel()
            macs = (args[0].numel() if args[6] else out.numel()) * per_element
            return LayerRow(name, "conv", shape, macs=macs, params=params)
        if func in _MATMUL:
            a, b = (args[1], args[2]) if func is aten.addmm.default else (args[0], args[1])
            name, params = self._owner(b) or ("linear", 0)
            return LayerRow(name, "linear", shape, macs=a.shape[0] * a.shape[1] * b.shape[1],
                            params=params)
        if func in _BATCHED_MATMUL:  # (B, M, K) @ (B, K, N)
            a = args[1] if func is aten.baddbmm.default else args[0]
            return LayerRow(self.last_named + ".matmul", "matmul", shape,
                            macs=a.numel() * shape[-1])
        if func in _ATTENTION:  # softmax(q k^T) v: (B, H, L, E) x (B, H, S, E), (B, H, S, Ev)
            q, k, v = args[:3]
            return LayerRow(self.last_named + ".attention", "matmul", shape,
                            macs=q.numel() // q.shape[-1] * k.shape[-2] * (
                                q.shape[-1] + v.shape[-1]))
        op_name = func.__name__ if hasattr(func, "__name__") else str(func)
        if "batch_norm" in op_name and "backward" not in op_name:
            name, params = self._owner(args[1]) or (self.last_named + ".bn", 0)
            return LayerRow(name, "batch_norm", shape, params=params, elementwise=out.numel())
        if func in _RELU:
            return LayerRow(self._follows(args[0]) + ".relu", "relu", shape,
                            elementwise=out.numel())
        if func in _ADD and all(isinstance(a, Tensor) and a.dim() == 4 for a in args[:2]):
            return LayerRow(self._follows(args[0]) + ".add", "add", shape,
                            elementwise=out.numel())
        if func in _POOL and isinstance(args[0], Tensor) and args[0].dim() == 4:
            name = "maxpool" if "max" in str(func) else "avgpool"  # torchvision's module names
            return LayerRow(name, "pool", shape, elementwise=args[0].numel())
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        if not outputs:
            return out
        if func is aten._to_copy.default and self._owner(args[0]) is not None:
            key = _storage_key(outputs[0])  # autocast's cast of a weight: still the weight
            self.param_owner[key] = self._owner(args[0])
            self.not_activations.add(key)
            return out
        row = self._row(func, args, outputs[0])
        if row is not None:
            self.report.rows.append(row)
            if row.kind in ("conv", "linear", "batch_norm"):
                self.last_named = row.name
        if self.report.rows:
            index = len(self.report.rows) - 1
            for t in outputs:
                self.producer[_storage_key(t)] = index
        return out


def count_flops(
    model: nn.Module, input_size: tuple[int, ...] = (1, 3, 224, 224), *, training: bool = True
) -> FlopsReport:
    """Per-layer MACs, parameters, elementwise work and saved-activation bytes of one forward.

    input_size: (N, C, H, W) of the zero input, made with the model's dtype and device.
    training: run in train mode with autograd on, so that activation bytes are those a
    training step keeps for backward (BN then uses batch stats; N*H*W at the last BN must
    exceed 1). The model's mode and running stats are left as they were. Fused models run on
    the reference ops here (`backend.forced_backend`): the report describes the architecture,
    the same for every backend (fused kernels hide their convolutions inside custom ops).
    """
    if len(input_size) != 4 or any(int(s) < 1 for s in input_size):
        raise ValueError(f"input_size must be (N, C, H, W) of positive ints, got {input_size}")
    first = next(model.parameters(), None)
    dtype = first.dtype if first is not None else torch.float32
    device = first.device if first is not None else torch.device("cpu")
    owner: dict[int, tuple[str, int]] = {}
    for mod_name, module in model.named_modules():
        direct = list(module.parameters(recurse=False))
        for p in direct:
            owner[_storage_key(p)] = (mod_name, sum(q.numel() for q in direct))
    # Parameters and buffers (running stats) are saved for backward too, but are not activations.
    not_activations = set(owner) | {_storage_key(b) for b in model.buffers()}
    buffers = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, Tensor)}
    was_training = model.training
    modes = [(m, m.training) for m in model.modules()]  # each module's own: a frozen part too
    recorder = _Recorder(owner, not_activations)
    input_row = LayerRow("input", "input", tuple(input_size))
    saved: set[int] = set()

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key not in not_activations and key not in saved:
            saved.add(key)
            index = recorder.producer.get(key)
            row = input_row if index is None else recorder.report.rows[index]
            row.activation_bytes += t.untyped_storage().nbytes()
        return t

    x = torch.zeros(input_size, dtype=dtype, device=device)
    try:
        model.train(training)
        with torch.set_grad_enabled(training), torch.autograd.graph.saved_tensors_hooks(
            pack, lambda t: t
        ), forced_backend("reference"), recorder:
            model(x)
    finally:
        model.train(was_training)  # (what a module does on train / eval: FoldingModule's)
        for module, mode in modes:
            module.training = mode
        with torch.no_grad():
            state = model.state_dict()
            for key, value in buffers.items():
                state[key].copy_(value)
    report = recorder.report
    report.rows.insert(0, input_row)
    report.params = sum(p.numel() for p in model.parameters())
    return report


# Published figures, in 10^9 multiply-adds at 224x224: the ResNet paper's Table 1 ("v1",
# stride on the bottleneck's first 1x1) and torchvision's model docs ("v1.5", on the 3x3).
PAPER_GMACS = {"resnet18": 1.8, "resnet34": 3.6, "resnet50": 3.8, "resnet101": 7.6,
               "resnet152": 11.3}
TORCHVISION_GMACS = {"resnet18": 1.81, "resnet34": 3.66, "resnet50": 4.09, "resnet101": 7.80,
                     "resnet152": 11.51, "wide_resnet50_2": 11.40, "resnext50_32x4d": 4.23,
                     "wide_resnet101_2": 22.75, "resnext101_32x8d": 16.41,
                     "resnext101_64x4d": 15.46}
# The ResNet paper's Table 6: parameters of the CIFAR-10 nets, in millions.
PAPER_CIFAR_PARAMS_M = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7, 1202: 19.4}
