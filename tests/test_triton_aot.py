"""Ahead-of-time compiles of the Triton kernels for Ampere / Hopper, on a machine without a GPU.

`fused_resnet.triton.aot.compile_only` needs Triton imported without TRITON_INTERPRET (which
this test session sets when there is no GPU), so each check runs in a child process.
"""

import csv
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest

pytest.importorskip("triton")
from fused_resnet.triton import aot, config  # noqa: E402

if config.triton_version() < aot.MIN_TRITON:
    pytest.skip("compile_only needs Triton>={}.{}".format(*aot.MIN_TRITON),
                allow_module_level=True)


def _child_env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def _run(code: str, timeout: int = 600) -> dict:
    """Runs `code` from a file (where @triton.jit reads its source) in a fresh interpreter;
    it prints one JSON object last."""
    with tempfile.TemporaryDirectory() as folder:
        script = os.path.join(folder, "aot_check.py")
        with open(script, "w") as f:
            f.write(textwrap.dedent(code))
        proc = subprocess.run([sys.executable, script], env=_child_env(), capture_output=True,
                              text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_autotuned_conv_compiles_every_config_and_the_pinned_one():
    out = _run("""
        import json, torch
        from fused_resnet.triton import autotune, conv, config
        from fused_resnet.triton.aot import compile_only
        from fused_resnet.backend import unavailable_reason
        x = torch.randn(2, 64, 8, 8, dtype=torch.bfloat16)
        w = torch.randn(64, 64, 3, 3, dtype=torch.bfloat16)
        result = {}
        for arch in (80, 90):
            with compile_only(arch) as builds:
                inside = unavailable_reason("triton", torch.device("cpu"))
                conv.conv_fwd(x, w, stride=1, padding=1, stats=True)
            result[arch] = [dict(tile=b.tile, variant=b.variant, shared=b.shared,
                                 registers=b.registers, problems=b.problems()) for b in builds]
        result["inside"] = inside
        result["after"] = unavailable_reason("triton", torch.device("cpu"))
        result["configs"] = len(autotune.FWD_CONFIGS)
        print(json.dumps(result))
    """)
    assert out["inside"] is None and "TRITON_INTERPRET" in out["after"]
    for arch in ("80", "90"):
        builds = out[arch]
        assert len(builds) == out["configs"] + 1  # every autotuner config, and PINNED
        assert "64x64x32 w4 s2" in {b["tile"] for b in builds}  # PINNED
        for b in builds:
            assert b["variant"].startswith("KH=3 KW=3") and "STATS" in b["variant"]
            assert b["shared"] > 0 and b["problems"] == []
            assert b["registers"] is None or 0 < b["registers"] <= 255


def test_a_launch_with_the_real_tensors_finds_the_recorded_kernels_in_the_cache(tmp_path):
    # What the recording keeps of an argument (dtype, alignment, integer classes) must give
    # Triton's own cache key: then a GPU run after `compile` compiles nothing. Here the "real"
    # launch is the JIT's own path with the tensors themselves, stopped before the launch.
    out = _run(f"""
        import glob, json, os, torch, triton
        os.environ["TRITON_CACHE_DIR"] = {str(tmp_path)!r}
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction
        from fused_resnet.triton import aot, autotune, conv, eltwise
        count = lambda: len(glob.glob({str(tmp_path)!r} + "/*/*.cubin"))
        buf = torch.randn(2 * 7 * 7 * 24 + 1, dtype=torch.float16)
        x = buf[1:].view(2, 7, 7, 24).permute(0, 3, 1, 2)  # channels_last, 2 B off 16
        w = torch.randn(40, 24, 1, 1, dtype=torch.float16)
        scale, shift = torch.randn(24), torch.randn(24)
        def calls():
            conv.conv_fwd(x, w, stride=2, padding=0, in_scale=scale, in_shift=shift,
                          in_relu=True, stats=True)
            eltwise.bn_act_fwd(x, scale, shift, relu=True)
        with aot.compile_only(90, workers=2) as builds:
            calls()
        recorded = count()
        triton.runtime.driver.set_active(aot._StandInDriver(90))
        jit_run = JITFunction.run
        JITFunction.run = lambda self, *a, grid, warmup, **k: jit_run(
            self, *a, grid=grid, warmup=True, **k)
        Autotuner.run = lambda self, *a, grid, warmup=False, **k: self.warmup(*a, grid=grid, **k)
        calls()
        print(json.dumps(dict(builds=len(builds), recorded=recorded, after=count(),
                              configs=len(autotune.FWD_CONFIGS), unaligned=x.data_ptr() % 16)))
    """)
    assert out["unaligned"] != 0
    assert out["recorded"] == out["builds"] >= out["configs"] + 2  # + PINNED + bn_act_fwd
    assert out["after"] == out["recorded"]  # the real path compiled nothing new


def test_shared_memory_over_the_architecture_limit_is_a_problem():
    # 128x256x128 tiles, 3 stages of bf16 A and B: (128*128 + 128*256) * 2 B * 3 = 288 KiB,
    # over sm_90's 227 KiB and sm_80's 163 KiB; the launch would raise OutOfResources.
    out = _run("""
        import json, torch
        from fused_resnet.triton import conv, config
        from fused_resnet.triton.aot import compile_only
        config.pin_config(config.TileConfig(128, 256, 128, num_warps=8, num_stages=3))
        x = torch.randn(2, 128, 8, 8, dtype=torch.bfloat16)
        w = torch.randn(256, 128, 1, 1, dtype=torch.bfloat16)
        with compile_only(90) as builds:
            conv.conv_fwd(x, w, stride=1, padding=0)
        print(json.dumps(dict(problems=builds.problems(), shared=[b.shared for b in builds])))
    """)
    assert len(out["shared"]) == 1 and out["shared"][0] > 232448
    assert len(out["problems"]) == 1 and "shared memory, sm_90 allows 232448" in out["problems"][0]


def test_an_autotuner_candidate_over_the_limit_is_skipped_not_a_problem():
    # Triton's autotuner skips a config whose launch raises OutOfResources, so only the
    # pinned config (what deterministic mode launches) must fit. 128x256x128 fp16 tiles in 4
    # stages need (128*128 + 128*256) * 2 B * 4 = 384 KiB, over sm_90's 227 KiB.
    out = _run("""
        import json, torch, triton, triton.language as tl
        from fused_resnet.triton.aot import compile_only

        @triton.autotune(configs=[
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128}, num_warps=8,
                          num_stages=4),
            triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4,
                          num_stages=2)], key=["K"])
        @triton.jit
        def matmul(a_ptr, b_ptr, c_ptr, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
            m = tl.arange(0, BLOCK_M)
            n = tl.arange(0, BLOCK_N)
            k = tl.arange(0, BLOCK_K)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                a = tl.load(a_ptr + m[:, None] * K + k0 + k[None, :])
                b = tl.load(b_ptr + (k0 + k[:, None]) * 256 + n[None, :])
                acc = tl.dot(a, b, acc)
            tl.store(c_ptr + m[:, None] * 256 + n[None, :], acc.to(tl.float16))

        a = torch.randn(128, 512, dtype=torch.float16)
        b = torch.randn(512, 256, dtype=torch.float16)
        c = torch.empty(128, 256, dtype=torch.float16)
        with compile_only(90, workers=2) as builds:
            matmul[(1,)](a, b, c, 512)
        print(json.dumps(dict(problems=builds.problems(),
                              skipped=[b.tile for b in builds.skipped()],
                              fits=sorted(b.tile for b in builds if not b.over_shared_limit))))
    """)
    assert out["problems"] == []
    assert out["skipped"] == ["128x256x128 w8 s4"]
    assert out["fits"] == ["32x32x32 w4 s2", "64x64x32 w4 s2"]  # the small one and PINNED


def test_a_kernel_only_the_compiler_rejects_is_reported_not_raised():
    # A 2-D load of a non-power-of-2 block: the interpreter runs it, the compiler refuses.
    out = _run("""
        import json, torch, triton, triton.language as tl
        from fused_resnet.triton.aot import compile_only

        @triton.jit
        def bad(x_ptr, BLOCK: tl.constexpr):
            tl.store(x_ptr + tl.arange(0, BLOCK), 1.0)

        x = torch.zeros(24)
        with compile_only(90) as builds:
            got = bad[(1,)](x, BLOCK=24)
        print(json.dumps(dict(problems=builds.problems(), got=got is None)))
    """)
    assert out["got"] and len(out["problems"]) == 1
    problem = out["problems"][0]
    assert problem.startswith("bad [] 24 w4") and "does not compile" in problem


def test_every_kernel_of_every_block_kind_compiles_for_hopper(tmp_path):
    """The CLI on the small block set (the stem, then every block kind) in bf16: training
    forward and backward, chained and single-launch inference; fails if any build does not
    compile or overflows shared memory."""
    path = tmp_path / "builds.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "fused_resnet", "compile", "--arch", "90", "--dtype", "bf16",
         "--workload", "blocks", "--out", str(path)],
        env=_child_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PASSED: 0 kernel builds cannot launch" in proc.stdout
    with open(path) as f:
        rows = list(csv.DictReader(f))
    names = {r["name"] for r in rows}
    assert names == {"_conv_fwd_kernel", "_conv_dgrad_kernel", "_conv_wgrad_kernel",
                     "_bn_merge_kernel", "_bn_bwd_reduce_kernel", "_bn_act_fwd_kernel",
                     "_bn_act_bwd_kernel", "_bn_bwd_coefficients_kernel",
                     "_last_bn_coefficients_kernel", "_bottleneck_eval_kernel",
                     "_max_pool_fwd_kernel", "_max_pool_bwd_kernel"}
    assert all(r["error"] == "" and r["arch"] == "90" for r in rows)
    # No conv build calls a subroutine (a 64-bit integer division: int32 pixel indices, and
    # the weight gradient's pixel walk adds instead of dividing). "" where cuobjdump is absent.
    # cuobjdump gives the registers and the SASS alike: both are there, or neither.
    assert all((r["registers"] == "") == (r["instructions"] == "") for r in rows)
    conv_calls = {r["calls"] for r in rows if r["name"].startswith("_conv_")}
    assert conv_calls in ({"0"}, {""}), conv_calls
    assert all(r["instructions"] == "" or int(r["instructions"]) > 10 for r in rows)
    # sm_90 convs use wgmma but at the 32x64 tile (mma.sync: ""); some keep a group in flight
    # (the plain weight gradient's at 128x128x32 w4, among others); no elementwise kernel has
    # wgmma.
    if rows[0]["instructions"]:
        conv = [r["wgmma_in_flight"] for r in rows if r["name"].startswith("_conv_")
                and not r["tile"].startswith("32x64x")]
        assert "" not in conv and any(int(n) >= 1 for n in conv)
        assert {r["wgmma_in_flight"] for r in rows if r["name"].startswith("_bn_")} == {""}
        # Every conv build keeps a group in flight but the Gram's weight gradient (both
        # operands transformed: its B tile is stored to shared memory each step) and loops
        # of one K step (`one_k_step`: nothing to overlap). Before, most waited: the
        # prologue's and BN backward's loops, where a K loop that might run zero times had
        # ptxas serialize them (`conv.k_steps`), and the stem's, whose gathered 3-channel x
        # tile went through shared memory (GATHER_IN_REGS).
        waiting = {(r["name"], r["variant"]) for r in rows if r["name"].startswith("_conv_")
                   and r["wgmma_in_flight"] == "0" and not _one_k_step(r)}
        assert all(n == "_conv_wgrad_kernel" and {"PROLOGUE", "ACT"} <= set(v.split())
                   for n, v in waiting), sorted(waiting)
        stem = [r for r in rows if "GATHER_IN_REGS" in r["variant"] and r["wgmma_in_flight"]]
        assert {r["name"] for r in stem} == {"_conv_fwd_kernel", "_conv_wgrad_kernel"}
    fwd = [r for r in rows if r["name"] == "_conv_fwd_kernel"]
    assert any("PROLOGUE" in r["variant"] for r in fwd)
    assert any("STATS" in r["variant"] for r in fwd)
    assert any("HAS_RES" in r["variant"] and "HAS_BIAS" in r["variant"] for r in fwd)
    pool = {r["variant"].split(" BLOCK_P")[0] for r in rows if "_max_pool" in r["name"]}
    assert {"K=3 S=2 P=1 PROLOGUE WRITE_ARG", "K=3 S=2 P=1 REDUCE",  # the training stem
            "K=3 S=2 P=1 WRITE_DY", "K=3 S=2 P=1"} <= pool, pool


def _one_k_step(row) -> bool:
    """`KernelBuild.one_k_step` of a CSV row of `compile --out`."""
    constants = dict(p.split("=") for p in row["variant"].split() if "=" in p)
    block_k = int(row["tile"].split()[0].split("x")[2])
    flat = int(constants.get("FLAT_K", 0))
    return bool(flat) and int(constants["KH"]) * int(constants["KW"]) * flat <= block_k


def test_compile_rejects_an_unknown_workload():
    proc = subprocess.run([sys.executable, "-m", "fused_resnet", "compile", "--workload", "vgg"],
                          env=_child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--workload must be among" in proc.stderr


def test_sass_lines_give_opcodes_and_calls():
    """The SASS parse behind a build's `instructions` / `calls` (cuobjdump -sass lines, with
    and without a predicate; headers, labels and encodings are not instructions)."""
    from fused_resnet.triton.aot import _SASS_LINE

    sass = """
        Function : _conv_wgrad_kernel
        .headerflags    @"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;              /* 0x00000a00ff017b82 */
                                                                       /* 0x000fe20000000800 */
        /*0010*/              @!P0 BRA 0x390 ;                         /* 0x0000000000288947 */
        /*0020*/                   CALL.REL.NOINC 0x5460 ;             /* 0x0000005000407944 */
        /*0030*/               @P3 CALL.REL.NOINC 0x59a0 ;             /* 0x0000004c00c87944 */
        /*0040*/              @!UP0 HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ; /* 0x61 */
        .L_x_12:
        /*0050*/                   EXIT ;                              /* 0x000000000000794d */
    """
    ops = [m.group(1) for m in _SASS_LINE.finditer(sass)]
    assert ops == ["LDC", "BRA", "CALL.REL.NOINC", "CALL.REL.NOINC",
                   "HGMMA.64x128x16.F32.BF16", "EXIT"]


def test_wgmma_waits_give_the_groups_in_flight():
    """`KernelBuild.wgmma_in_flight` from the SASS: the largest N of the waits
    `WARPGROUP.DEPBAR.LE gsb0, N` (0: every wait drains the MMAs, the loop serialized), None
    without an HGMMA."""
    waits = """
        /*0400*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24, gsb0 ;
        /*0410*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0800*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
    """
    assert aot.wgmma_in_flight(waits) == 1
    assert aot.wgmma_in_flight(waits.replace("0x1", "0x3")) == 3
    assert aot.wgmma_in_flight(waits.replace("0x1", "0x0")) == 0
    assert aot.wgmma_in_flight(waits.replace("HGMMA.64x128x16.F32.BF16", "HMMA.16816.F32")) \
        is None


def test_serialized_variants_are_those_with_no_candidate_in_flight():
    """The compile report lists a kernel variant when every candidate the autotuner can launch
    waits for its wgmma; a candidate over the shared memory (skipped), one without wgmma or
    the pinned build (not a candidate) does not count."""
    from fused_resnet.compile_check import serialized_variants

    def build(variant, tile, in_flight, autotuned=True, shared=1024):
        return aot.KernelBuild("_conv_fwd_kernel", 90, "bfloat16", {"PROLOGUE": variant,
                               "BLOCK_M": tile}, 4, 3, autotuned, shared=shared,
                               wgmma_in_flight=in_flight)

    builds = [build(True, 64, 0), build(True, 128, 0), build(True, 256, 1, shared=10**6),
              build(True, 32, 1, autotuned=False), build(True, 16, None),  # mma.sync
              build(False, 64, 0), build(False, 128, 1)]
    assert serialized_variants(builds) == [("_conv_fwd_kernel", "bfloat16", "PROLOGUE", 2)]
    assert serialized_variants([build(True, 64, None)]) == []  # no wgmma: not serialized


def test_a_loop_of_one_k_step_is_not_counted_as_serialized():
    """A forward over flattened K (FLAT_K = C_in) whose whole K fits one BLOCK_K has one group
    of MMAs and nothing to overlap: neither the report nor its summary counts its wait."""
    from fused_resnet.compile_check import serialized_variants, summary_rows

    def build(kh, flat, block_k, in_flight=0):
        return aot.KernelBuild("_conv_fwd_kernel", 90, "bfloat16",
                               {"KH": kh, "KW": kh, "FLAT_K": flat, "BLOCK_K": block_k},
                               4, 3, True, wgmma_in_flight=in_flight)

    assert build(1, 16, 32).one_k_step and build(1, 16, 16).one_k_step
    assert build(1, 32, 64).one_k_step and build(3, 3, 32).one_k_step  # 27 <= 32
    assert not build(3, 16, 32).one_k_step  # 144: 5 steps
    assert not build(1, 0, 32).one_k_step  # not flattened: C_in is not a constexpr
    assert not build(7, 3, 64).one_k_step  # the stem: 147
    assert serialized_variants([build(1, 16, 32), build(1, 16, 64)]) == []
    assert serialized_variants([build(3, 16, 32), build(3, 16, 64)]) == [
        ("_conv_fwd_kernel", "bfloat16", "KH=3 KW=3 FLAT_K=16", 2)]
    assert summary_rows([build(1, 16, 32), build(3, 16, 32)])[0][7] == 1
