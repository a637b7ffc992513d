"""`python -m fused_resnet validate`: a model on a chosen backend against the reference.

Builds the model named `arch` on `backend` and a reference with the same weights
(torchvision's model where one exists, else this package's `backend="reference"` model),
then runs `steps` SGD steps on one fixed random batch and compares, with the rule of
`fused_resnet.testing`: training logits, loss and every parameter's gradient at each step,
the BN running stats after the steps, and the eval logits. In fp16/bf16 (autocast) an fp64
copy of the reference is the truth and the reference in the same dtype is the eager baseline.
In fp64 both models run in fp64 and are held to the fixed tolerance: the default on CPU,
where fp32 cannot be judged tightly (see `judge`).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fused_resnet.backend import ENV_VAR, OP_BACKENDS, resolve, unavailable_reason
from fused_resnet.models import ARCH_HELP, IMAGENET_ARCHS, build_model, is_cifar, reference_twin
from fused_resnet.models.registry import check_weights, set_backend
from fused_resnet.nn.batch_check import bn_map_sizes, check_image_batch
from fused_resnet.testing import (
    DTYPES,
    TOLERANCES,
    Comparison,
    compare,
    compare_norm,
    exact_fp32,
)


@dataclass
class ValidationReport:
    arch: str
    backend: str
    reference: str
    dtype: str
    device: str
    input_shape: tuple[int, ...]
    rows: list[tuple[str, Comparison]] = field(default_factory=list)
    # what makes the verdict unreliable (an ill-conditioned input: `few_values_warning`)
    warnings: list[str] = field(default_factory=list)
    resolved: str = ""  # the backend the candidate's ops run on (`resolved_backend`)

    @property
    def ok(self) -> bool:
        return all(c.ok for _, c in self.rows)


class ModelRunError(RuntimeError):
    """An exception one of validate's models raised while it ran (the original is the
    `__cause__`): `model` says which (the candidate or a reference), `phase` when."""

    def __init__(self, model: str, phase: str, cause: BaseException):
        lines = str(cause).strip().splitlines()
        super().__init__(f"{model} raised {type(cause).__name__} during {phase}"
                         + (f": {lines[0]}" if lines else ""))
        self.model, self.phase = model, phase


@contextlib.contextmanager
def _running(who: tuple[str, bool], phase: str):
    """Any exception inside becomes a ModelRunError naming the model (`who`: its name and
    whether it is the candidate) and `phase`, but the candidate's NotImplementedError: its
    backend does not run this model, an argument error (--backend)."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, ModelRunError) or (who[1] and isinstance(exc, NotImplementedError)):
            raise
        raise ModelRunError(who[0], phase, exc) from exc


def _step(model: nn.Module, x, target, autocast_dtype, device_type, who: tuple[str, bool],
          step: int):
    """One forward + backward of `who` (`_running`'s): returns (logits in fp64, loss,
    {param name: grad})."""
    model.zero_grad(set_to_none=True)
    ctx = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with ctx, _running(who, f"step {step}: training forward"):
        logits = model(x)
    loss = F.cross_entropy(logits.float() if logits.dtype != torch.float64 else logits, target)
    with _running(who, f"step {step}: backward"):
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), loss.detach(), grads


def _worst(items: list[tuple[str, Comparison]]) -> tuple[str, Comparison]:
    """The failing comparison with the largest relative error, else the largest overall."""
    return max(items, key=lambda item: (not item[1].ok, item[1].max_rel))


# Below this many values per channel in a BN's batch statistics (N * h * w at the last
# stage) the statistics are so ill-conditioned that a random ResNet's gradients and eval
# logits blow up (1e6, 1e291 after one SGD step at 2 values) and rounding alone can exceed
# the tolerances, in fp64 too. README's CPU input (ResNet-50, 64x64, batch 4) gives 16.
MIN_BN_VALUES = 16


def bn_values_per_channel(model: nn.Module, batch: int, size: int) -> Optional[int]:
    """The fewest values any BN of `model` normalizes per channel at input (batch, 3, size,
    size), from the map sizes its stem and blocks give (`nn.batch_check.bn_map_sizes`, the
    models' own batch check: nothing runs); None where those cannot be told or a map would
    be empty (the model's forward names the problem)."""
    sizes = bn_map_sizes(model, (size, size))
    return min((batch * h * w for h, w in sizes), default=None) if sizes is not None else None


def few_values_warning(model: nn.Module, batch: int, size: int) -> Optional[str]:
    """A warning where some BN sees fewer than MIN_BN_VALUES values per channel, else None."""
    values = bn_values_per_channel(model, batch, size)
    if values is None or values >= MIN_BN_VALUES:
        return None
    return (f"at batch {batch} and {size}x{size} images the last stage's BatchNorms see only "
            f"{values} value{'s' if values != 1 else ''} per channel: their batch statistics "
            "are ill-conditioned, gradients and logits blow up, and the tolerance check may "
            "fail on rounding alone (in fp64 too); use a larger --image-size or --batch-size "
            f"(at least {MIN_BN_VALUES} values per channel)")


def load_model(arch: str, weights: Optional[str], **kwargs) -> nn.Module:
    """build_model(arch, weights=weights, **kwargs), with a file of torchvision's weights in
    torch.hub's cache that cannot be loaded named (with --weights) instead of torch.load's
    traceback."""
    try:
        return build_model(arch, weights=weights, **kwargs)
    except Exception as exc:
        if weights is None:
            raise
        from fused_resnet.models.pretrained import checkpoint_path, resolve_weights

        try:
            path = checkpoint_path(resolve_weights(arch, weights))
        except Exception:  # noqa: BLE001 - a bad name: build_model's own error stands
            raise exc from None
        if not os.path.isfile(path) or isinstance(exc, ValueError):
            raise
        raise ValueError(
            f"--weights {weights}: the cached file {path} cannot be loaded "
            f"({type(exc).__name__}); it is damaged or not torchvision's file: delete it to "
            "download it again") from None


def check_model_flags(arch: str, weights: Optional[str] = None,
                      shortcut: Optional[str] = None) -> None:
    """Raises ValueError naming the flag where --arch, --shortcut or --weights names no model
    of `ARCH_HELP` (checked by building it on the meta device: no memory, no init cost)."""
    try:
        with torch.device("meta"):
            build_model(arch)
    except ValueError as exc:
        if arch in IMAGENET_ARCHS or re.fullmatch(r"(cifar_resnet|plain_cifar|plain)\d+", arch):
            raise ValueError(f"--arch {arch}: {exc}") from None  # a depth the family lacks
        raise ValueError(f"--arch: unknown model {arch!r}; expected one of {ARCH_HELP}"
                         ) from None
    if shortcut is not None:
        if arch.startswith("plain"):
            raise ValueError(f"--shortcut: {arch} is a plain net, without shortcuts (drop "
                             "--shortcut, or take the residual net of that depth)")
        if weights is not None and shortcut != "B":
            raise ValueError(f"--shortcut {shortcut} does not fit --weights {weights}: "
                             "torchvision's weights have projection shortcuts (B)")
    try:
        check_weights(arch, weights)
    except (ValueError, ImportError) as exc:
        message = str(exc)
        raise ValueError(f"--{message}" if message.startswith("weights")
                         else f"--weights {weights}: {message}") from None


def resolved_backend(backend: str, dev: torch.device, dtype: str) -> str:
    """`backend` as validate's header shows it: a backend named, or for "auto" (which
    FUSED_RESNET_BACKEND may replace) the one its ops resolve to on `dev` and any op that
    resolves to another, e.g. "auto -> triton (bn_add_relu: cuda)". As the ops choose
    (`ops.conv_bn_act.select_kernels`): no Triton for fp64 on CUDA under "auto"."""
    if backend != "auto":
        return backend
    names = {}
    for op in OP_BACKENDS:
        try:
            names[op] = resolve(backend, op, dev)
        except (RuntimeError, NotImplementedError) as exc:  # FUSED_RESNET_BACKEND's choice
            raise ValueError(f"{ENV_VAR}={os.environ.get(ENV_VAR)}: {exc}") from None
        if names[op] == "triton" and dtype == "fp64" and dev.type == "cuda":
            names[op] = resolve(backend, op, dev, exclude=("triton",))
    main = collections.Counter(names.values()).most_common(1)[0][0]
    notes = [f"{op}: {name}" for op, name in names.items() if name != main]
    if os.environ.get(ENV_VAR):
        notes.append(f"from {ENV_VAR}={os.environ[ENV_VAR]}")
    return f"auto -> {main}" + (f" ({', '.join(notes)})" if notes else "")


@exact_fp32()
def validate(
    arch: str = "resnet50",
    backend: str = "auto",
    dtype: Optional[str] = None,
    steps: int = 2,
    *,
    batch_size: Optional[int] = None,
    image_size: Optional[int] = None,
    device: Optional[str] = None,
    variant: str = "v1.5",
    weights: Optional[str] = None,
    lr: float = 0.01,
    seed: int = 0,
    shortcut: Optional[str] = None,
) -> ValidationReport:
    """dtype: fp32, fp64, bf16 or fp16 (autocast); None is fp32 on CUDA and fp64 on CPU.
    weights: torchvision's pretrained weights for an ImageNet arch (a name such as
    "DEFAULT"), loaded into both models; None compares randomly initialised ones.
    seed: of the weights (random ones), the input batch and its labels. shortcut: the
    paper's option A / B / C (None: the arch's default); where it is not torchvision's (B),
    the reference is this package's reference backend. An exception a model raises while
    it runs is a ModelRunError (the candidate's NotImplementedError excepted)."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    for name, value in (("steps", steps), ("batch_size", batch_size),
                        ("image_size", image_size)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reason = None if backend == "auto" else unavailable_reason(backend, dev)
    if reason is not None:  # before two models are built, not at their first op
        raise ValueError(f"backend {backend!r} (--backend) cannot run on {dev.type} here: "
                         f"{reason}")
    on_gpu = dev.type == "cuda"
    dtype = dtype or ("fp32" if on_gpu else "fp64")
    exact = dtype == "fp64"
    cifar = is_cifar(arch)
    size = image_size if image_size is not None else 32 if cifar else 224 if on_gpu else 64
    batch = batch_size if batch_size is not None else 32 if on_gpu else 4
    resolved = resolved_backend(backend, dev, dtype)
    torch.manual_seed(seed)
    kwargs = {"backend": backend} if cifar else {"backend": backend, "variant": variant}
    if shortcut is not None:
        kwargs["shortcut"] = shortcut
    candidate = load_model(arch, weights, **kwargs)
    try:  # an input the model refuses is an argument error, found before any layer runs
        check_image_batch(candidate.train(), torch.empty(batch, 3, size, size, device="meta"))
    except ValueError as exc:
        raise ValueError(f"--image-size {size} / --batch-size {batch}: {exc}") from None
    notes = [few_values_warning(candidate, batch, size)]
    if shortcut in (None, "B"):  # torchvision's layout where it has the arch
        reference, ref_name = reference_twin(arch, candidate, variant)
    else:
        reference = set_backend(copy.deepcopy(candidate), "reference")
        ref_name = "fused_resnet reference backend"
    if backend == "reference" and ref_name.startswith("fused_resnet"):
        notes.append(f"{arch} has no torchvision twin here, so its reference is this package's "
                     "reference backend: with --backend reference the model is compared with "
                     "a copy of itself (every error 0); validate a fused backend against it")
    labels = {"candidate": (f"the candidate model ({arch}, backend {resolved})", True),
              "reference": (f"the reference ({ref_name})", False),
              "truth": (f"the fp64 truth (a copy of the reference, {ref_name})", False)}
    half = DTYPES[dtype] if dtype in ("bf16", "fp16") else None
    if exact:  # the reference in fp64 is the truth
        models = {"candidate": candidate.to(dev).double(), "reference": reference.to(dev).double()}
    else:
        models = {"candidate": candidate.to(dev), "reference": reference.to(dev),
                  "truth": copy.deepcopy(reference).to(dev).double()}
    x = torch.randn(batch, 3, size, size, device=dev, dtype=DTYPES[dtype] if exact else None)
    target = torch.randint(0, candidate.fc.out_features, (batch,), device=dev)
    report = ValidationReport(arch, backend, ref_name, dtype, str(dev), tuple(x.shape),
                              resolved=resolved)
    report.warnings += [note for note in notes if note is not None]
    optimizers = {
        k: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9) for k, m in models.items()
    }

    def judge(results: dict, kind: str = "output") -> Comparison:
        """The candidate's entry of `results` against the fp64 truth with the reference as
        the eager baseline (fp16 / bf16: the 2x rule). fp64: against the reference at the
        fixed tolerance. fp32: the same, or, where fp32 rounding alone moves the result
        further than that (an ill-conditioned batch: few values per channel in a BN), by the
        2x rule on L2 norms (`testing.compare_norm`). That fallback is a loose and noisy
        check: a randomly initialised ResNet-50 amplifies rounding so much that eager
        PyTorch's own fp32 gradients sit 1-3% from the fp64 ones (NCHW and channels_last
        up to 5x apart) and all fp32 runs decorrelate after one SGD step, so on CPU the
        default is fp64, where the fused and reference models agree to about 1e-10."""
        if half is not None:
            return compare(results["candidate"], results["truth"], kind=kind,
                           baseline=results["reference"], compute_dtype=half)
        direct = compare(results["candidate"], results["reference"], kind=kind)
        if direct.ok or exact:
            return direct
        return compare_norm(results["candidate"], results["truth"], results["reference"],
                            kind=kind)

    def check(name, results, kind="output"):
        report.rows.append((name, judge(results, kind)))

    for step in range(1, steps + 1):
        out = {}
        for key, model in models.items():
            model.train()
            inp = x.double() if key == "truth" else x
            out[key] = _step(model, inp, target, None if key == "truth" else half, dev.type,
                             labels[key], step)
        check(f"step {step}: training logits", {k: v[0] for k, v in out.items()})
        check(f"step {step}: loss", {k: v[1] for k, v in out.items()})
        grads = [(name, _missing(name, [v[2] for v in out.values()])
                  or judge({k: v[2][name] for k, v in out.items()}, "grad"))
                 for name in _names(models["reference"].named_parameters(),
                                    [v[2] for v in out.values()])]
        worst_name, worst = _worst(grads)
        report.rows.append((f"step {step}: gradients ({len(grads)}; worst {worst_name})", worst))
        for key, opt in optimizers.items():
            with _running(labels[key], f"step {step}: SGD update"):
                opt.step()
    stats = []
    buffers = {k: dict(m.named_buffers()) for k, m in models.items()}
    for name in _names(models["reference"].named_buffers(), buffers.values()):
        missing = _missing(name, buffers.values())
        if missing is not None:
            stats.append((name, missing))
        elif name.endswith(("running_mean", "running_var")):
            stats.append((name, judge({k: b[name] for k, b in buffers.items()})))
        elif name.endswith("num_batches_tracked"):
            a, b = int(buffers["candidate"][name]), int(buffers["reference"][name])
            stats.append((name, Comparison(float(abs(a - b)), 0.0, "equal", a == b)))
    if stats:
        worst_name, worst = _worst(stats)
        report.rows.append((f"running stats ({len(stats)}; worst {worst_name})", worst))
    with torch.no_grad():
        out = {}
        for key, model in models.items():
            model.eval()
            inp = x.double() if key == "truth" else x
            ctx = (torch.autocast(dev.type, dtype=half) if half is not None and key != "truth"
                   else contextlib.nullcontext())
            with ctx, _running(labels[key], "eval forward"):
                out[key] = model(inp)
    scale = out["reference"].abs().max().item()
    if half is None and scale > EXPLODED_LOGITS:
        report.warnings.append(
            f"the eval logits reach {scale:.1e}: at this input the model's eval activations "
            "explode (random weights, running statistics of a few small batches), and an "
            "element-wise bound on such values is decided by rounding, so they are judged "
            "relative to their largest value; use a larger --batch-size / --image-size, more "
            "--steps or --weights for a meaningful eval comparison")
        report.rows.append(("eval logits", _relative_to_max(out["candidate"],
                                                            out["reference"])))
    else:
        check("eval logits", out)
    return report


# Eval logits above this (fp32 / fp64 runs) are judged relative to their largest value: a
# random ResNet-152 at the CPU default input reaches 1e15, where fp64 rounding amplified by
# 150 layers moves single logits far beyond an element-wise 1e-4 (relative 1e-9 of the max).
EXPLODED_LOGITS = 1e6


def _relative_to_max(actual, expected) -> Comparison:
    """max |actual - expected| <= 1e-4 x max |expected| (the output tolerance, relative to
    the tensor's largest value rather than to each element)."""
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    tol = TOLERANCES["output"]
    return Comparison(err, err / scale, f"<= {tol:g} x max |expected|", err <= tol * scale)


def _names(reference_items, results) -> list[str]:
    """The reference model's names (parameters or buffers) that some model's results hold
    (a parameter frozen in every model has no gradient to compare), in its order, then any
    name only other models' results hold (a candidate with a tensor the reference lacks)."""
    results = list(results)
    held = {n for r in results for n in r}
    names = [name for name, _ in reference_items if name in held]
    return names + sorted(held - set(names))


def _missing(name: str, results) -> Optional[Comparison]:
    """A failing row where some model's results lack `name` (a parameter that got no
    gradient, a buffer missing) while others have it; None where all or none have it."""
    present = [name in r for r in results]
    if all(present) or not any(present):
        return None
    return Comparison(math.inf, math.inf, "present in every model", False)
