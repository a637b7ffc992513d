"""Peak throughput of known GPUs, for the roofline columns of the benchmarks.

Dense (no structured sparsity) peaks from NVIDIA's data sheets, in TFLOP/s, and HBM bandwidth
in TB/s. "fp32" is the CUDA-core FP32 peak (what fp32 with TF32 off can reach), "tf32" the
TF32 tensor-core peak, "bf16" / "fp16" the tensor-core peaks with fp32 accumulation. A
benchmark row's "% of peak" is its achieved TFLOP/s over the peak of its dtype; an unknown
device gives None (printed as "-"). `measure_ceilings` measures the two ceilings on the card
itself (a large matrix product, a large copy); `bench --measure-peaks` divides by those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def default_device(name: Optional[str] = None) -> torch.device:
    """The device a benchmark run takes: `name` where given, else CUDA where there is a GPU,
    else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


@dataclass(frozen=True)
class DevicePeak:
    name: str
    tflops: dict[str, float]  # dtype name -> dense peak TFLOP/s
    tb_per_s: float  # memory bandwidth

    def tflops_for(self, dtype: str) -> float:
        return self.tflops[dtype]

    def ridge_flop_per_byte(self, dtype: str) -> float:
        """Arithmetic intensity above which a kernel can be compute-bound."""
        return self.tflops[dtype] / self.tb_per_s


def _peak(name: str, fp32: float, tf32: float, half: float, tb_per_s: float) -> DevicePeak:
    return DevicePeak(name, {"fp32": fp32, "tf32": tf32, "bf16": half, "fp16": half}, tb_per_s)


# Matched against torch.cuda.get_device_name() by substring, first match wins: the more
# specific names come first ("H100 PCIe" before "H100").
KNOWN_PEAKS: list[tuple[str, DevicePeak]] = [
    ("H200", _peak("H200 SXM", 67.0, 494.7, 989.4, 4.8)),
    ("H100 PCIe", _peak("H100 PCIe", 51.2, 378.0, 756.0, 2.0)),
    ("H100 NVL", _peak("H100 NVL", 60.0, 417.5, 835.5, 3.9)),
    ("H100", _peak("H100 SXM", 67.0, 494.7, 989.4, 3.35)),
    ("A100-SXM4-80GB", _peak("A100 SXM 80GB", 19.5, 156.0, 312.0, 2.039)),
    ("A100-PCIE-80GB", _peak("A100 PCIe 80GB", 19.5, 156.0, 312.0, 1.935)),
    ("A100", _peak("A100 40GB", 19.5, 156.0, 312.0, 1.555)),
    ("L40S", _peak("L40S", 91.6, 183.0, 362.0, 0.864)),
    ("L4", _peak("L4", 30.3, 60.0, 121.0, 0.3)),
    ("A10", _peak("A10", 31.2, 62.5, 125.0, 0.6)),
]


def device_peak(device_name: str) -> Optional[DevicePeak]:
    """The peaks of the GPU called `device_name` (torch's device name, or a name such as
    "h100 pcie": any case), or None when it is not in KNOWN_PEAKS."""
    name = device_name.upper()
    for key, peak in KNOWN_PEAKS:
        if key.upper() in name:
            return peak
    return None


def datasheet_tflops(device_name: str, dtype: str) -> Optional[float]:
    """The dense datasheet peak of `device_name` for `dtype`, or None when unknown."""
    peak = device_peak(device_name)
    return None if peak is None else peak.tflops_for(dtype)


def roofline_ms(flops: float, nbytes: float, tflops: float, tb_per_s: float) -> float:
    """The least time (ms) for `flops` and `nbytes` at peaks of `tflops` TFLOP/s and
    `tb_per_s` TB/s: max(flops / FLOP/s, bytes / B/s), the roofline's bound."""
    return max(flops / (tflops * 1e9), nbytes / (tb_per_s * 1e9))


def percent_of_peak(tflops: float, device_name: str, dtype: str) -> Optional[float]:
    """Achieved `tflops` as a percentage of the device's dense peak for `dtype`."""
    peak = datasheet_tflops(device_name, dtype)
    return None if peak is None else 100.0 * tflops / peak


def measure_ceilings(device: torch.device, dtype: str, n: int = 8192,
                     copy_mib: int = 1024) -> tuple[float, float]:
    """(TFLOP/s, TB/s) measured here: an n x n x n matrix product in `dtype` (random inputs,
    2 n^3 FLOPs; "tf32" with TF32 on, "fp32" with it off) and a device-to-device copy of
    `copy_mib` MiB (bytes read plus bytes written). Datasheet peaks are leads; these are the
    ceilings the card reaches as found."""
    from fused_resnet.bench.suite import precision
    from fused_resnet.bench.timing import time_ms

    tensor_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
    a = torch.randn(n, n, device=device, dtype=tensor_dtype)
    b = torch.randn(n, n, device=device, dtype=tensor_dtype)
    with precision("tf32" if dtype == "tf32" else "fp32", device):
        mm = time_ms(lambda: torch.mm(a, b), device).median
    src = torch.randn(copy_mib * 2**18, device=device)  # 4-byte elements
    dst = torch.empty_like(src)
    copy = time_ms(lambda: dst.copy_(src), device).median
    return 2 * n**3 / mm / 1e9, 2 * src.nbytes / copy / 1e9
