"""The conv kernels' autotuning (fwd, dgrad, wgrad): the candidate tile configs, the tuning
key (shape and loop / epilogue variant) and the timing windows the autotuner measures each
candidate over (`autotune_conv`)."""

import warnings

import triton

from fused_resnet.triton.config import triton_version

# The autotuner's candidates (fwd, dgrad, wgrad). 128x128 with 4 warps holds a 128-register
# fp32 accumulator per thread: ptxas spills it in 80 of 188 bf16 / fp16 builds of the ResNet
# family for sm_90 (up to 544 B of stack; 65 of 94 in fp32), with 8 warps in none (3 of 94 in
# fp32): `python -m fused_resnet compile`. Which one is faster needs the GPU: both stay.
# K loop cost, sm_90 bf16 SASS, a warp's instructions per step (plain 1x1 / 3x3 / with the
# prologue) against the step's wgmma cycles: 128x128x32 w8 88 / 131 / 164-236 for 256 (8
# warps: 2 issue cycles an instruction), 128x256x64 w8 143 / 204 / 283-431 for 1024 (README).
# Every tile here keeps a wgmma group in flight in every conv loop but the Gram's wgrad
# (Triton 3.6 and 3.8). Until the K loops ran max(n, 1) steps (`conv.k_steps`) most tiles of
# the loops that transform their operand (prologue, BN backward) had ptxas serialize their
# wgmma (C7515: "non wgmma instructions defining accumulator registers"), which tile did
# depending on the Triton version (tables in benchmarks/results/NVIDIA_H200-2026-12-04/
# NOTES.md). 128x128x64 w4 (spilling 104-432 B with the forward's prologue in 3.6) is left
# out until a GPU says.
# BLOCK_K 64 needs 96 / 144 KiB of shared memory in bf16 / fp16 (the autotuner skips what
# does not fit).
FWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (128, 128, 32, 4, 3), (128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
        (64, 64, 32, 4, 4), (32, 64, 32, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
    ]
]
# One tuned config per shape and per loop / epilogue variant: a K loop that transforms its
# operand on load (PROLOGUE, BN_BWD) issues 1.5-3x the instructions of the plain one
# (above), so its best tile may differ from the plain loop's of the same shape (a
# bottleneck's conv3 and its projection: both 1x1 64 -> 256 over the same pixels). Each
# kernel adds its variant flags (`autotune_conv`).
CONV_TUNING_KEY = ["M", "C_in", "C_out", "KH", "KW", "DIL", "stride"]

# Each candidate config is timed over this many ms (Triton's defaults: 25 warm-up, 100 timed):
# a ResNet-50 training step has ~50 tuning keys x 6 candidates (8 since), so the first step
# tuned for over a minute with the defaults on an H200; kernels of 0.05-2 ms still get 12-500
# timed runs.
AUTOTUNE_WARMUP_MS, AUTOTUNE_REP_MS = 5, 25


def _bench_candidate(kernel_call, quantiles):
    """triton.testing.do_bench with the windows above (it finds the GPU when called)."""
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=AUTOTUNE_WARMUP_MS,
                                   rep=AUTOTUNE_REP_MS, quantiles=quantiles)


def _lazy_bench_arguments() -> dict:
    """triton.autotune's timing arguments. They must not ask the GPU driver for anything when
    the decorator runs (that raises "0 active drivers" without a GPU, and `import
    fused_resnet` failed there on 3.2 / 3.3, torch 2.6 / 2.7): 3.3+ take a do_bench callable,
    called only when tuning; 3.1 and 3.2 (where do_bench is accepted but not passed on) take
    warm-up / rep in ms, 3.2 with a DeprecationWarning that `autotune_conv` silences."""
    if triton_version() < (3, 3):
        return {"warmup": AUTOTUNE_WARMUP_MS, "rep": AUTOTUNE_REP_MS}
    return {"do_bench": _bench_candidate}


def autotune_conv(*variant_flags: str, reset_to_zero: tuple[str, ...] = ()):
    """Every conv kernel (fwd, dgrad, wgrad) is tuned over FWD_CONFIGS per shape
    (CONV_TUNING_KEY) and per value of its `variant_flags` (constexpr arguments).
    `reset_to_zero`: outputs the kernel adds into (atomics), zeroed by the autotuner before
    each timed candidate and after the last, so the launch that tuned adds into zeros."""
    def decorate(fn):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.2's warmup / rep
            return triton.autotune(configs=FWD_CONFIGS, key=[*CONV_TUNING_KEY, *variant_flags],
                                   reset_to_zero=list(reset_to_zero) or None,
                                   **_lazy_bench_arguments())(fn)
    return decorate
