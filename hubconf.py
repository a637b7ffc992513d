"""torch.hub entry points: `torch.hub.load("<owner>/fused_resnet", "resnet50", weights="DEFAULT",
backend="auto")`, or with `source="local"` from a checkout. Each is the `fused_resnet.models`
function of that name, taking the same arguments (torchvision's `weights` / `progress` for the
ImageNet nets, `backend`, `num_classes`, ...). Without a built `_C` the package warns and runs
the Triton kernels on a GPU, the reference ops elsewhere."""

dependencies = ["torch", "torchvision"]

from fused_resnet.models import IMAGENET_ARCHS, cifar_resnet, plain_net  # noqa: E402, F401

# resnet18 ... resnet152, wide_resnet50_2 / 101_2, resnext50_32x4d / 101_32x8d / 101_64x4d:
# the package's functions by name
globals().update(IMAGENET_ARCHS)
