"""Host time of a fused model's inference call, measured without a GPU.

At batch 1 a ResNet's inference call is host-bound: its GPU work is tens of microseconds a
conv, its Python (modules, BN folds, checks, launch arguments) and Triton's launch about as
much again. This script times that Python on CPU: the Triton kernels are made for the
interpreter (TRITON_INTERPRET=1) and every launch is stubbed where the interpreter would run
the kernel (`InterpretedFunction.run` does nothing), so everything above the kernel runs,
`triton.launch` included; Triton's own argument binder and driver launch, which the
interpreter replaces, are not in the figure. Nor is what would compute on CPU: the input is
made in the compute dtype (no autocast cast), the head's average pool is a view and its fc
an identity. Two settings, timed alternately: the inference plans of the blocks and the stem
(`ops.eval_plan`, the default) and without them (every block through
`ops.residual_block_eval`, the stem through `ops.conv_bias_act` and `ops.max_pool2d`).

    python benchmarks/bench_host.py                          # ResNet-50, bf16, batch 1
    python benchmarks/bench_host.py --arch cifar_resnet20 --image-size 32 --repeat 5
"""

from __future__ import annotations

import argparse
import os
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: interpreted kernels

import torch  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402

import fused_resnet as fr  # noqa: E402
from fused_resnet.models import build_model  # noqa: E402
from fused_resnet.nn import blocks, pool  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--repeat", type=int, default=30, help="timed rounds of 10 calls each")
    args = p.parse_args(argv)

    launches = [0]

    def stub(self, *_args, **_kwargs):  # the launch, without the interpreter's run
        launches[0] += 1

    interpreter.InterpretedFunction.run = stub
    # the head's average pool as a view: the models call F.adaptive_avg_pool2d(x, 1)
    torch.nn.functional.adaptive_avg_pool2d = lambda t, size: t[:, :, :1, :1]
    torch.set_grad_enabled(False)
    model = build_model(args.arch, backend="triton").eval().to(memory_format=torch.channels_last)
    model.fc = torch.nn.Identity()
    dtype = DTYPES[args.dtype]
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, dtype=dtype).to(
        memory_format=torch.channels_last)
    planners = blocks.plan_block_eval, pool.plan_stem_eval

    def call() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            model(x)

    def setting(plans: bool) -> None:
        none = lambda *a, **k: None  # noqa: E731
        blocks.plan_block_eval, pool.plan_stem_eval = planners if plans else (none, none)
        blocks._EVAL_PLANS.clear()
        pool._STEM_PLANS.clear()
        for _ in range(3):  # the first call checks, the second prepares, then the plan runs
            call()

    best = {True: float("inf"), False: float("inf")}
    for _ in range(args.repeat):
        for plans in (True, False):
            setting(plans)
            start = time.perf_counter()
            for _ in range(10):
                call()
            best[plans] = min(best[plans], (time.perf_counter() - start) / 10)
    launches[0] = 0
    call()
    print(f"{args.arch} {args.dtype} batch {args.batch} at {args.image_size}x{args.image_size}, "
          f"fused_resnet {fr.__version__}, torch {torch.__version__}: {launches[0]} launches")
    for plans in (True, False):
        print(f"  {'plans   ' if plans else 'no plans'} {best[plans] * 1e3:.3f} ms a call "
              f"(min of {args.repeat} x 10)")


if __name__ == "__main__":
    main()
