"""The precision rule of fused_resnet.testing: each branch can pass and can fail."""

import torch

from fused_resnet.testing import compare, compare_norm


def test_fixed_tolerance():
    expected = torch.ones(10)
    assert compare(expected + 5e-5, expected).ok
    assert not compare(expected + 5e-4, expected).ok
    assert compare(expected + 5e-4, expected, kind="grad").ok


def test_twice_eager_error_against_the_truth():
    truth = torch.linspace(-1, 1, 100, dtype=torch.float64)
    eager = (truth + 0.01).half()
    assert compare((truth + 0.015).half(), truth, baseline=eager).ok
    assert not compare((truth + 0.05).half(), truth, baseline=eager).ok


def test_norm_rule_takes_the_error_of_the_whole_tensor():
    truth = torch.ones(1000, dtype=torch.float64)
    eager = truth.float() + 1e-2  # every element off by 1e-2: norm 0.32
    spike = truth.float().clone()
    spike[0] += 0.5  # one element off by 0.5 (50x eager's worst), norm 0.5 < 2 x 0.32 + floor
    assert not compare(spike, truth, baseline=eager, compute_dtype=torch.float32).ok
    assert compare_norm(spike, truth, eager).ok
    assert not compare_norm(truth.float() + 3e-2, truth, eager).ok


def test_low_precision_candidate_must_beat_zeros():
    """A tensor of small values (a gradient, a running mean) wholly wrong - all zeros, or
    of the wrong sign - fails where eager is closer, though its error is below the absolute
    floor; half its size off, as bf16 noise on tiny inputs can be, passes."""
    truth = torch.linspace(-6e-3, 6e-3, 100, dtype=torch.float64)
    eager = truth.bfloat16()
    assert not compare(torch.zeros(100, dtype=torch.bfloat16), truth, baseline=eager).ok
    assert not compare((-truth).bfloat16(), truth, baseline=eager).ok
    assert compare((truth * 1.5).bfloat16(), truth, baseline=eager).ok
    assert compare(torch.zeros(3, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.float64),
                   baseline=torch.zeros(3, dtype=torch.bfloat16)).ok
    # where eager itself is no closer than zeros (ill-conditioned noise), neither need be ours
    assert compare(torch.zeros(100, dtype=torch.bfloat16), truth,
                   baseline=(-truth).bfloat16()).ok
