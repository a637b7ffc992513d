"""The whole model: fused ResNet-50 vs eager cuDNN (NCHW, channels_last) vs torch.compile.

One run, one process, the same weights and input for every column: a training step (forward,
cross-entropy, backward, SGD) and inference (eval, no_grad) at batch 256, latency at batch 1,
in bf16 and fp16 autocast; img/s, TFLOP/s, % of the GPU's peak, activation MiB (what
autograd keeps for backward) and peak MiB, and each column's speed over eager channels_last
and over compile. It is `python -m fused_resnet bench` with these defaults; any further
argument of that command is passed on and wins (`--dtypes fp32`, `--cuda-graphs`, ...).
Writes benchmarks/results/<gpu>-<date>/model.{csv,json,md,png}.

    python benchmarks/bench_model.py                          # GPU
    python benchmarks/bench_model.py --smoke --out /tmp/x     # CPU: tiny shapes, the code path
"""

from __future__ import annotations

import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def model_args(smoke: bool, out: str) -> list[str]:
    """`bench` arguments of the model run (tiny CIFAR shapes on CPU when `smoke`)."""
    if smoke:
        return ["bench", "--arch", "cifar_resnet20", "--image-size", "8", "--batch-sizes",
                "2", "--iters", "2", "--warmup", "1", "--dtypes", "fp32", "bf16",
                "--out", out, "--no-progress"]
    return ["bench", "--arch", "resnet50", "--dtypes", "bf16", "fp16", "--batch-sizes", "256",
            "--latency-batch", "1", "--out", out]


def main(argv=None) -> int:
    from fused_resnet.bench.cli import run_preset

    return run_preset(__doc__, model_args, RESULTS, argv)


if __name__ == "__main__":
    sys.exit(main())
