"""Benchmarks of the fused ResNet against eager PyTorch and torch.compile.

- `suite.run_suite`: the model benchmark of `python -m fused_resnet bench` (training step,
  inference throughput, latency; every column on the same input);
- `blocks.bench_stages`: the per-stage breakdown, one row per distinct block shape, and
  `blocks.fastest_backends`, the entries of the per-shape backend table;
- `family.flops_table`: the family's MACs, parameters, latency and img/s in one table;
- `timing`, `hardware`, `report`: timers, GPU peaks, result files.
"""

from fused_resnet.bench.report import (
    device_label,
    report_header,
    results_dir,
    write_report,
)
from fused_resnet.bench.suite import SuiteConfig, run_suite
from fused_resnet.bench.timing import Timing, time_columns, time_ms

__all__ = [
    "SuiteConfig",
    "Timing",
    "device_label",
    "report_header",
    "results_dir",
    "run_suite",
    "time_columns",
    "time_ms",
    "write_report",
]
