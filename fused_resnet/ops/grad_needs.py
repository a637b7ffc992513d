"""Which input gradients a backward of this package computes: `used_by_pass(ctx, flags)`.

`ctx.needs_input_grad` says which inputs require grad, fixed when the forward ran. A backward
pass may want fewer: `torch.autograd.grad(loss, [x])` (an adversarial attack's input
gradient, a saliency map) or `loss.backward(inputs=[...])` leave the weights' gradients
unused. ATen's convolution backward asks the engine and skips them (its output mask); the
fused ops do the same here, so their weight gradients (a third of a conv's training FLOPs)
are not computed in a pass that throws them away.

The engine's answer for a node is `torch._C._will_engine_execute_node`: True for nodes the
pass runs, False for the rest; for a leaf's AccumulateGrad during `autograd.grad` it raises
(the leaf may be one whose gradient autograd.grad returns), which counts as needed here, as
does any error or a call outside a backward pass. Under torch.compile the flags are kept
as they are (its traced backward is decided when it compiles).

Index convention: the ops' backwards pass flags for their leading tensor inputs, which are
the first entries of `ctx.next_functions` (autograd lists a node's tensor inputs there in
order): x first, then the weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _will_run(node) -> bool:
    if node is None:  # the input requires no grad
        return False
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except RuntimeError:  # a leaf during autograd.grad, or outside a pass: keep it
        return True


def used_by_pass(ctx, flags: Sequence[bool]) -> list[bool]:
    """flags[i] (needs_input_grad of the i-th tensor input) and the current backward pass
    uses that input's gradient."""
    flags = [bool(f) for f in flags]
    if not any(flags) or torch.compiler.is_compiling():
        return flags
    try:
        edges = ctx.next_functions
    except (AttributeError, RuntimeError):  # not an autograd node
        return flags
    if len(edges) < len(flags) or torch._C._current_graph_task_id() == -1:
        return flags
    return [f and _will_run(edge[0]) for f, edge in zip(flags, edges)]
