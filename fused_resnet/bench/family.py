"""`bench --flops-table`: the ResNet family's size, work and measured speed in one table.

For each arch: parameters and GMACs (`count_flops` at the measured input size, with the
paper's Table 1 figure beside it at 224x224), then for each column the batch-1 latency (p50 /
p90) and the inference throughput at `batch` - the paper's Table 1 plus measured columns.
"""

from __future__ import annotations

from typing import Optional

from fused_resnet.bench.report import fmt
from fused_resnet.bench.suite import LABELS, SuiteConfig, run_suite
from fused_resnet.flops import PAPER_GMACS, count_flops
from fused_resnet.models import build_model, is_cifar
from fused_resnet.table import format_table

FAMILY = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def flops_table(archs: tuple[str, ...] = FAMILY, *, batch: int = 64, dtype: str = "fp32",
                columns: tuple[str, ...] = ("auto", "eager-cl"),
                image_size: Optional[int] = None, variant: str = "v1.5", latency_batch: int = 1,
                device: Optional[str] = None, warmup: int = 2, iters: int = 5,
                progress: bool = True) -> list[dict]:
    """One row per arch: params, MACs, and latency / img/s of each column."""
    rows = []
    for arch in archs:
        cfg = SuiteConfig(arch=arch, variant=variant, batch_sizes=(batch,),
                          latency_batch=latency_batch, dtypes=(dtype,),
                          modes=("latency", "infer"), columns=columns, image_size=image_size,
                          warmup=warmup, iters=iters, device=device)
        timed = run_suite(cfg, progress=progress)
        size = timed[0]["image_size"]
        report = count_flops(build_model(arch, **({} if is_cifar(arch) else
                                                   {"variant": variant})),
                             (1, 3, size, size), training=False)
        row = {"arch": arch, "variant": "-" if is_cifar(arch) else variant,
               "image_size": size, "params_m": report.params / 1e6,
               "gmacs": report.macs / 1e9,
               "paper_gmacs_224": PAPER_GMACS.get(arch), "dtype": dtype, "batch": batch}
        for r in timed:
            prefix = r["column"].replace(" ", "_")
            if r["mode"] == "latency":
                row[f"{prefix}_latency_ms"] = r.get("ms")
                row[f"{prefix}_latency_p90_ms"] = r.get("ms_p90")
            else:
                row[f"{prefix}_images_per_s"] = r.get("images_per_s")
                row[f"{prefix}_tflops"] = r.get("tflops")
            row[f"{prefix}_{r['mode']}_error"] = r["error"]
        rows.append(row)
    return rows


def family_text(rows: list[dict], columns: tuple[str, ...]) -> str:
    """The rows as a markdown table: size and work, then per column latency and img/s."""
    labels = [LABELS[c] for c in columns]
    headers = ["arch", "params (M)", "GMACs", "paper GMACs (224, v1)"]
    for label in labels:
        headers += [f"{label} latency ms p50 (p90)", f"{label} img/s"]
    body = []
    for r in rows:
        line = [r["arch"], f"{r['params_m']:.2f}", f"{r['gmacs']:.2f}",
                fmt(r["paper_gmacs_224"], ".1f")]
        for label in labels:
            p = label.replace(" ", "_")
            line += [f"{fmt(r.get(f'{p}_latency_ms'))} ({fmt(r.get(f'{p}_latency_p90_ms'))})",
                     fmt(r.get(f"{p}_images_per_s"), ".1f")]
        body.append(line)
    return format_table(headers, body)
