"""Command line: python -m fused_resnet {flops,validate,bench,train,compile,traffic} [--help]."""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Optional

from fused_resnet.backend import BACKENDS
from fused_resnet.flags import check_at_least
from fused_resnet.models import ARCH_HELP, IMAGENET_ARCHS, build_model, is_cifar
from fused_resnet.table import format_table

DEFAULT_VARIANT = "v1.5"
# Compute capabilities `compile` builds for: those of aot.SHARED_LIMIT (its launch check needs
# each one's shared memory), kept here so that a bad --arch fails before Triton is imported.
COMPILE_ARCHS = (80, 86, 87, 89, 90, 100, 120)


def check_device(value: Optional[str]) -> None:
    """--device: cpu or cuda[:N], and a CUDA device only where one is available."""
    if value is None:
        return
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device must be cpu or cuda (cuda:N), got {value!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda (cuda:N), got {value!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {value}: no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {value}: there are {torch.cuda.device_count()} CUDA "
                             f"devices (cuda:0 to cuda:{torch.cuda.device_count() - 1})")


def has_bottlenecks(arch: str) -> bool:
    """Whether `arch` is built of bottleneck blocks (ImageNet nets of depth 50 and more), the
    only blocks `--variant` changes."""
    match = re.fullmatch(r"(?:wide_)?res(?:net|next)(\d+)(?:_\w+)?|plain(\d+)", arch)
    return match is not None and int(match.group(1) or match.group(2)) >= 50


def resolve_variant(arch: str, variant: Optional[str]) -> str:
    """--variant where given (an error for an arch without bottlenecks), else v1.5."""
    if variant is None:
        return DEFAULT_VARIANT
    if not has_bottlenecks(arch):
        raise ValueError(f"--variant places the stride of a bottleneck block; {arch} has none "
                         "(drop --variant)")
    return variant


def _model_kwargs(arch: str, variant: str) -> dict:
    return {} if is_cifar(arch) else {"variant": variant}


def cmd_flops(args: argparse.Namespace) -> int:
    from fused_resnet.flops import PAPER_GMACS, TORCHVISION_GMACS, count_flops

    check_at_least(args, "batch_size")
    check_at_least(args, "image_size")
    if args.all:
        given = [name for name, value in (("--arch", args.arch), ("--variant", args.variant),
                                          ("--layers", args.layers or None))
                 if value is not None]
        if given:
            raise ValueError(f"--all prints every ImageNet arch in both variants, per model; "
                             f"it does not combine with {', '.join(given)}")
    arch = args.arch or "resnet50"
    variant = resolve_variant(arch, args.variant)
    size = args.image_size if args.image_size is not None else 32 if is_cifar(arch) else 224
    shape = (args.batch_size, 3, size, size)
    if args.all:
        rows = []
        for arch in IMAGENET_ARCHS:
            v1 = count_flops(build_model(arch, variant="v1"), shape)
            v15 = count_flops(build_model(arch, variant="v1.5"), shape, training=False)
            rows.append((arch, f"{v1.params / 1e6:.2f}", f"{v1.macs / 1e9:.2f}",
                         PAPER_GMACS.get(arch, "-"), f"{v15.macs / 1e9:.2f}",
                         TORCHVISION_GMACS[arch], f"{v1.activation_bytes / 2**20:.1f}"))
        print(f"ImageNet family at {shape} (GMACs = 10^9 multiply-adds; activations: bytes "
              "kept for backward by one fp32 training step, v1)\n")
        print(format_table(("arch", "params (M)", "GMACs v1", "paper v1", "GMACs v1.5",
                            "torchvision v1.5", "train activations (MiB)"), rows))
        return 0
    try:
        report = count_flops(build_model(arch, **_model_kwargs(arch, variant)), shape)
    except ValueError as exc:
        if "value per channel" not in str(exc):
            raise
        raise ValueError(f"--image-size {size} at --batch-size {args.batch_size}: the "
                         "training pass whose saved activations flops counts leaves one value "
                         "per channel at a BN; pass --batch-size 2 or a larger --image-size"
                         ) from None
    title = arch if is_cifar(arch) else f"{arch} ({variant})"
    print(f"{title} at input {shape}\n")
    if args.layers:
        print(format_table(
            ("layer", "kind", "output", "MMACs", "params", "elementwise", "act. KiB"),
            [(r.name, r.kind, "x".join(map(str, r.output_shape)), f"{r.macs / 1e6:.2f}",
              r.params, r.elementwise, f"{r.activation_bytes / 1024:.1f}")
             for r in report.rows]))
        print()
    stages = report.by_stage()
    print(format_table(
        ("stage", "GMACs", "params (M)", "elementwise (M)", "train activations (MiB)"),
        [(s, f"{v['macs'] / 1e9:.3f}", f"{v['params'] / 1e6:.3f}",
          f"{v['elementwise'] / 1e6:.2f}", f"{v['activation_bytes'] / 2**20:.2f}")
         for s, v in stages.items()]
        + [("total", f"{report.macs / 1e9:.3f}", f"{report.params / 1e6:.3f}",
            f"{report.elementwise / 1e6:.2f}", f"{report.activation_bytes / 2**20:.2f}")]))
    return 0


# validate's exit status (VALIDATE_EPILOG); every command's argument errors exit
# EXIT_USAGE, argparse's own too
EXIT_PASSED, EXIT_FAILED, EXIT_USAGE, EXIT_RAISED = 0, 1, 2, 3
VALIDATE_EPILOG = """exit status:
  0  PASSED: every check within its tolerance
  1  FAILED: some check outside its tolerance (the table marks it FAIL)
  2  bad arguments, or a --backend that does not implement the model: one error line
  3  a model raised while it ran (a kernel error, ...): its traceback, then an error line
     naming the model (the candidate or the reference) and the phase (step N: training
     forward / backward / SGD update, or eval forward)"""


def cmd_validate(args: argparse.Namespace) -> int:
    import traceback

    from fused_resnet.validate import ModelRunError, check_model_flags, validate

    for name in ("steps", "batch_size", "image_size"):
        check_at_least(args, name)
    variant = resolve_variant(args.arch, args.variant)
    check_model_flags(args.arch, args.weights, args.shortcut)
    try:
        report = validate(args.arch, args.backend, args.dtype, args.steps,
                          batch_size=args.batch_size, image_size=args.image_size,
                          device=args.device, variant=variant, weights=args.weights,
                          seed=args.seed, shortcut=args.shortcut)
    except ModelRunError as exc:
        cause = exc.__cause__
        traceback.print_exception(type(cause), cause, cause.__traceback__, file=sys.stderr)
        print(f"\npython -m fused_resnet validate: error: {exc} (traceback above)",
              file=sys.stderr)
        return EXIT_RAISED
    shortcut = f", shortcut {args.shortcut}" if args.shortcut else ""
    print(f"validate {report.arch}{shortcut} on backend {report.resolved} ({report.dtype}, "
          f"{report.device}, input {report.input_shape}, seed {args.seed}) against "
          f"{report.reference}\n")
    for warning in report.warnings:
        print(f"warning: {warning}\n")
    print(format_table(("check", "max abs err", "max rel err", "bound", "result"),
                       [(name, f"{c.max_abs:.3e}", f"{c.max_rel:.3e}", c.bound,
                         "pass" if c.ok else "FAIL") for name, c in report.rows]))
    note = " (see the warning above)" if report.warnings and not report.ok else ""
    print(f"\n{'PASSED' if report.ok else 'FAILED'}: {sum(c.ok for _, c in report.rows)} of "
          f"{len(report.rows)} checks within tolerance{note}")
    if report.ok and args.bench and report.device.startswith("cuda") and report.dtype != "fp64":
        from fused_resnet.bench.cli import short_benchmark

        print("\n" + short_benchmark(args.arch, variant, args.backend, report.dtype,
                                     args.device))
    return EXIT_PASSED if report.ok else EXIT_FAILED


def cmd_compile(args: argparse.Namespace) -> int:
    from fused_resnet.compile_check import (
        BUILD_FIELDS,
        SUMMARY_HEADER,
        WORKLOADS,
        check,
        serialized_variants,
        summary_rows,
        write_csv,
    )

    if args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
    unknown = [w for w in args.workload if w not in WORKLOADS]
    if unknown:
        raise ValueError(f"--workload must be among {sorted(WORKLOADS)}, got {unknown}")
    bad = [a for a in args.arch if a not in COMPILE_ARCHS]
    if bad:
        raise ValueError(f"--arch takes compute capabilities among "
                         f"{', '.join(map(str, COMPILE_ARCHS))} (80: A100, 90: H100 / H200, "
                         f"...), got {', '.join(map(str, bad))}")
    if args.out:
        from fused_resnet.bench.cli import check_writable_file

        check_writable_file(args.out, "--out")
    reports = []
    for arch in args.arch:
        report = check(args.workload, args.dtype, arch, args.jobs,
                       progress=lambda what: print(f"{what} ...", flush=True))
        reports.append(report)
        print(f"\nsm_{arch}: {len(report)} kernel builds for {', '.join(args.workload)} "
              f"in {', '.join(args.dtype)}\n")
        print(format_table(SUMMARY_HEADER, summary_rows(report)))
        if args.all:
            print()
            print(format_table(BUILD_FIELDS[1:], [[getattr(b, k) for k in BUILD_FIELDS[1:]]
                                                  for b in report]))
        serialized = serialized_variants(report)
        if serialized:
            print(f"\n{len(serialized)} kernel variants whose every autotuner candidate waits "
                  "for each K step's wgmma (none in flight):")
            for name, dtype, variant, count in serialized:
                print(f"  {name} {dtype} [{variant}]: {count} candidates")
        skipped = report.skipped()
        if skipped:
            print(f"\n{len(skipped)} autotuner candidates need more shared memory than sm_{arch} "
                  "has; the autotuner skips them (--all lists them)")
        for problem in report.problems():
            print(f"PROBLEM sm_{arch}: {problem}")
    if args.out:
        write_csv(args.out, reports)
        print(f"\nwrote {args.out}")
    failed = sum(len(r.problems()) for r in reports)
    print(f"\n{'FAILED' if failed else 'PASSED'}: {failed} kernel builds cannot launch")
    return 1 if failed else 0


VARIANT_HELP = ("bottleneck stride on the 3x3 (v1.5, torchvision; the default) or first 1x1 (v1, "
                "paper); for nets with bottleneck blocks (ResNet-50 and deeper)")


def _common(p: argparse.ArgumentParser, arch: str = "resnet50",
            image_size_help: str = "input height = width (default 224; 32 for CIFAR nets; "
                                   "64 on CPU)",
            batch_help: str = "batch size (default 32 on a GPU, 4 on CPU)") -> None:
    p.add_argument("--arch", default=arch, help=f"model name: {ARCH_HELP} (default {arch})")
    p.add_argument("--variant", default=None, choices=("v1", "v1.5"), help=VARIANT_HELP)
    p.add_argument("--batch-size", type=int, default=None, help=batch_help)
    p.add_argument("--image-size", type=int, default=None, help=image_size_help)


def _runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="backend of the model")
    p.add_argument("--dtype", default=None, choices=("fp32", "fp64", "bf16", "fp16"),
                   help="fp32 / fp64, or autocast to bf16/fp16 (default fp32 on a GPU, fp64 on "
                        "CPU, where fp32 rounding of a random ResNet is too chaotic to judge)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fused_resnet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("flops", help="MACs, parameters and activation memory per stage")
    # counted, not run: the size does not depend on the device (cmd_flops)
    _common(p, image_size_help="input height = width (default 224; 32 for CIFAR nets)",
            batch_help="batch size (default 1; MACs and activation bytes are the whole "
                       "batch's)")
    p.add_argument("--all", action="store_true",
                   help="the whole ImageNet family beside the paper's and torchvision's figures")
    p.add_argument("--layers", action="store_true", help="also print every layer's row")
    # arch and variant None: --all can tell them given (cmd_flops: resnet50, v1.5)
    p.set_defaults(func=cmd_flops, batch_size=1, arch=None)

    p = sub.add_parser("validate", help="compare a model on a backend with the reference",
                       epilog=VALIDATE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    _runtime(p)
    p.add_argument("--steps", type=int, default=2, help="SGD steps compared (default 2)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random weights, the input batch and its labels (default 0)")
    p.add_argument("--shortcut", default=None, choices=("A", "B", "C"),
                   help="the paper's shortcut option: A (identity, zero-padded channels), B "
                        "(projection where the shape changes), C (projection everywhere); "
                        "default A for CIFAR nets, B for ImageNet nets; not for plain nets. "
                        "Other than B the reference is this package's reference backend")
    p.add_argument("--weights", default=None,
                   help="torchvision's pretrained weights for both models (ImageNet archs: "
                        "DEFAULT, IMAGENET1K_V1, ...; downloaded once into torch.hub's cache); "
                        "default: random initialisation")
    p.add_argument("--no-bench", dest="bench", action="store_false",
                   help="skip the short benchmark that follows a passing run on a GPU")
    p.set_defaults(func=cmd_validate)

    from fused_resnet.bench.cli import __doc__ as bench_doc
    from fused_resnet.bench.cli import add_bench_arguments, cmd_bench

    p = sub.add_parser("bench", help="fused vs eager vs torch.compile: training step, "
                       "throughput, latency, memory; per-block breakdown; family table",
                       description=bench_doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50", help=f"model name: {ARCH_HELP} (default resnet50)")
    p.add_argument("--variant", default=None, choices=("v1", "v1.5"), help=VARIANT_HELP)
    p.add_argument("--image-size", type=int, default=None,
                   help="input height = width (default 224 on GPU, 64 on CPU; 32 for CIFAR nets)")
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    from fused_resnet.train.cli import __doc__ as train_doc
    from fused_resnet.train.cli import add_train_arguments, cmd_train

    p = sub.add_parser("train", help="train a model (synthetic or ImageFolder data, AMP, DDP, "
                       "checkpoints); --compare: plain vs residual nets",
                       description=train_doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    from fused_resnet.compile_check import __doc__ as compile_doc

    p = sub.add_parser("compile", help="compile every Triton kernel a model launches for a GPU "
                       "architecture, without a GPU; report shared memory, registers, spills",
                       description=compile_doc,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=[90],
                   help=f"compute capabilities among {', '.join(map(str, COMPILE_ARCHS))}, "
                        "e.g. 80 90 (default 90: H100 / H200)")
    p.add_argument("--dtype", nargs="+", default=["bf16"], choices=("fp32", "bf16", "fp16"),
                   help="fp32 (TF32 tl.dot) or autocast to bf16 / fp16 (default bf16)")
    p.add_argument("--workload", nargs="+", default=["resnet50"],
                   help="resnet50, resnet18, cifar_resnet20 or blocks (default resnet50)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="compiler processes (default: one per CPU)")
    p.add_argument("--all", action="store_true", help="also print every build")
    p.add_argument("--out", default=None, help="write every build to this CSV file")
    p.set_defaults(func=cmd_compile)

    from fused_resnet.traffic import TRAFFIC_ARCH_HELP, cmd_traffic
    from fused_resnet.traffic import __doc__ as traffic_doc

    p = sub.add_parser("traffic", help="FLOPs and memory traffic of a fused Triton step, "
                       "counted without a GPU, and its roofline floor on a GPU",
                       description=traffic_doc,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50",
                   help=f"model name: {TRAFFIC_ARCH_HELP} (grouped convolutions, as "
                        "ResNeXt's, have no Triton kernel)")
    p.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"),
                   help="autocast dtype, or fp32 (TF32 peak) (default bf16)")
    p.add_argument("--batch", type=int, default=256, help="images (default 256)")
    p.add_argument("--mode", default="train", choices=("train", "infer"),
                   help="a training step (forward + backward) or inference (default train)")
    p.add_argument("--operands", default=None, choices=("on_load", "written"),
                   help="the training chain's operand mode (default on_load; --mode train only)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input height = width (default 224; 32 for CIFAR nets)")
    p.add_argument("--gpu", default="H100", help="whose peaks make the roofline (default H100)")
    p.add_argument("--rows", type=int, default=30,
                   help="rows printed, most costly first (default 30)")
    p.set_defaults(func=cmd_traffic)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_device(getattr(args, "device", None))
        if args.command == "bench" and not args.flops_table:  # the table's archs are many
            args.variant = resolve_variant(args.arch, args.variant)
        return args.func(args)
    except (ValueError, NotImplementedError, RuntimeError) as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
