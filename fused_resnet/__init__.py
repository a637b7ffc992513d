"""fused_resnet: fused conv + BatchNorm + residual + ReLU blocks and the ResNet family.

Layers, top to bottom: `models` -> `nn` -> `ops` -> kernels (`reference`, `_C`, Triton).
"""

from fused_resnet import backend, models, nn, ops, reference
from fused_resnet.convert import convert
from fused_resnet.determinism import is_deterministic, set_deterministic
from fused_resnet.flops import FlopsReport, count_flops

__version__ = "0.1.0"

__all__ = ["FlopsReport", "backend", "convert", "count_flops", "is_deterministic", "models",
           "nn", "ops", "reference", "set_deterministic"]
