"""Every distinct residual block of ResNet-50, fused vs eager cuDNN vs torch.compile.

Each block shape of the model (the first block of each stage, the stride-2 projection
blocks, the identity blocks) is copied out with its weights and timed in one process on the
same channels_last input: training (forward + backward) and eval (no_grad), in bf16 and fp16
autocast, at batch 256 and 1, on every fused backend (Triton, the `_C` CUDA fallback), the
eager reference ops (cuDNN) and `torch.compile` of them, plus the single-launch eval kernel
where it applies. It is `python -m fused_resnet bench --stages` with these defaults; further
arguments of that command are passed on (`--write-table` records the fastest backend per
shape for `backend="auto"`). Writes benchmarks/results/<gpu>-<date>/blocks.{csv,json,md,png}.

    python benchmarks/bench_blocks.py                         # GPU
    python benchmarks/bench_blocks.py --smoke --out /tmp/x    # CPU: tiny shapes, the code path
"""

from __future__ import annotations

import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def blocks_args(smoke: bool, out: str) -> list[str]:
    """`bench --stages` arguments of the block run (tiny CIFAR shapes on CPU when `smoke`)."""
    if smoke:
        return ["bench", "--stages", "--arch", "cifar_resnet20", "--image-size", "8",
                "--batch-sizes", "2", "--iters", "2", "--warmup", "1", "--out", out,
                "--no-progress"]
    return ["bench", "--stages", "--arch", "resnet50", "--dtypes", "bf16", "fp16",
            "--batch-sizes", "256", "1", "--out", out]


def main(argv=None) -> int:
    from fused_resnet.bench.cli import run_preset

    return run_preset(__doc__, blocks_args, RESULTS, argv)


if __name__ == "__main__":
    sys.exit(main())
