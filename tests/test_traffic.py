"""`python -m fused_resnet traffic`: the FLOPs and bytes of a fused Triton step, its kernels
counted instead of run. Counting needs Triton imported without TRITON_INTERPRET (which this
test session sets when there is no GPU), so the counts come from a child process."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")


def _child(code: str) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_counts_every_conv_flop_and_the_exact_bytes_of_a_launch():
    """CIFAR ResNet-20, batch 2, fp32: inference counts 2 FLOPs per multiply-add of every
    conv (`count_flops`), a training step three times that less the stem's data gradient
    (the image needs none: not launched); the stem's folded conv moves exactly its input,
    weight, bias and output; the ATen ops around the kernels are counted apart."""
    out = _child("""
        import json, torch
        from fused_resnet.flops import count_flops
        from fused_resnet.models import build_model
        from fused_resnet.traffic import step_counts
        result = {}
        for mode in ("infer", "train"):
            counts = step_counts("cifar_resnet20", "fp32", 2, mode)
            result[mode] = {k: v for k, v in counts.items()}
        rows = count_flops(build_model("cifar_resnet20"), (2, 3, 32, 32), training=False).rows
        convs = [r.macs for r in rows if r.kind == "conv"]
        result["conv_macs"], result["stem_macs"] = sum(convs), convs[0]
        print(json.dumps(result))
    """)
    infer, train = out["infer"], out["train"]
    flops = {mode: sum(v[1] for k, v in c.items() if k.startswith("fr::"))
             for mode, c in (("infer", infer), ("train", train))}
    assert flops["infer"] == 2 * out["conv_macs"]
    assert flops["train"] == 3 * 2 * out["conv_macs"] - 2 * out["stem_macs"]
    # the 3x3 convs over fewer than 32 channels (flattened K) without a residual: the stem
    # (3 -> 16 at 32x32), stage 1's three conv1 (16 -> 16) and stage 2's first (16 -> 32,
    # stride 2); each reads x, its BN-folded weight and bias and writes its output, in fp32
    def conv(c_in, c_out, hw_in, hw_out):
        return 4 * (2 * c_in * hw_in + c_out * c_in * 9 + c_out + 2 * c_out * hw_out)

    launches, _, nbytes = infer["fr::conv_fwd 3x3 flat_k"]
    assert launches == 5
    assert nbytes == conv(3, 16, 1024, 1024) + 3 * conv(16, 16, 1024, 1024) \
        + conv(16, 32, 1024, 256)
    assert any(k.startswith("aten::") for k in train)  # the head, the loss's sum
    # no allocation, view or fused op (whose insides are counted) among them
    assert not any(k[6:].startswith(("empty", "detach", "view", "block_", "conv_"))
                   for k in train if k.startswith("aten::"))
    assert {k for k in train if k.startswith("fr::bn_bwd_reduce")}  # training kernels


def test_bytes_of_strided_reads_are_those_read():
    """A strided view of a channels_last tensor (x[:, :, ::2, ::2]) moves its elements' bytes
    where its contiguous runs (a pixel's channels) are a sector long or more, a sector per
    run where shorter, never more than its span; a storage seen through two views counts its
    span once; a 1x1 conv at stride 2 reads the quarter of its input its taps land on, a 3x3
    all of it (`launch_work`)."""
    import torch

    from fused_resnet.triton.launch import launch_work, tensor_spans

    x = torch.empty(2, 64, 8, 8).contiguous(memory_format=torch.channels_last)  # fp32
    assert tensor_spans([x]) == x.numel() * 4
    sub = x[:, :, ::2, ::2]
    assert tensor_spans([sub]) == sub.numel() * 4  # runs of 64 channels: 256 B
    assert tensor_spans([sub, x]) == x.numel() * 4  # two views: the span, once
    thin = torch.empty(2, 4, 8, 8).contiguous(memory_format=torch.channels_last)[:, :, ::2, ::2]
    assert tensor_spans([thin]) == 2 * 4 * 4 * 32  # runs of 16 B: a sector each
    expanded = torch.empty(4, 1).expand(4, 1000)  # stride 0: its span, not 4000 elements
    assert tensor_spans([expanded]) == 16

    class Kernel:  # the argument names of a conv kernel, as launch_work reads them
        arg_names = ["x_ptr", "out_ptr", "H", "W", "C_in", "Ho", "Wo", "C_out", "M",
                     "stride", "KH", "KW"]

    out = torch.empty(2, 32, 4, 4)
    for k, read in ((1, sub.numel() * 4), (3, x.numel() * 4)):
        args = (x, out, 8, 8, 64, 4, 4, 32, 2 * 16, 2)
        flops, nbytes = launch_work(Kernel, args, {"KH": k, "KW": k})
        assert flops == 2 * 32 * 32 * 64 * k * k
        assert nbytes == read + out.numel() * 4


def test_a_launch_around_triton_launch_is_an_error():
    """A kernel launched straight through Triton, not `triton.launch.run`, would be missing
    from the counts (and from a profile's variant table): counting says so."""
    out = _child("""
        import json, torch
        from fused_resnet.traffic import counted_launches
        from fused_resnet.triton.eltwise import _bn_act_fwd_kernel, bn_act_fwd
        y = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
        v = torch.ones(8)
        with counted_launches() as counts:
            bn_act_fwd(y, v, v)
        result = {"through run": {k: c[0] for k, c in counts.items()}}
        try:
            with counted_launches():
                _bn_act_fwd_kernel[(1,)](y, v, v, y, y, v, v, y, 32, 8, HAS_RES=False,
                                         HAS_BN2=False, RELU=True, ACC_FP64=False,
                                         BLOCK_R=4, BLOCK_C=8)
        except RuntimeError as exc:
            result["error"] = str(exc)
        print(json.dumps(result))
    """)
    assert out["through run"] == {"fr::bn_act_fwd": 1}
    assert out["error"] == "1 Triton launches bypassed triton.launch (launch / run): they " \
                           "are not counted"


def test_cli_prints_the_table_and_the_floor():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "fused_resnet", "traffic", *args], env=env,
        capture_output=True, text=True, timeout=600)
    proc = run("--arch", "cifar_resnet20", "--batch", "2", "--mode", "infer", "--rows", "3",
               "--gpu", "H200")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "H200 SXM's 989.4 TFLOP/s and 4.8 TB/s" in out
    assert out.count("| fr::") + out.count("| aten::") == 3 and "more rows: --rows" in out
    assert "\nfloor " in out and "GB Triton" in out
    for args, message in ((("--gpu", "Z80"), "--gpu must name a GPU"),
                          (("--rows", "0"), "--rows must be >= 1"),
                          (("--batch", "0"), "--batch must be >= 1"),
                          (("--image-size", "0"), "--image-size must be >= 1")):
        proc = run("--arch", "cifar_resnet20", *args)
        assert proc.returncode == 2 and message in proc.stderr


def test_counting_refuses_the_interpreter():
    """In this session TRITON_INTERPRET=1 (no GPU): the interpreter would pick its own tiles
    and splits, so counting refuses with the reason."""
    from fused_resnet.traffic import counted_launches
    from fused_resnet.triton.config import interpreting

    if not interpreting():
        pytest.skip("TRITON_INTERPRET is not set here")
    with pytest.raises(RuntimeError, match="needs TRITON_INTERPRET unset"):
        with counted_launches():
            pass


def test_without_triton_the_command_says_so():
    code = ("import sys; sys.modules['triton'] = None; from fused_resnet.__main__ import main; "
            "sys.exit(main(['traffic', '--arch', 'cifar_resnet20', '--batch', '1']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert "error: counting launches needs Triton (pip install triton)" in proc.stderr


def test_gpu_names_match_in_any_case():
    from fused_resnet.bench.hardware import device_peak

    assert device_peak("h200").name == device_peak("NVIDIA H200").name == "H200 SXM"
    assert device_peak("h100 pcie").name == "H100 PCIe"
    assert device_peak("z80") is None
