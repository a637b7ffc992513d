"""The package in degraded environments: Triton missing, `_C` not built, CUDA absent (each
simulated in a fresh interpreter by blocking the import). It imports, `backend="auto"` runs
what works, and asking for what is missing names it and says how to install it."""

import subprocess
import sys
import textwrap

import pytest

# Run in a child interpreter: the blocked modules must never have been imported.
PRELUDE = """
import sys, warnings
for name in {blocked!r}:
    sys.modules[name] = None  # "import name" now raises ImportError
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import torch
    import fused_resnet as fr
    model = fr.models.cifar_resnet(20)
    out = model(torch.randn(2, 3, 8, 8))
    out.sum().backward()
print("AUTO-RAN", tuple(out.shape))
print("WARNINGS", [str(w.message) for w in caught if "fused_resnet" in str(w.message)])
from fused_resnet.backend import resolve
print("AUTO-IS", resolve("auto", "residual_block", torch.device("cpu")))
for backend in {asked!r}:
    try:
        fr.models.cifar_resnet(20, backend=backend)(torch.randn(2, 3, 8, 8))
        print("RAN", backend)
    except (RuntimeError, NotImplementedError) as exc:
        print("ERROR", backend, exc)
"""


def _run(blocked, asked):
    code = textwrap.dedent(PRELUDE.format(blocked=blocked, asked=asked))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=600, env={"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_without_triton():
    out = _run(["triton"], ["triton"])
    assert "AUTO-RAN (2, 10)" in out
    assert "ERROR triton" in out and "Triton is not installed (pip install triton)" in out


def test_without_the_extension():
    out = _run(["fused_resnet._C"], ["cpu", "cuda"])
    assert "AUTO-RAN (2, 10)" in out and "AUTO-IS reference" in out
    assert "pip install --no-build-isolation -e ." in out  # the import warning says how
    assert out.count("fused_resnet._C is not built (pip install --no-build-isolation -e .)") == 2


def test_without_triton_or_the_extension():
    out = _run(["triton", "fused_resnet._C"], ["triton", "cpu"])
    assert "AUTO-RAN (2, 10)" in out and "AUTO-IS reference" in out
    assert "ERROR triton" in out and "ERROR cpu" in out


@pytest.mark.skipif(sys.platform != "linux", reason="checks the CPU-only build of torch here")
def test_cuda_backend_on_a_machine_without_cuda_names_the_device():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    out = _run([], ["cuda"])
    assert "ERROR cuda" in out and "runs CUDA tensors" in out
