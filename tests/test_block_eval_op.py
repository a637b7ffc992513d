"""`fused_resnet.ops.residual_block_eval` (inference, BN folded: one fused conv + bias
(+ residual) + ReLU per conv) on every block kind against plain F.conv2d ops, and its
argument check: the whole block checked before anything runs, a passed check remembered by
the shapes, dtypes and devices it read."""

import pytest
import torch
from _backends import DEVICE, FUSED_BACKENDS, NATIVE
from _block_cases import BLOCKS, block_args

import fused_resnet as fr
from fused_resnet.testing import assert_close


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("name", list(BLOCKS))
def test_residual_block_eval_matches_the_reference(name, backend):
    """Inference with BN folded: z = relu(conv_L(...) + b_L + shortcut(x)), one fused conv
    + bias (+ residual) + ReLU per conv, against plain F.conv2d ops."""
    x, weights, _, _, strides, paddings, dilations, _, shortcut, shortcut_stride = \
        block_args(name)
    x = x.detach()
    weights = [w.detach() for w in weights]
    biases = [torch.randn(w.shape[0], device=DEVICE) for w in weights]
    kwargs = dict(strides=strides, paddings=paddings, shortcut=shortcut,
                  shortcut_stride=shortcut_stride, dilations=dilations)
    expected = fr.ops.residual_block_eval(x, weights, biases, backend="reference", **kwargs)
    main = len(weights) - (shortcut == "projection")
    assert expected.shape[1] == weights[main - 1].shape[0]
    with torch.no_grad():
        assert_close(fr.ops.residual_block_eval(x, weights, biases, backend=backend, **kwargs),
                     expected)


def test_residual_block_eval_checks_the_whole_block_first():
    x, weights, _, _, strides, paddings, _, _, shortcut, _ = block_args("basic identity")
    biases = [torch.zeros(w.shape[0]) for w in weights]
    kwargs = dict(strides=strides, paddings=paddings, shortcut=shortcut, backend=NATIVE)
    with pytest.raises(ValueError, match="x has 8 channels but weight expects 16"):
        fr.ops.residual_block_eval(x.detach(), [weights[0], torch.randn(8, 16, 3, 3)], biases,
                                   **kwargs)
    with pytest.raises(ValueError, match="bias must have shape \\(8,\\)"):
        fr.ops.residual_block_eval(x.detach(), weights, [biases[0], torch.zeros(4)], **kwargs)


def test_residual_block_eval_remembers_a_passed_check_by_what_it_reads():
    """A block called again with the same shapes, dtypes and devices skips its check (host
    time at batch 1); any of them changed is checked again, and still refused."""
    import fused_resnet.ops.block as block_ops

    x, weights, _, _, strides, paddings, _, _, shortcut, _ = block_args("basic identity")
    x, weights = x.detach(), [w.detach() for w in weights]
    biases = [torch.zeros(w.shape[0], device=DEVICE) for w in weights]
    kwargs = dict(strides=strides, paddings=paddings, shortcut=shortcut, backend="reference")
    block_ops._EVAL_CHECKED.clear()
    fr.ops.residual_block_eval(x, weights, biases, **kwargs)
    assert len(block_ops._EVAL_CHECKED) == 1
    fr.ops.residual_block_eval(x + 1, weights, biases, **kwargs)  # same signature
    assert len(block_ops._EVAL_CHECKED) == 1
    with pytest.raises(ValueError, match="x has 8 channels but weight expects 16"):
        fr.ops.residual_block_eval(x, [weights[0], torch.randn(8, 16, 3, 3, device=DEVICE)],
                                   biases, **kwargs)
    with pytest.raises(ValueError, match="bias must have shape \\(8,\\)"):
        fr.ops.residual_block_eval(x, weights, [biases[0], torch.zeros(4, device=DEVICE)],
                                   **kwargs)
    with pytest.raises(ValueError, match="weight must be 4-D"):
        fr.ops.residual_block_eval(x, [weights[0], weights[1][..., 0]], biases, **kwargs)
    assert len(block_ops._EVAL_CHECKED) == 1

