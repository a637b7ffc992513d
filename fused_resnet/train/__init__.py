"""Training: `python -m fused_resnet train` (loop.py: SGD, the paper's schedule, AMP,
resume, DDP; checkpoint.py: what a checkpoint holds and how a resume reads it; graphed.py:
the step replayed from a CUDA graph, and fused SGD's zero momentum buffers; data.py:
synthetic or ImageFolder data; report.py: CSV logs and curves; cli.py: arguments and the
plain-vs-residual degradation demo)."""

from fused_resnet.train.graphed import CapturedTrainStep, prime_momentum_buffers, training_step
from fused_resnet.train.loop import TrainConfig, train

__all__ = ["CapturedTrainStep", "TrainConfig", "prime_momentum_buffers", "train",
           "training_step"]
