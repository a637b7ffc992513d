"""Backend names, "auto" resolution, the environment variable and unavailable backends."""

import pytest
import torch

from fused_resnet import backend, ops
from fused_resnet.backend import resolve

CPU = torch.device("cpu")


def test_auto_picks_an_implemented_available_backend():
    # Triton only for CUDA tensors under "auto", even when the interpreter could run it.
    expected = "cpu" if backend.load_extension() is not None else "reference"
    for op in backend.OP_BACKENDS:
        assert resolve("auto", op, CPU) == expected
        assert resolve("auto", op, CPU, exclude=(expected,)) == "reference"
    if torch.cuda.is_available():
        assert resolve("auto", "conv_bn_act", torch.device("cuda")) == "triton"
        assert resolve("auto", "conv_bn_act", torch.device("cuda"), exclude=("triton",)) == "cuda"


def test_env_var_replaces_auto_but_not_an_explicit_name(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    assert resolve("auto", "bn_add_relu", CPU) == "reference"
    if backend.load_extension() is not None:
        assert resolve("cpu", "bn_add_relu", CPU) == "cpu"
    monkeypatch.setenv(backend.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=backend.ENV_VAR):
        resolve("auto", "bn_add_relu", CPU)
    monkeypatch.delenv(backend.ENV_VAR)
    unset = resolve("auto", "bn_add_relu", CPU)
    monkeypatch.setenv(backend.ENV_VAR, "")  # `FUSED_RESNET_BACKEND= cmd`: as if unset
    assert resolve("auto", "bn_add_relu", CPU) == unset


def test_unknown_and_unimplemented_and_unavailable_backends_say_why(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve("gpu", "conv_bn_act", CPU)
    monkeypatch.setitem(backend.OP_BACKENDS, "future_op", ("triton", "reference"))
    with pytest.raises(NotImplementedError, match="does not implement future_op"):
        resolve("cpu", "future_op", CPU)
    with pytest.raises(RuntimeError, match="runs CUDA tensors"):
        resolve("cuda", "bn_add_relu", CPU)


class _RefusesInt:  # what NumPy >= 2.4 does with int() of a 1-element array
    def __int__(self):
        raise TypeError("only 0-dimensional arrays can be converted to Python scalars")


@pytest.mark.parametrize("triton_version, numpy_refuses, broken", [
    ("3.6.0", True, "install numpy<2.4"), ("3.5.1", True, "install numpy<2.4"),
    ("3.7.0", True, None), ("3.6.0", False, None), ("3.10.1", True, None),
    ("3.4.0", False, "needs Triton>=3.5"), ("3.1.0", True, "needs Triton>=3.5"),
])
def test_interpreter_of_an_old_triton_is_named(monkeypatch, triton_version, numpy_refuses,
                                               broken):
    numpy, triton = pytest.importorskip("numpy"), pytest.importorskip("triton")
    monkeypatch.setattr(triton, "__version__", triton_version)
    one_element = _RefusesInt() if numpy_refuses else 0.0  # NumPy < 2.4 gives a scalar
    monkeypatch.setattr(numpy, "zeros", lambda *args, **kwargs: one_element)
    monkeypatch.setattr(backend, "_interpreter_checked", False)
    monkeypatch.setattr(backend, "_interpreter_problem", None)
    from fused_resnet.triton import config

    monkeypatch.setattr(config, "_INTERPRETING", True)  # TRITON_INTERPRET=1 at import
    if not broken:
        assert backend.unavailable_reason("triton", CPU) is None
        return
    with pytest.raises(RuntimeError, match=f"Triton {triton_version}.*{broken}"):
        resolve("triton", "conv_bn_act", CPU)
    monkeypatch.setattr(config, "_INTERPRETING", False)  # compiled Triton is not affected
    assert backend.unavailable_reason("triton", torch.device("cuda")) is None


def test_op_reports_the_backend_error():
    y = torch.randn(2, 4, 3, 3)
    with pytest.raises(RuntimeError, match="'cuda' backend runs CUDA tensors"):
        ops.bn_add_relu(y, torch.ones(4), torch.zeros(4), backend="cuda")


def test_package_imports_and_falls_back_without_the_extension():
    import subprocess
    import sys

    code = (
        "import sys, warnings, torch\n"
        "sys.modules['fused_resnet._C'] = None  # makes `from fused_resnet import _C` fail\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import fused_resnet\n"
        "    from fused_resnet.backend import resolve\n"
        "    print(resolve('auto', 'bn_add_relu', torch.device('cpu')))\n"
        "assert any('_C is not built' in str(w.message) for w in caught), caught\n"
        "y = fused_resnet.ops.bn_add_relu(torch.randn(2, 4, 3, 3), torch.ones(4), torch.zeros(4))\n"
        "m = fused_resnet.models.cifar_resnet(8).train()\n"
        "m(torch.randn(2, 3, 8, 8)).sum().backward()\n"
        "try:\n"
        "    resolve('cpu', 'bn_add_relu', torch.device('cpu'))\n"
        "except RuntimeError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[0] == "reference"
    assert "pip install --no-build-isolation -e ." in lines[1]
