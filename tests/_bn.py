"""BatchNorm layers set away from their defaults (gamma 1, beta 0, mean 0, var 1), so that
folding them into a conv, or normalizing by them, is visible in a test's output."""

import torch
from torchvision.ops.misc import FrozenBatchNorm2d


def randomize_bn(module: torch.nn.Module) -> torch.nn.Module:
    """Every BatchNorm2d in `module` (itself included), and torchvision's FrozenBatchNorm2d:
    gamma ~ U(0.5, 1.5), beta ~ U(-0.5, 0.5), running mean ~ U(-0.2, 0.2), running var ~
    U(0.5, 2), drawn from torch's global generator in that order, layer by layer. Returns
    `module`."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return module
