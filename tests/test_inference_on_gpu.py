"""Inference on a GPU (`gpu` marker), where the CPU tests check it in the interpreter and on
`_C` for CPU.

Plans: what `test_eval_plan.py` and `test_stem_plan.py` check, for a whole ResNet-50 on CUDA
tensors, where the plans launch compiled Triton kernels through prepared launches
(`PreparedLaunch`, whose later calls skip `launch` once the autotuner's config is known) and
cuDNN through `_C`. Calls after the first run the plans of the stem and of all 16 blocks (on
Triton a block plans a channels_last input only: with an NCHW image its calls stay checked);
each input signature (batch 1 and 4: the latency and throughput rows of the benchmark) gives
its own plans; every call equals the first, checked one bit for bit, and that one is within
DESIGN.md's rule of the reference model; a weight written in place is seen by the next
call.

The single-launch bottleneck (`eval_kernel="single"`, `triton/bottleneck_eval.py`: a1 and a2
on chip), which `eval_kernel="auto"` takes where the per-shape table says so: at ResNet-50's
four identity-bottleneck shapes, fp32 / bf16 / fp16, against the reference."""

import copy

import pytest
import torch

from fused_resnet import models, ops
from fused_resnet.nn import FusedBottleneck
from fused_resnet.nn import blocks as block_module
from fused_resnet.nn import pool as pool_module
from fused_resnet.testing import assert_close
from tests._bn import randomize_bn
from tests._calls import count_calls


def _models(backend):
    """(fused ResNet-50 on `backend`, the reference model with its weights, on CUDA, eval),
    BN statistics and affine parameters away from their defaults so that folding them
    matters; 10 classes (the head is not what is tested)."""
    torch.manual_seed(0)
    fused = randomize_bn(models.resnet50(num_classes=10, backend=backend))
    ref = models.resnet50(num_classes=10, backend="reference")
    ref.load_state_dict(fused.state_dict())
    return fused.cuda().eval(), ref.cuda().eval()


def _check_against_reference(out, ref, x, autocast):
    """The precision rule: fp64 reference as the truth, the reference model in the call's
    precision as the baseline (fp32 with TF32 off, or the same bf16 autocast)."""
    with torch.no_grad():
        truth = ref.double()(x.double())
        ref.float()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            baseline = ref(x)
    assert_close(out.float(), truth, baseline=baseline.float(),
                 compute_dtype=torch.bfloat16 if autocast else None, name="logits")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_planned_resnet50_inference_on_cuda(backend, autocast, layout, monkeypatch):
    block_calls = count_calls(monkeypatch, ops, "residual_block_eval")
    stem_calls = count_calls(monkeypatch, ops, "conv_bias_act")
    fused, ref = _models(backend)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    if layout == "channels_last":
        fused, ref = fused.to(memory_format=fmt), ref.to(memory_format=fmt)
    blocks = [m for m in fused.modules() if isinstance(m, block_module.FusedBottleneck)]
    assert len(blocks) == 16
    inputs = [torch.randn(b, 3, 64, 64, device="cuda").contiguous(memory_format=fmt)
              for b in (1, 4)]
    blocks_plan = backend == "cuda" or layout == "channels_last"  # `plan_block_eval`
    unplanned = 0 if blocks_plan else len(blocks)  # checked block calls per model call

    def calls_after(n):  # (block, stem) checked calls expected after n more model calls
        return checked[0] + n * unplanned, checked[1]

    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        firsts = []
        for x in inputs:
            firsts.append(fused(x))
            checked = (len(block_calls), len(stem_calls))
            assert all((b in block_module._EVAL_PLANS) == blocks_plan for b in blocks)
            assert fused.conv1 in pool_module._STEM_PLANS
            for _ in range(3):  # the plan's first call launches through `launch`, then not
                again = fused(x)
                assert torch.equal(again, firsts[-1])
                assert again.stride() == firsts[-1].stride()
            assert (len(block_calls), len(stem_calls)) == calls_after(3)
        checked = (len(block_calls), len(stem_calls))
        for x, first in zip(inputs, firsts):  # each signature kept its plans
            assert torch.equal(fused(x), first)
        assert (len(block_calls), len(stem_calls)) == calls_after(len(inputs))
    for x, first in zip(inputs, firsts):
        _check_against_reference(first, ref, x, autocast)

    with torch.no_grad():  # an optimizer's in-place write: refolded, planned anew
        for model in (fused, ref):
            model.layer3[2].conv2.weight.mul_(1.5)
            model.layer1[0].bn3.running_var.add_(0.5)
    x = inputs[1]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        changed = fused(x)
        assert not torch.equal(changed, firsts[1])
        assert torch.equal(fused(x), changed)
    _check_against_reference(changed, ref, x, autocast)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("channels, width, size", [(256, 64, 56), (512, 128, 28),
                                                   (1024, 256, 14), (2048, 512, 7)],
                         ids=["layer1", "layer2", "layer3", "layer4"])
def test_single_launch_eval_bottleneck_on_cuda(channels, width, size, dtype, monkeypatch):
    calls = []
    real = ops.bottleneck_eval
    monkeypatch.setattr(ops, "bottleneck_eval", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    fused = randomize_bn(FusedBottleneck(channels, width, 1, backend="triton",
                                         eval_kernel="single"))
    ref = FusedBottleneck(channels, width, 1, backend="reference")
    ref.load_state_dict(fused.state_dict())
    cl = torch.channels_last
    fused = fused.cuda().eval().to(dtype=dtype, memory_format=cl)
    ref = ref.cuda().eval().to(memory_format=cl)
    eager = copy.deepcopy(ref).to(dtype)  # the baseline: the reference in this dtype
    truth = ref.double()
    for batch in (1, 8):
        x = torch.randn(batch, channels, size, size, device="cuda").contiguous(memory_format=cl)
        with torch.no_grad():
            expected, baseline = truth(x.double()), eager(x.to(dtype))
            out = fused(x.to(dtype))
        assert out.dtype == dtype and out.is_contiguous(memory_format=cl)
        assert_close(out.float(), expected, baseline=baseline.float(), compute_dtype=dtype,
                     name=f"batch {batch}")
    assert calls == [1, 1], "each call took the single-launch path"
