"""The fused backends a test grid runs over on this machine: Triton and the `_C` backend of
the test device ("cpu" here, "cuda" on a GPU machine), each skipped with the reason it
cannot run."""

import pytest
import torch

from fused_resnet.backend import unavailable_reason

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NATIVE = "cuda" if DEVICE == "cuda" else "cpu"


def backend_param(name: str):
    reason = unavailable_reason(name, torch.device(DEVICE))
    marks = [pytest.mark.skipif(reason is not None, reason=reason or "")]
    return pytest.param(name, marks=marks, id=name)


FUSED_BACKENDS = [backend_param("triton"), backend_param(NATIVE)]


def skip_without_triton() -> None:
    """Skips the calling test, with the reason, where the Triton kernels cannot run here
    (Triton missing, or an interpreter that cannot run them: `backend.interpreter_problem`)."""
    reason = unavailable_reason("triton", torch.device(DEVICE))
    if reason is not None:
        pytest.skip(reason)
