"""Launch configurations for the Triton kernels: autotuned on GPU, pinned when asked.

`pin_config(...)` (or the environment variable FUSED_RESNET_TRITON_PIN=1, deterministic mode,
and always under TRITON_INTERPRET=1) makes every launch use one fixed config: fast and
deterministic tests, bitwise-reproducible runs. Otherwise kernels are autotuned per shape key.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2


PINNED = TileConfig(64, 64, 32, num_warps=4, num_stages=2)  # BLOCK_M: a multiple of 32
_pinned: Optional[TileConfig] = None
# Widest bottleneck mid width the single-launch eval kernel keeps on chip (its BLOCK_MID tile).
BOTTLENECK_EVAL_MAX_MID = 256
# Inputs with fewer channels take flattened K (fwd) / flattened (r, s, c) columns (wgrad):
# the smallest BLOCK_K / BLOCK_N of the autotuner's configs and of PINNED, so a per-tap slice
# would be partly empty whatever the autotuner picks (tested).
FLAT_K_BELOW = 32


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host-side grids and counts. triton.cdiv is a ConstexprFunction since
    Triton 3.6 whose Python call takes ~2.5 us (an import and a constexpr unwrap per call),
    and a conv launch's grid called it twice each launch."""
    return -(-a // b)


def flat_k(c_in: int) -> bool:
    """Whether a conv over c_in input channels takes flattened K (see triton/conv.py)."""
    return c_in < FLAT_K_BELOW


def gather_in_registers(dtype: torch.dtype, c_in: int, device: torch.device) -> bool:
    """Whether a flattened-K conv's gathered x tile should stay in registers as sm_90
    wgmma's A operand (GATHER_IN_REGS of the fwd and wgrad kernels) rather than be staged
    in shared memory. A tile straight from a load that cp.async cannot copy (rows of c_in
    2-byte elements with c_in odd: 2-byte runs, under cp.async's 4) is stored to one shared
    buffer each K step, so every step waits for the last one's MMAs; fp32, or an even c_in,
    is copied asynchronously into a multi-stage buffer and keeps MMAs in flight as it is.
    Only where the kernels compile for sm_90 (a CUDA device of capability 9.0, or
    `aot.compile_only(90)`): on other GPUs the select that keeps the tile in registers is
    only work."""
    if not (flat_k(c_in) and c_in % 2 == 1 and dtype in (torch.float16, torch.bfloat16)):
        return False
    arch = compile_only_arch()
    if arch is not None:
        return arch == 90
    return device.type == "cuda" and _capability(device.index) == (9, 0)


@functools.cache
def _capability(index: Optional[int]) -> Optional[tuple[int, int]]:
    """The NVIDIA compute capability of a CUDA device, asked once per device (the current
    one: None); None on ROCm, whose devices torch also calls "cuda" (an MI200 reports
    (9, 0))."""
    if torch.version.hip is not None:
        return None
    return torch.cuda.get_device_capability(index)


# The wgrad reduction over output pixels is cut into slices (grid axis 2) until the grid
# holds about WGRAD_PROGRAMS programs (4 waves of an H100's 132 SMs, output tiles counted at
# 128x128), keeping at least WGRAD_MIN_ROWS pixels a slice (64 K steps of 32, over which a
# program's setup and its partial's write are spread). With a fixed 64 slices, as before
# 2026-12-05, ResNet-50's stem wgrad (2 tiles) ran 128 programs of 1568 steps, under one wave,
# and its 1x1 64-channel ones 64.
WGRAD_PROGRAMS = 4 * 132
WGRAD_MIN_ROWS = 2048
WGRAD_MAX_SPLIT = 256


def wgrad_atomic(split: int) -> bool:
    """Whether a wgrad cut into `split` slices adds them by fp32 atomics into one zeroed dw:
    where launches are autotuned (ResNet-50 bf16 at batch 256 then moves ~0.2 GB of weight
    gradient a step, not ~2.9 GB of slices written and then summed by one more launch per
    conv). Where a config is pinned (deterministic mode, `pin_config`, the interpreter) each
    slice writes its own dw and they are summed in a fixed order: atomics add in whatever
    order the programs finish, which would change the bits from run to run."""
    return split > 1 and pinned_config() is None


def wgrad_tiles(c_out: int, c_in: int, kh: int, kw: int) -> int:
    """Output tiles of a weight gradient (C_out x its columns), counted at 128x128."""
    columns = cdiv(kh * kw * c_in, 128) if flat_k(c_in) else kh * kw * cdiv(c_in, 128)
    return cdiv(c_out, 128) * columns


def wgrad_split(rows: int, tiles: int = 1) -> int:
    """Slices of the wgrad reduction over `rows` output pixels for `tiles` output tiles
    (`wgrad_tiles`): enough programs to fill a GPU, one when interpreting."""
    if interpreting():
        return 1
    return max(1, min(WGRAD_MAX_SPLIT, rows // WGRAD_MIN_ROWS, cdiv(WGRAD_PROGRAMS, tiles)))


# How the training chain feeds a conv an operand that a BN transforms: "on_load" (DESIGN.md:
# the next conv applies the previous BN + ReLU to each input tile it loads, a 1x1 conv's
# backward the BN backward to each dy tile, so neither is ever written) or "written" (one
# elementwise pass writes relu(bn(y)) / dy, which the plain conv loop then reads, and the
# forward's is recomputed for the weight gradient). On sm_90 the transformed loops issue
# 1.5-3x the instructions of the plain ones (their wgmma, which waited for each other in
# most tiles, now keep groups in flight: README, "Benchmarks"); which is faster is for a
# GPU to say (`bench --columns triton triton-written`). FUSED_RESNET_OPERANDS sets the
# default; `set_operands` overrides it.
OPERAND_MODES = ("on_load", "written")
OPERANDS_ENV = "FUSED_RESNET_OPERANDS"
_operands: Optional[str] = None


def set_operands(mode: Optional[str]) -> None:
    """Use `mode` (one of OPERAND_MODES) from now on; None: back to the environment's."""
    global _operands
    if mode is not None and mode not in OPERAND_MODES:
        raise ValueError(f"mode must be one of {OPERAND_MODES} or None, got {mode!r}")
    _operands = mode


def operands() -> str:
    """The operand mode of the training chain: the one `set_operands` set, else
    FUSED_RESNET_OPERANDS's, else "on_load"."""
    if _operands is not None:
        return _operands
    mode = os.environ.get(OPERANDS_ENV, "on_load")
    if mode not in OPERAND_MODES:
        raise ValueError(f"{OPERANDS_ENV} must be one of {OPERAND_MODES}, got {mode!r}")
    return mode


@contextlib.contextmanager
def operands_mode(mode: str) -> Iterator[None]:
    """`set_operands(mode)` inside the block, the previous setting restored after it."""
    saved = _operands
    set_operands(mode)
    try:
        yield
    finally:
        set_operands(saved)


_compile_only_arch: Optional[int] = None


def set_compile_only(arch: Optional[int]) -> None:
    """Set by `aot.compile_only`: launches compile for sm_<arch> (None: they run)."""
    global _compile_only_arch
    _compile_only_arch = arch


def compile_only_arch() -> Optional[int]:
    """The architecture launches compile for instead of running, or None."""
    return _compile_only_arch


def triton_version() -> tuple[int, int]:
    """(major, minor) of the installed Triton, e.g. (3, 6) for "3.6.0+git1234"."""
    import triton

    return tuple(int(part) for part in triton.__version__.split(".")[:2])


# Whether the kernels run in Triton's interpreter: TRITON_INTERPRET=1 when this module was
# imported, with the kernel modules (`import fused_resnet` imports them all), which is when
# triton.jit chose interpreted or compiled for every kernel. Setting the variable later
# changes no kernel, so it is read once here, not per launch (an os.environ lookup takes
# ~1.5 us, and a conv launch asked up to three times).
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def interpreting() -> bool:
    """Whether the kernels were made for Triton's interpreter (module comment above)."""
    return _INTERPRETING


def pin_config(config: Optional[TileConfig] = PINNED) -> None:
    """Use `config` for every conv launch from now on (None: back to autotuning)."""
    global _pinned
    _pinned = config


def pinned_config() -> Optional[TileConfig]:
    """The config every launch must use, or None to autotune."""
    if _pinned is not None:
        return _pinned
    if interpreting() or torch.are_deterministic_algorithms_enabled():  # fr.set_deterministic
        return PINNED
    if os.environ.get("FUSED_RESNET_TRITON_PIN") == "1":
        return PINNED
    return None


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot precision for fp32 operands: TF32 when cuDNN may use it (PyTorch's default for
    convolutions), else exact IEEE fp32. Ignored by Triton for other dtypes."""
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not interpreting():
        return "tf32"
    return "ieee"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator / statistics dtype: fp64 for fp64 inputs (interpreter only), else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
