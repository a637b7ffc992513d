"""Functional `conv → BatchNorm → (+ residual) → ReLU`: argument checks and backend dispatch."""

from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from fused_resnet import backend as _backend
from fused_resnet import reference
from fused_resnet.ops import conv_ops
from fused_resnet.ops.layout import bn_params, check_flags, check_int, conv_output_shape


def bn_dtypes(dtype: torch.dtype) -> set[torch.dtype]:
    """The dtypes a BN tensor may have beside activations of `dtype`: that dtype, and fp32
    beside fp16 / bf16 (fp32 parameters and statistics, as eager BatchNorm allows)."""
    return {dtype, torch.float32} if dtype in (torch.float16, torch.bfloat16) else {dtype}


def check_vector(name: str, t: Optional[Tensor], channels: int, x: Tensor,
                 x_name: str = "x") -> None:
    """A per-channel BN tensor: shape (channels,), x's device, and x's dtype or fp32 (fp32
    parameters and statistics beside fp16 / bf16 activations, as eager BatchNorm allows);
    `x_name`: what the messages call x."""
    if t is None:
        return
    if t.dim() != 1 or t.shape[0] != channels:
        raise ValueError(f"{name} must have shape ({channels},), got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but {x_name} is on {x.device}")
    allowed = bn_dtypes(x.dtype)
    if t.dtype not in allowed:
        raise ValueError(f"{name} must be {' or '.join(sorted(map(str, allowed)))} for "
                         f"{x_name} of {x.dtype}, got {t.dtype}")


def check_momentum(momentum, name: str = "momentum") -> None:
    """A BN's running-statistics factor: a number in [0, 1] (running = (1 - m) * running +
    m * batch). nn.BatchNorm2d's momentum=None (a cumulative average) is its module's
    bookkeeping: the factor of its n-th training call is 1 / n."""
    if momentum is None:
        raise ValueError(f"{name} must be a number in [0, 1], got None (nn.BatchNorm2d's "
                         "momentum=None, a cumulative average, is the factor 1 / n at its n-th "
                         "training call: pass that)")
    if not (is_real_scalar(momentum) and 0 <= float(momentum) <= 1):
        raise ValueError(f"{name} must be a number in [0, 1], got {momentum!r}")


def is_real_scalar(value) -> bool:
    """Whether `value` is a real number as torch's BN takes one: a Python or NumPy int /
    float, or a one-element tensor (not a bool)."""
    if isinstance(value, Tensor):
        return value.numel() == 1 and value.dtype != torch.bool and not value.is_complex()
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_running_stats(running_mean: Optional[Tensor], running_var: Optional[Tensor],
                        training: bool) -> None:
    """Running stats as a pair (both tensors or both None) and, in training, tensors the
    in-place update can write: not requiring grad, not expanded, not inference tensors
    outside inference mode."""
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if not training or t is None:
            continue
        if t.requires_grad:
            raise ValueError(f"{name} requires grad: training updates it in place, which "
                             "autograd forbids for such a tensor (pass a buffer, or detach it)")
        if t.shape[0] > 1 and t.stride(0) == 0:
            raise ValueError(f"{name} is expanded (stride 0): training updates it in place, "
                             "which needs one element per channel in memory")
        if (not torch.compiler.is_compiling() and t.is_inference()  # (dynamo has no is_inference)
                and not torch.is_inference_mode_enabled()):
            raise ValueError(f"{name} was made in inference mode: outside it, torch forbids "
                             "the in-place update training makes (clone it)")


def check_conv_bn_act_args(
    x: Tensor, weight: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor], running_var: Optional[Tensor], *,
    stride: int, padding: int, groups: int, training: bool, residual: Optional[Tensor],
    running_ok: bool = False, eps: float = 1e-5, dilation: int = 1,
) -> None:
    """Raises ValueError naming the first argument that does not fit the others.
    running_ok: inference without running stats is fine (BN already folded)."""
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(
            f"weight must be 4-D (C_out, C_in/groups, kh, kw), got {tuple(weight.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from x's dtype {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    for name, value, minimum in (("stride", stride, 1), ("padding", padding, 0),
                                 ("groups", groups, 1), ("dilation", dilation, 1)):
        check_int(name, value, minimum)
    c_out, c_in_per_group, kh, kw = weight.shape
    if x.shape[1] != c_in_per_group * groups:
        raise ValueError(
            f"x has {x.shape[1]} channels but weight expects {c_in_per_group * groups} "
            f"(weight.shape[1]={c_in_per_group} x groups={groups})"
        )
    if c_out % groups != 0:
        raise ValueError(f"weight.shape[0] ({c_out}) must be divisible by groups ({groups})")
    h_out, w_out = conv_output_shape(x, weight, stride, padding, dilation)[2:]
    if h_out < 1 or w_out < 1:
        dilated = f" dilated by {dilation}" if dilation > 1 else ""
        raise ValueError(
            f"x's spatial size {tuple(x.shape[2:])} is smaller than the kernel {(kh, kw)}"
            f"{dilated} with padding {padding}"
        )
    bias_name = "bias" if running_ok else "bn_bias"
    for name, t in (("bn_weight", bn_weight), (bias_name, bn_bias),
                    ("running_mean", running_mean), ("running_var", running_var)):
        check_vector(name, t, c_out, x)
    check_running_stats(running_mean, running_var, training)
    if not training and running_mean is None and not running_ok:
        raise ValueError("training=False needs running_mean and running_var")
    if not is_real_scalar(eps) or eps < 0 or (training and eps == 0):
        raise ValueError(f"eps must be positive in training (>= 0 in eval), a number; got "
                         f"{eps!r}")
    if training and x.shape[0] * h_out * w_out == 1:  # (an empty batch: an empty output)
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input of shape "
            f"{tuple(x.shape)} (conv output {(x.shape[0], c_out, h_out, w_out)})"
        )
    if residual is not None:
        expected = (x.shape[0], c_out, h_out, w_out)
        if tuple(residual.shape) != expected:
            raise ValueError(f"residual must have shape {expected}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(
                f"residual must match x's dtype and device ({x.dtype}, {x.device}), "
                f"got ({residual.dtype}, {residual.device})"
            )


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast casts to on `device_type`, or None where it is off (or has no
    meaning: torch's autocast does not know the meta device, and refuses to be asked)."""
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocasting(x: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast casts x to (x floating, autocast on for its device), else None."""
    return autocast_dtype(x.device.type) if x.is_floating_point() else None


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the convs compute x in: autocast's dtype for a floating x under autocast
    (what `autocast_inputs` casts to), else x's own."""
    dtype = autocasting(x)
    return x.dtype if dtype is None else dtype


def autocast_inputs(
    x: Tensor, weight: Optional[Tensor], residual: Optional[Tensor]
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Under autocast, the conv operands (and the residual added to its result) in the
    autocast dtype; otherwise the tensors unchanged. None stays None (a block casts its
    weights itself, or lets its kernels cast them)."""
    dtype = autocasting(x)
    if dtype is None:
        return x, weight, residual

    def cast(t: Optional[Tensor]) -> Optional[Tensor]:  # no .to() call (~2 us) where it is one
        return t if t is None or t.dtype == dtype else t.to(dtype)

    return cast(x), cast(weight), cast(residual)


def conv_bn_act(
    x: Tensor,
    weight: Tensor,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    *,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: Optional[Tensor] = None,
    relu: bool = True,
    backend: str = "auto",
    dilation: int = 1,
) -> Tensor:
    """out = act(BN(conv(x, weight)) + residual); see `fused_resnet.reference.conv_bn_act`.

    x: (N, C_in, H, W) in NCHW or channels_last; the output keeps x's memory format.
    `dilation` spaces the kernel's taps, as torch's conv2d does. In training the running
    stats (if given) are updated in place with factor `momentum`;
    a call that raises leaves them unchanged. Under `torch.autocast` the conv runs in the
    autocast dtype (x, weight and residual are cast to it) while BN parameters and
    statistics stay fp32, as in eager PyTorch.
    """
    check_flags(training=training, relu=relu)
    x, weight, residual = autocast_inputs(x, weight, residual)
    check_conv_bn_act_args(
        x, weight, bn_weight, bn_bias, running_mean, running_var,
        stride=stride, padding=padding, groups=groups, training=training, residual=residual,
        eps=eps, dilation=dilation,
    )
    if training:
        check_momentum(momentum)
    kernels = select_kernels(backend, "conv_bn_act", x, groups=groups)
    return checked_conv_bn_act(
        x, weight, bn_weight, bn_bias, running_mean, running_var, stride=stride, padding=padding,
        groups=groups, training=training, momentum=momentum, eps=eps, residual=residual,
        relu=relu, kernels=kernels, dilation=dilation)


def update_running_stats(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, n: int,
    momentum: float,
) -> None:
    """`update_block_running_stats` for one BN."""
    update_block_running_stats([running_mean], [running_var], [mean], [var], [n], [momentum])


def _unbiased(variances: list[Tensor], counts: list[int]) -> list[Tensor]:
    """var * n / (n - 1) for each (var, n): one multi-tensor op. While dynamo traces (compile,
    export) with a symbolic batch size, n / (n - 1) would be a symbolic float, a graph input
    torch.export cannot save: the products and quotients by the integers are traced instead."""
    if torch.compiler.is_compiling():
        return [v * n / (n - 1) for v, n in zip(variances, counts)]
    return list(torch._foreach_mul(variances, [n / (n - 1) for n in counts]))


def update_block_running_stats(
    running_means: list[Optional[Tensor]], running_vars: list[Optional[Tensor]],
    means: list[Tensor], variances: list[Tensor], counts: list[int], momenta: list[float],
) -> None:
    """running = (1 - m) * running + m * batch for each BN of a block that has running stats
    (a None entry has none), as torch's BN writes it (not as a lerp, running + m * (batch -
    running), which makes an inf running value NaN), the batch variance made unbiased
    (x n / (n - 1)) as nn.BatchNorm2d does. Three multi-tensor ops where the BNs share one
    momentum and their running stats have the statistics' dtype; otherwise per tensor, the
    sum of fp16 / bf16 running stats taken in the statistics' fp32 and rounded once (they
    hold momentum * a batch variance above fp16's 65504, as torch's do). The statistics are
    detached rather than the update run under no_grad: a grad-mode switch inside a forward
    is a node torch.export cannot save."""
    picked = [i for i, r in enumerate(running_means) if r is not None]
    if not picked:
        return
    unbiased = _unbiased([variances[i].detach() for i in picked], [counts[i] for i in picked])
    running = [running_means[i] for i in picked] + [running_vars[i] for i in picked]
    batch = [means[i].detach() for i in picked] + unbiased
    factors = [float(momenta[i]) for i in picked] * 2
    if len(set(factors)) == 1 and all(r.dtype == b.dtype for r, b in zip(running, batch)):
        torch._foreach_mul_(running, 1 - factors[0])
        torch._foreach_add_(running, batch, alpha=factors[0])
        return
    for r, b, m in zip(running, batch, factors):
        if r.dtype == b.dtype:
            r.mul_(1 - m).add_(b, alpha=m)
        else:
            acc = torch.promote_types(r.dtype, b.dtype)
            r.copy_(torch.add(b.to(acc) * m, r.to(acc), alpha=1 - m))


def select_kernels(backend: str, op: str, x: Tensor, *, groups: int = 1,
                   reason: Optional[str] = None) -> str:
    """Which kernels run `op` for this call: "triton", "native" (the `_C` kernels of the
    "cpu" / "cuda" backends) or "reference". Triton is ruled out by a grouped conv, fp64 on
    CUDA or the caller's `reason`; then "auto" takes the next backend that can run the call
    and a backend named "triton" raises. An empty batch runs on the reference (torch's ops
    give an empty output and leave the running statistics as they are)."""
    name = _backend.resolve(backend, op, x.device)
    if x.dim() == 4 and x.shape[0] == 0:  # (a 1-D x is a dtype / device probe)
        return "reference"
    if name == "triton":
        if groups != 1:
            reason = f"grouped convolution (groups={groups}) is not implemented in Triton"
        elif x.dtype == torch.float64 and x.device.type == "cuda":
            reason = "float64 runs only in the interpreter; use float32, float16 or bfloat16"
        if reason is None:
            return "triton"
        if backend != "auto":
            raise NotImplementedError(f"backend 'triton' cannot run this {op}: {reason}")
        name = _backend.resolve(backend, op, x.device, exclude=("triton",))
    return "reference" if name == "reference" else "native"


def checked_conv_bn_act(
    x: Tensor, weight: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor], running_var: Optional[Tensor], *, stride: int, padding: int,
    groups: int, training: bool, momentum: float, eps: float, residual: Optional[Tensor],
    relu: bool, kernels: str, dilation: int = 1,
) -> Tensor:
    """`conv_bn_act` after its casts and checks, on `kernels` (`select_kernels`'s answer;
    "reference": `reference.conv_bn_act`). Training: one fused op returning batch mean /
    biased var, then the running stats are updated here, running = (1 - momentum) * running
    + momentum * batch (var unbiased by n / (n - 1)). Inference: BN folded into the conv,
    w' = w * scale, bias = shift."""
    if kernels == "reference":
        return reference.conv_bn_act(
            x, weight, bn_weight, bn_bias, running_mean, running_var, stride=stride,
            padding=padding, groups=groups, training=training, momentum=momentum, eps=eps,
            residual=residual, relu=relu, dilation=dilation)
    c_out = weight.shape[0]
    gamma, beta = bn_params(bn_weight, bn_bias, c_out, x)
    if training:
        out, y, mean, var = conv_ops.conv_bn_train_call(
            x, weight, gamma, beta, residual, stride, padding, dilation, groups, eps, relu,
            kernels)
        if running_mean is not None:
            update_running_stats(running_mean, running_var, mean, var, y.numel() // c_out,
                                 momentum)
        return out
    scale, shift = reference.fold_bn(running_mean, running_var, bn_weight, bn_bias, eps)
    folded = (weight.to(scale.dtype) * scale.view(-1, 1, 1, 1)).to(x.dtype)
    return conv_ops.conv_bias_act_call(x, folded, shift, residual, stride, padding, dilation,
                                       groups, relu, kernels)


def conv_bias_act(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], *, stride: int = 1, padding: int = 0,
    residual: Optional[Tensor] = None, relu: bool = True, backend: str = "auto",
    dilation: int = 1,
) -> Tensor:
    """out = act(conv(x, weight) + bias + residual): inference with BN already folded into
    (weight, bias), e.g. by `reference.fold_bn`. bias: (C_out,) fp32 (fp64 for fp64 x), or
    None for none (as torch's conv2d)."""
    check_flags(relu=relu)
    x, weight, residual = autocast_inputs(x, weight, residual)
    if bias is None and weight.dim() == 4:
        bias = x.new_zeros(weight.shape[0], dtype=torch.float64 if x.dtype == torch.float64
                           else torch.float32)
    check_conv_bn_act_args(x, weight, None, bias, None, None, stride=stride, padding=padding,
                           groups=1, training=False, residual=residual, running_ok=True,
                           dilation=dilation)
    kernels = select_kernels(backend, "conv_bn_act", x)
    if kernels != "reference":
        return conv_ops.conv_bias_act_call(x, weight, bias, residual, stride, padding,
                                           dilation, 1, relu, kernels)
    out = reference.conv2d(x, weight, bias.to(x.dtype), stride, padding, 1, dilation)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out
