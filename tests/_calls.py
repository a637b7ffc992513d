"""Counting the calls of a function a test replaces for the test's duration."""


def count_calls(monkeypatch, owner, name: str) -> list:
    """Replaces `owner.name` (monkeypatch undoes it) with a wrapper that records the shape of
    each call's first argument in the returned list, then calls the original."""
    calls = []
    real = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def saved_dtypes(module, x) -> list:
    """The dtypes of the tensors autograd saves for backward in `module(x)`."""
    import torch

    dtypes = []

    def pack(t):
        dtypes.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return dtypes
