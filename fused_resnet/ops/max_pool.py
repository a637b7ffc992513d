"""Functional max-pool (`max_pool2d`): the ResNet stem's pool, on the Triton kernels
(`triton.pool`) or ATen's.

ATen's max_pool2d writes an int64 index per output element even in inference and, under
autograd, saves it (a ResNet-50 step at batch 256: 411 MB written, saved and read back). On
Triton the forward writes no index in inference and the window position as one int8 under
autograd (`fused_resnet::max_pool` and its backward op `fused_resnet::max_pool_backward`:
one schema, fake kernel and autograd formula); the gradient goes where ATen's goes (ties to
the first maximum of the window, scanned row by row).
"""

from __future__ import annotations

# typing.List, not list, in custom-op signatures: torch < 2.6 evaluates their annotations in
# its own namespace, where typing.List[int] is a schema type.
from typing import List

import torch
from torch import Tensor

from fused_resnet import backend as _backend
from fused_resnet.ops.first_order import first_order
from fused_resnet.ops.layout import check_int, output_memory_format

MAX_KERNEL = 11  # the window position must fit an int8 (r * k + s < 128)


def check_window(size: tuple, kernel_size: int, stride: int, padding: int, *,
                 names: tuple[str, str, str] = ("kernel_size", "stride", "padding"),
                 what: str = "x's spatial size") -> None:
    """The pool's window for an input of spatial `size`, each argument named as the caller
    names it (`names`: the kernel size's, the stride's, the padding's; `what`: the input's)."""
    k, s, p = names
    for name, value, minimum in ((k, kernel_size, 1), (s, stride, 1), (p, padding, 0)):
        check_int(name, value, minimum)
    if not 1 <= kernel_size <= MAX_KERNEL:
        raise ValueError(f"{k} must be in [1, {MAX_KERNEL}], got {kernel_size}")
    if stride < 1:
        raise ValueError(f"{s} must be >= 1, got {stride}")
    if not 0 <= padding <= kernel_size // 2:
        raise ValueError(f"{p} must be in [0, {k} // 2 = {kernel_size // 2}], got {padding}")
    if min(size) + 2 * padding < kernel_size:
        raise ValueError(f"{what} {tuple(size)} with {p} {padding} is smaller than {k} "
                         f"({kernel_size})")


def _check(x: Tensor, kernel_size: int, stride: int, padding: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    check_window(tuple(x.shape[2:]), kernel_size, stride, padding)


def max_pool2d(x: Tensor, kernel_size: int = 3, stride: int = 2, padding: int = 1, *,
               backend: str = "auto") -> Tensor:
    """F.max_pool2d(x, kernel_size, stride, padding) (square window, dilation 1, floor mode),
    in x's memory format; on the Triton kernels where `backend` resolves to "triton", else
    ATen's (the `_C` backends have no pool of their own)."""
    _check(x, kernel_size, stride, padding)
    if _backend.resolve(backend, "max_pool", x.device) != "triton":
        return torch.nn.functional.max_pool2d(x, kernel_size, stride, padding)
    args = (x, kernel_size, stride, padding)
    if (torch.is_grad_enabled() and x.requires_grad) or _backend.ops_recorded():
        return max_pool(*args)[0]
    from fused_resnet.triton.pool import max_pool_fwd

    out, _ = max_pool_fwd(*args, write_arg=False)  # inference: no window positions
    return out.contiguous(memory_format=output_memory_format(x))


@torch.library.custom_op("fused_resnet::max_pool", mutates_args=())
def max_pool(x: Tensor, kernel_size: int, stride: int, padding: int) -> tuple[Tensor, Tensor]:
    """(out in x's memory format, the maximum's window position r * k + s, int8,
    channels_last) on the Triton kernels."""
    from fused_resnet.triton.pool import max_pool_fwd

    out, arg = max_pool_fwd(x, kernel_size, stride, padding, write_arg=True)
    return out.contiguous(memory_format=output_memory_format(x)), arg


@max_pool.register_fake
def _(x, kernel_size, stride, padding):
    from fused_resnet.triton.pool import pool_output_size  # the op runs only on Triton

    n, c, h, w = x.shape
    shape = (n, c, *(pool_output_size(v, kernel_size, stride, padding) for v in (h, w)))
    out = torch.empty(shape, device=x.device, dtype=x.dtype,
                      memory_format=output_memory_format(x))
    arg = torch.empty(shape, device=x.device, dtype=torch.int8,
                      memory_format=torch.channels_last)
    return out, arg


@torch.library.custom_op("fused_resnet::max_pool_backward", mutates_args=())
def max_pool_backward(dout: Tensor, arg: Tensor, x_shape: List[int], channels_last: bool,
                      kernel_size: int, stride: int, padding: int) -> Tensor:
    """dx (x_shape, dout's dtype (x's: the pool keeps it); channels_last or contiguous) from
    dout and the forward's arg: x's values are not needed, so x is not saved."""
    from fused_resnet.triton.pool import max_pool_bwd

    dx = max_pool_bwd(dout, arg, x_shape, kernel_size, stride, padding)
    return dx if channels_last else dx.contiguous()


@max_pool_backward.register_fake
def _(dout, arg, x_shape, channels_last, kernel_size, stride, padding):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(x_shape, device=dout.device, dtype=dout.dtype, memory_format=fmt)


def _setup(ctx, inputs, output):
    x, kernel_size, stride, padding = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])
    ctx.args = (list(x.shape), output_memory_format(x) == torch.channels_last, kernel_size,
                stride, padding)


@first_order("fused_resnet::max_pool")
def _backward(ctx, dout, _darg):
    (arg,) = ctx.saved_tensors
    return max_pool_backward(dout, arg, *ctx.args), None, None, None


max_pool.register_autograd(_backward, setup_context=_setup)
