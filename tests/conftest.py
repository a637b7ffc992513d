import os

import torch

# Triton kernels run on CPU tensors through the interpreter when there is no GPU. This must be
# set before fused_resnet (and so triton.jit) is imported, which conftest.py precedes.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
