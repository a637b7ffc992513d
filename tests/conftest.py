import atexit
import os
import shutil
import tempfile

import torch

# Triton kernels run on CPU tensors through the interpreter when there is no GPU. This must be
# set before fused_resnet (and so triton.jit) is imported, which conftest.py precedes.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# torch.compile's on-disk cache outlives a test run, and its AOTAutograd entries are keyed on
# the forward graph, not on the custom ops' autograd formulas: an entry saved by an older
# checkout replays that checkout's backward (an op that took other arguments: "missing value
# for argument 'need_dw'"). Each run compiles into a fresh folder (pytest-xdist's workers
# inherit it), unless one is given.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fused_resnet_inductor_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--fuzz-long", action="store_true",
                     help="many more hypothesis examples per fuzz test (for the GPU machine)")


def pytest_configure(config):
    if config.getoption("--fuzz-long", default=False):
        os.environ["FUSED_RESNET_FUZZ_LONG"] = "1"


def pytest_terminal_summary(terminalreporter):
    from tests._report import LINES

    for section, lines in LINES.items():
        terminalreporter.write_sep("-", section)
        for line in lines:
            terminalreporter.write_line(line)


def pytest_runtest_logreport(report):
    """With FUSED_RESNET_FAILURES_NOW=1 (benchmarks/gpu_session.sh), a failure's report is
    printed the moment it arrives, not in the summary a time limit can cut off (under
    pytest-xdist: by the controller, which receives every worker's reports)."""
    if (report.failed and os.environ.get("FUSED_RESNET_FAILURES_NOW") == "1"
            and "PYTEST_XDIST_WORKER" not in os.environ):
        print(f"\n=== FAILED NOW {report.nodeid} ({report.when})\n"
              f"{report.longreprtext[-3000:]}\n", flush=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fp32_without_tf32():
    """DESIGN.md's fp32 tolerances are for fp32 with TF32 off, and on CUDA PyTorch's default
    lets cuDNN convolutions (and so the Triton kernels, which follow its flag) use TF32: every
    test starts with it off, and a test that wants TF32 turns it on itself."""
    from fused_resnet.testing import exact_fp32

    with exact_fp32():
        yield
