"""Compile the Triton kernels for a GPU architecture on a machine without a GPU.

Inside `with compile_only(arch=90, workers=8) as builds:` no Triton launch runs: each is
recorded as the specializations it would compile (Triton specializes on the constexprs, the
dtypes of the pointers, 16-byte alignment, and integers equal to 1 or divisible by 16):

- a plain launch, its one specialization;
- an autotuned launch, one per config of its autotuner (a candidate over the shared memory
  is no failure: the autotuner skips it) and one for `config.PINNED` (what deterministic mode
  and FUSED_RESNET_TRITON_PIN=1 launch, which must fit).

On leaving the block, `workers` processes compile them for a CUDA device of compute capability
`arch` (a stand-in driver answers Triton's questions), into Triton's cache
(TRITON_CACHE_DIR, default ~/.triton/cache), and `builds` fills with one `KernelBuild` per
compiled kernel, with the resources ptxas assigned. On a GPU machine this warms the cache in
parallel before a benchmark whose launches would otherwise compile one after another.

The host code around the launches runs as usual on CPU tensors, so kernel outputs are left
uninitialized: drive only code whose control flow does not depend on them (a model's forward
and backward do not).

What this catches before a GPU is lent: errors that only compiled Triton raises (the
interpreter is lenient about dtypes of tl.dot, layouts and constexpr use), shared memory over
the architecture's per-block limit (the launch would raise OutOfResources), and register spills
(a stack frame ptxas had to add). It cannot check results: the interpreter tests do that.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, MockTensor

from fused_resnet.triton import config

# Largest dynamic shared memory one block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin),
# by compute capability: A100 163 KiB, consumer Ampere / Ada 99 KiB, H100 / B200 227 KiB.
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448,
                120: 101376}
MIN_TRITON = (3, 6)  # the JIT internals used here (binder caches, specialization) as of 3.6
# Constexprs that say which tile config a build is; the others say which variant of the kernel.
TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_MID", "BLOCK_C", "BLOCK_T", "BLOCK")


@dataclass
class KernelBuild:
    """One compiled specialization: kernel name, dtype, constexpr values, launch options, and
    what ptxas gave it (bytes of shared memory, registers per thread, stack bytes per thread,
    None where the tool to read them is missing), or the compile error."""

    name: str
    arch: int
    dtype: str  # of the first pointer argument
    constants: dict[str, Any]
    num_warps: int
    num_stages: int
    autotuned: bool = False  # one candidate of an autotuner (not the pinned config)
    shared: int = 0
    registers: Optional[int] = None
    stack: Optional[int] = None
    # SASS instructions, and CALLs among them: a call is a subroutine ptxas could not inline,
    # in these kernels a 64-bit integer division (~80 instructions a call; in a K loop it
    # outweighs the MMA, as it did in the weight gradient's before its pixel walk).
    instructions: Optional[int] = None
    calls: Optional[int] = None
    # sm_90's asynchronous MMA (wgmma, HGMMA in SASS): how many groups the code lets run while
    # it goes on, the largest N of its waits `WARPGROUP.DEPBAR.LE gsb0, N`. 0: each K step
    # waits for its own MMAs before issuing the next step's loads and math (Triton's
    # pipeliner did not overlap them, or ptxas serialized them: C7515), so the tensor cores
    # idle while the warp issues; 1 or more: a step's MMAs overlap the next step's
    # instructions. None: no wgmma (another arch, a tile on mma.sync, a kernel without
    # tl.dot) or no cuobjdump.
    wgmma_in_flight: Optional[int] = None
    error: Optional[str] = None

    @property
    def tile(self) -> str:
        blocks = "x".join(str(v) for k, v in self.constants.items() if k in TILE_KEYS)
        return f"{blocks} w{self.num_warps} s{self.num_stages}"

    @property
    def variant(self) -> str:
        """The non-tile constexprs, those that are set (flags) or not booleans; a conv's
        dilation only where it is not 1."""
        parts = []
        for k, v in self.constants.items():
            if k in TILE_KEYS or v is False or (k == "DIL" and v == 1):
                continue
            parts.append(k if v is True else f"{k}={v}")
        return " ".join(parts)

    @property
    def one_k_step(self) -> bool:
        """Whether the K loop is known from the constexprs to be one step: a forward over
        flattened K with KH * KW * C_in <= BLOCK_K (a CIFAR net's 16-channel 1x1 conv). Its
        MMAs are one group with nothing after them to overlap, so that the wait for them
        (wgmma_in_flight 0) costs nothing."""
        c = self.constants
        flat = c.get("FLAT_K") or 0
        return bool(flat) and c.get("KH", 1) * c.get("KW", 1) * flat <= c.get("BLOCK_K", 0)

    @property
    def over_shared_limit(self) -> bool:
        limit = SHARED_LIMIT.get(self.arch)
        return limit is not None and self.shared > limit

    @property
    def skipped_by_autotuner(self) -> bool:
        """An autotuner candidate over the shared memory: the autotuner passes it over."""
        return self.autotuned and self.over_shared_limit

    def problems(self) -> list[str]:
        """What would stop this build from launching on its architecture. An autotuner
        candidate over the shared-memory limit is not one: Triton's autotuner skips a config
        whose launch raises OutOfResources (`Builds.skipped` lists them)."""
        found = []
        if self.error is not None:
            found.append(f"does not compile: {self.error}")
        if self.over_shared_limit and not self.autotuned:
            found.append(f"needs {self.shared} B of shared memory, sm_{self.arch} allows "
                         f"{SHARED_LIMIT[self.arch]}")
        return found


@dataclass
class Builds:
    """The builds made inside one `compile_only` block, one per specialization."""

    arch: int
    items: dict[tuple, KernelBuild] = field(default_factory=dict)

    def __iter__(self) -> Iterator[KernelBuild]:
        return iter(self.items.values())

    def __len__(self) -> int:
        return len(self.items)

    def problems(self) -> list[str]:
        return [f"{b.name} [{b.variant}] {b.tile}: {p}" for b in self for p in b.problems()]

    def skipped(self) -> list[KernelBuild]:
        """Autotuner candidates the autotuner will skip here (over the shared memory)."""
        return [b for b in self if b.skipped_by_autotuner]


class _StandInDriver:
    """What the JIT asks of a driver before compiling: the target, a device, a stream."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: Optional[int] = None) -> int:
        return 0


class _Pointer(MockTensor):
    """A tensor argument as the JIT specializes it: dtype and address modulo 16."""

    def __init__(self, tensor) -> None:
        super().__init__(tensor.dtype)
        self.offset = tensor.data_ptr() % 16

    def data_ptr(self) -> int:
        return self.offset


def _spec(value) -> Any:
    """What of one argument the specialization depends on."""
    if isinstance(value, _Pointer):
        return ("*", str(value.dtype), value.offset)
    if isinstance(value, int) and not isinstance(value, bool):
        return ("i", value == 1, value % 16 == 0, -2**31 <= value < 2**31, value < 2**63)
    if isinstance(value, float):
        return ("f",)
    return value


@dataclass
class _Job:
    fn: JITFunction
    args: tuple
    kwargs: dict
    constants: dict
    autotuned: bool


def _cuobjdump() -> Optional[str]:
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                           "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


def _resources(cubin: bytes) -> tuple[Optional[int], ...]:
    """(registers, stack bytes) per thread of the one kernel in `cubin`, its number of SASS
    instructions and of CALLs among them, and its wgmma groups in flight
    (`KernelBuild.wgmma_in_flight`), from cuobjdump (all None without it)."""
    tool = _cuobjdump()
    if tool is None:
        return None, None, None, None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    fields = dict(tok.split(":", 1) for tok in out.split() if tok.count(":") == 1
                  and tok.split(":")[0] in ("REG", "STACK"))
    as_int = lambda key: int(fields[key]) if key in fields else None  # noqa: E731
    # An instruction line: "  /*0a70*/  [@P0] OPCODE operands ;  /* 0x...encoding */"
    opcodes = [m.group(1) for m in _SASS_LINE.finditer(sass)]
    return (as_int("REG"), as_int("STACK"), len(opcodes) or None,
            sum(op.startswith("CALL") for op in opcodes) if opcodes else None,
            wgmma_in_flight(sass))


_SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)", re.M)
_WGMMA_WAIT = re.compile(r"WARPGROUP\.DEPBAR\.LE\s+gsb0\s*,\s*(0x[0-9a-f]+|\d+)")


def wgmma_in_flight(sass: str) -> Optional[int]:
    """The most wgmma groups the kernel in `sass` leaves running at a wait (the largest N of
    its `WARPGROUP.DEPBAR.LE gsb0, N`; 0 when every wait drains them all), None without
    wgmma (no HGMMA instruction)."""
    if "HGMMA" not in sass:
        return None
    return max((int(n, 0) for n in _WGMMA_WAIT.findall(sass)), default=0)


_JOBS: list[_Job] = []  # what forked workers compile, by index
_ARCH = 90


def _compile(index: int) -> tuple[Optional[str], KernelBuild]:
    """Compiles job `index` for sm_<_ARCH>: (the kernel's hash, its build)."""
    job = _JOBS[index]
    first = next((a for a in job.args if isinstance(a, _Pointer)), None)
    dtype = str(first.dtype).replace("torch.", "") if first is not None else "-"
    build = KernelBuild(job.fn.fn.__name__, _ARCH, dtype, job.constants,
                        job.kwargs.get("num_warps", 4), job.kwargs.get("num_stages", 3),
                        job.autotuned)
    driver = triton.runtime.driver
    previous = getattr(driver, "_active", None)
    driver.set_active(_StandInDriver(_ARCH))
    job.fn.device_caches.clear()  # its binder caches a target: make it take ours
    try:
        kernel = job.fn.warmup(*job.args, grid=(1,), **job.kwargs)
    except Exception as exc:  # noqa: BLE001 - every compile error is reported, not raised
        build.error = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
        return None, build
    finally:
        driver._active = previous
        job.fn.device_caches.clear()  # a later real launch builds its binder again
    build.shared = kernel.metadata.shared
    build.num_warps, build.num_stages = kernel.metadata.num_warps, kernel.metadata.num_stages
    (build.registers, build.stack, build.instructions, build.calls,
     build.wgmma_in_flight) = _resources(kernel.asm["cubin"])
    return kernel.hash, build


def _bind(fn: JITFunction, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The kernel's parameters by name, as a launch with (args, kwargs) sets them."""
    names = {p.name for p in fn.params}
    return dict(inspect.signature(fn.fn).bind_partial(
        *args, **{k: v for k, v in kwargs.items() if k in names}).arguments)


def _compile_all(jobs: list[_Job], arch: int, workers: int) -> list[tuple]:
    global _JOBS, _ARCH
    _JOBS, _ARCH = jobs, arch
    try:
        if workers <= 1 or len(jobs) <= 1:
            return [_compile(i) for i in range(len(jobs))]
        import multiprocessing

        # fork: the workers inherit the jobs (kernels defined anywhere, no pickling)
        with multiprocessing.get_context("fork").Pool(min(workers, len(jobs))) as pool:
            return pool.map(_compile, range(len(jobs)), chunksize=1)
    finally:
        _JOBS = []


@contextlib.contextmanager
def compile_only(arch: int = 90, workers: int = 1) -> Iterator[Builds]:
    """Within the block Triton launches are recorded, not run; on leaving it they compile
    for sm_<arch> in `workers` processes (module doc)."""
    if arch not in SHARED_LIMIT:  # another number crashes LLVM or floods MLIR errors
        raise ValueError(f"arch must be a compute capability among "
                         f"{', '.join(map(str, SHARED_LIMIT))}, got {arch!r}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_only needs TRITON_INTERPRET unset when Triton is imported "
                           "(the interpreter's kernels cannot be compiled)")
    if config.triton_version() < MIN_TRITON:
        raise RuntimeError("compile_only needs Triton>={}.{} (tried on 3.6 and 3.8; 3.1 lacks the "
                           "JIT internals it drives), found Triton {}".format(
                               *MIN_TRITON, triton.__version__))
    builds = Builds(arch)
    jobs: dict[tuple, _Job] = {}
    jit_run, tuner_run = JITFunction.run, Autotuner.run

    def record(fn: JITFunction, args: tuple, kwargs: dict, autotuned: bool = False) -> None:
        args = tuple(_Pointer(a) if hasattr(a, "data_ptr") else a for a in args)
        kwargs = {k: _Pointer(v) if hasattr(v, "data_ptr") else v for k, v in kwargs.items()}
        bound = _bind(fn, args, kwargs)
        constants = {p.name: bound[p.name] for p in fn.params
                     if p.is_constexpr and p.name in bound}
        key = (id(fn), repr(sorted(constants.items())),  # constexprs and options: exact
               tuple(_spec(bound[p.name]) for p in fn.params
                     if not p.is_constexpr and p.name in bound),
               repr(sorted((k, v) for k, v in kwargs.items() if k not in bound)))
        job = jobs.setdefault(key, _Job(fn, args, kwargs, constants, autotuned))
        job.autotuned &= autotuned  # also launched pinned: it must fit

    def run(self, *args, grid, warmup, **kwargs):
        record(self, args, kwargs)

    def tuned_run(self, *args, grid, warmup=False, **kwargs):
        pinned = config.PINNED
        for candidate in self.configs:
            record(self.fn, args, {**kwargs, **candidate.all_kwargs()}, autotuned=True)
        if not {"BLOCK_M", "BLOCK_N", "BLOCK_K"} <= {p.name for p in self.fn.params}:
            return  # not a conv tiling: `launch` never pins it
        record(self.fn, args, dict(
            kwargs, BLOCK_M=pinned.block_m, BLOCK_N=pinned.block_n, BLOCK_K=pinned.block_k,
            num_warps=pinned.num_warps, num_stages=pinned.num_stages))

    JITFunction.run, Autotuner.run = run, tuned_run
    config.set_compile_only(arch)
    try:
        yield builds
    finally:
        config.set_compile_only(None)
        JITFunction.run, Autotuner.run = jit_run, tuner_run
    for key, build in _compile_all(list(jobs.values()), arch, workers):
        builds.items.setdefault(key or ("failed", len(builds.items)), build)
