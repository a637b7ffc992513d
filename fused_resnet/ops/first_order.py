"""`first_order(name)`: the decorator of every backward of this package's autograd nodes
(the custom ops' `register_autograd` functions and the eager twins' `backward`).

Those backwards are hand-written kernels (BN backward reductions, dgrad / wgrad, the pool's
gather): the gradient they return is not itself differentiable. Run under
`create_graph=True` they would hand autograd tensors whose graph silently leaves out their
dependence on the saved activations and weights, so a gradient of a gradient (a gradient
penalty, a Hessian-vector product) came out wrong or None with no error. Decorated, the
backward runs without recording, and where a graph was asked for its outputs come back
behind torch's `DelayedError` node (what `torch.autograd.function.once_differentiable`
does): the first-order gradient is as before, and differentiating it raises an error
naming the op. The `reference` backend (plain PyTorch ops) supports higher orders.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def _requires_grad(value) -> bool:
    return isinstance(value, Tensor) and value.requires_grad


def _graph_input(value: Tensor) -> Tensor:
    """A detached alias of an output that requires grad (DelayedError needs one input that
    does to give its outputs a grad_fn)."""
    value = value.detach()
    value.requires_grad_(True)
    return value


def first_order(name: str):
    """Decorates a backward `fn(ctx, *grads, **kwargs)` of the op `name` as above; `fn` returns
    a gradient (or None, or a list of them) or a tuple of those."""

    def decorate(fn):
        @functools.wraps(fn)
        def backward(ctx, *grads, **kwargs):
            with torch.no_grad():
                outputs = fn(ctx, *grads, **kwargs)
            if not torch.is_grad_enabled():  # the usual backward: no graph of the gradient
                return outputs
            # A graph was asked for (create_graph=True): where the gradient would depend on
            # something that requires grad, differentiating it must raise, not be wrong.
            if not (any(map(_requires_grad, grads))
                    or any(map(_requires_grad, ctx.saved_tensors))):
                return outputs
            single = not isinstance(outputs, tuple)
            outputs = (outputs,) if single else outputs
            # the tensors among the outputs (a custom op's gradient may be a list of them)
            flat = [t for o in outputs for t in (o if isinstance(o, list) else [o])
                    if t is not None]
            error = torch._C._functions.DelayedError(
                f"fused_resnet: the backward of {name} is not differentiable (a gradient of a "
                "gradient, create_graph=True); use backend='reference' for higher-order "
                "gradients", len(flat))
            guarded = error(*map(_graph_input, flat))
            guarded = iter(guarded if isinstance(guarded, tuple) else (guarded,))

            def rebuild(value):
                if isinstance(value, list):
                    return [rebuild(v) for v in value]
                return None if value is None else next(guarded)

            wrapped = tuple(map(rebuild, outputs))
            return wrapped[0] if single else wrapped

        return backward

    return decorate
