"""torch.hub entry points: `torch.hub.load("<owner>/fused_resnet", "resnet50", weights="DEFAULT",
backend="auto")`, or with `source="local"` from a checkout. Each is the `fused_resnet.models`
function of that name, taking the same arguments (torchvision's `weights` / `progress` for the
ImageNet nets, `backend`, `num_classes`, ...). Without a built `_C` the package warns and runs
the Triton kernels on a GPU, the reference ops elsewhere."""

dependencies = ["torch", "torchvision"]

from fused_resnet.models import (  # noqa: E402
    cifar_resnet,
    plain_net,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    wide_resnet50_2,
)

__all__ = [
    "cifar_resnet",
    "plain_net",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "wide_resnet50_2",
]
