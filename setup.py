"""Build of fused_resnet._C from csrc/ through torch's extension tools (ninja when present).

The CPU part is always built. The CUDA part is added when nvcc and a CUDA build of torch
are found and their CUDA major versions agree (torch's extension tools refuse a build across
majors, e.g. nvcc 13 with torch 2.5's CUDA 12.4); FUSED_RESNET_FORCE_CUDA=1 forces it,
FUSED_RESNET_SKIP_CUDA=1 skips it, and TORCH_CUDA_ARCH_LIST picks the targets (default
"8.0;9.0": A100 and H100).
Install with `pip install --no-build-isolation -e .` so the build sees the installed torch.
"""

import glob
import os
import platform
import re
import shutil
import subprocess

from setuptools import setup


def _find_cuda_home():
    """The CUDA toolkit root: $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, or nvcc's grandparent.

    nvcc may be a wrapper script on PATH (e.g. /usr/local/bin/nvcc), whose grandparent has no
    CUDA headers, so the conventional /usr/local/cuda is preferred to guessing from PATH.
    """
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


CUDA_HOME = None if _flag("FUSED_RESNET_SKIP_CUDA") else _find_cuda_home()
if CUDA_HOME:
    # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
    os.environ["CUDA_HOME"] = CUDA_HOME
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _nvcc_major(cuda_home):
    """The CUDA major version `nvcc --version` reports ("release 13.0, ..."), or None."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.", out)
    return int(match.group(1)) if match else None


def _cuda_wanted():
    """Whether the CUDA part is built: forced, skipped, or nvcc and a CUDA torch of one major."""
    if _flag("FUSED_RESNET_SKIP_CUDA"):
        return False
    if _flag("FUSED_RESNET_FORCE_CUDA"):
        return True
    if CUDA_HOME is None or torch.version.cuda is None:
        return False
    nvcc, built = _nvcc_major(CUDA_HOME), int(torch.version.cuda.split(".")[0])
    if nvcc is not None and nvcc != built:
        print(f"fused_resnet: nvcc in {CUDA_HOME} is CUDA {nvcc}, torch was built with CUDA "
              f"{torch.version.cuda}: building _C without its CUDA part (point CUDA_HOME at a "
              f"CUDA {built} toolkit, or FUSED_RESNET_FORCE_CUDA=1 to try anyway)", flush=True)
        return False
    return True


WITH_CUDA = _cuda_wanted()


def _cpu_vector_flags():
    """AVX2 + FMA + F16C for at::vec::Vectorized when this x86-64 machine has them (the CPU kernels
    then use 256-bit intrinsics instead of the generic element loops), else nothing.
    FUSED_RESNET_NO_AVX2=1 builds the portable generic version."""
    if platform.machine().lower() not in ("x86_64", "amd64") or _flag("FUSED_RESNET_NO_AVX2"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return []
    if not {"avx2", "fma", "f16c"} <= flags:
        return []
    return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]


def _openmp_flags():
    """at::parallel_for is inlined from ATen's headers: without OpenMP the CPU kernels would run
    on one thread. Linux only (torch's wheels there use GNU OpenMP, whose libgomp.so.1 the
    extension then shares)."""
    return ["-fopenmp"] if platform.system() == "Linux" else []


def _extension():
    sources = ["csrc/fused_resnet.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cxx_flags = ["-O3", *_cpu_vector_flags(), *_openmp_flags()]
    link_flags = _openmp_flags()
    if not WITH_CUDA:
        return CppExtension("fused_resnet._C", sources, extra_compile_args={"cxx": cxx_flags},
                            extra_link_args=link_flags)
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    return CUDAExtension(
        "fused_resnet._C",
        sources,
        define_macros=[("FUSED_RESNET_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
        extra_link_args=link_flags,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={
        "build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    },
)
