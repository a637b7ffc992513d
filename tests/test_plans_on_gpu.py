"""Inference plans on a GPU (`gpu` marker): what `test_eval_plan.py` and `test_stem_plan.py`
check in the interpreter and on `_C` for CPU, for a whole ResNet-50 on CUDA tensors, where
the plans launch compiled Triton kernels through prepared launches (`PreparedLaunch`, whose
later calls skip `launch` once the autotuner's config is known) and cuDNN through `_C`.
Calls after the first run the plans of the stem and of all 16 blocks; each input signature
(batch 1 and 4: the latency and throughput rows of the benchmark) gives its own plans; every
planned call equals the first, checked call bit for bit, and that call is within DESIGN.md's
rule of the reference model; a weight written in place is seen by the next call."""

import pytest
import torch

from fused_resnet import models, ops
from fused_resnet.nn import blocks as block_module
from fused_resnet.nn import pool as pool_module
from fused_resnet.testing import assert_close
from tests._calls import count_calls


def _models(backend):
    """(fused ResNet-50 on `backend`, the reference model with its weights, on CUDA, eval),
    BN statistics and affine parameters away from their defaults so that folding them
    matters; 10 classes (the head is not what is tested)."""
    torch.manual_seed(0)
    fused = models.resnet50(num_classes=10, backend=backend)
    with torch.no_grad():
        for m in fused.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
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
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        firsts = []
        for x in inputs:
            firsts.append(fused(x))
            checked = (len(block_calls), len(stem_calls))
            assert all(b in block_module._EVAL_PLANS for b in blocks)
            assert fused.conv1 in pool_module._STEM_PLANS
            for _ in range(3):  # the plan's first call launches through `launch`, then not
                again = fused(x)
                assert torch.equal(again, firsts[-1])
                assert again.stride() == firsts[-1].stride()
            assert (len(block_calls), len(stem_calls)) == checked  # all planned
        for x, first in zip(inputs, firsts):  # each signature kept its plans
            assert torch.equal(fused(x), first)
        assert (len(block_calls), len(stem_calls)) == checked
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
