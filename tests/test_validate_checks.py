"""What `validate` compares, shown by candidates broken on purpose: every parameter of the
reference gets a gradient row (one the candidate leaves without a gradient fails), every
buffer a row (a num_batches_tracked off by N shows N), a wholly wrong bf16 gradient of small
values fails, and eval logits that explode are judged relative to their largest value,
warned."""

import pytest
import torch

from fused_resnet import validate as validation

pytest.importorskip("torchvision")


def _patched(monkeypatch, mutate):
    """validate's candidate built as usual, then `mutate`d (the reference twin is made from
    the candidate before: `reference_twin` copies its weights, so patch the build)."""
    twin = validation.reference_twin

    def reference_twin(arch, candidate, variant):
        reference = twin(arch, candidate, variant)
        mutate(candidate)
        return reference

    monkeypatch.setattr(validation, "reference_twin", reference_twin)


def _run(dtype="fp64", steps=1, image_size=16):
    return validation.validate("cifar_resnet20", "auto", dtype, steps, batch_size=4,
                               image_size=image_size, device="cpu")


def _row(report, prefix):
    return next(c for name, c in report.rows if name.startswith(prefix))


def test_a_parameter_left_without_gradient_fails(monkeypatch):
    _patched(monkeypatch, lambda m: m.layer3[2].bn1.weight.requires_grad_(False))
    report = _run()
    grads = _row(report, "step 1: gradients")
    assert not report.ok and not grads.ok and grads.bound == "present in every model"
    assert "(59;" in next(n for n, _ in report.rows if n.startswith("step 1: gradients"))


def test_num_batches_tracked_row_shows_the_difference(monkeypatch):
    def count_twice(model):
        forward = model.forward

        def counted(x):
            model.bn1.num_batches_tracked.add_(1)
            return forward(x)
        model.forward = counted

    _patched(monkeypatch, count_twice)
    stats = _row(_run(steps=2), "running stats")
    assert not stats.ok and stats.max_abs == 2.0


def test_a_zero_bf16_gradient_of_small_values_fails(monkeypatch):
    def zero_grad(model):
        model.layer3[2].bn1.weight.register_hook(torch.zeros_like)

    _patched(monkeypatch, zero_grad)
    report = _run("bf16", image_size=32)  # its gradient's values below 6e-3 there
    grads = _row(report, "step 1: gradients")
    assert not grads.ok and grads.max_abs < 8e-3  # below the bf16 floor, yet caught


def test_exploding_eval_logits_are_judged_relative_to_their_largest_value(monkeypatch):
    monkeypatch.setattr(validation, "EXPLODED_LOGITS", 1e-3)  # any logits count as exploded
    report = _run()
    row = _row(report, "eval logits")
    assert row.ok and row.bound.endswith("x max |expected|")
    assert any("eval logits reach" in w for w in report.warnings)


def test_a_backend_that_cannot_run_is_refused_before_the_models_are_built(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the cuda backend runs here")
    monkeypatch.setattr(validation, "build_model", lambda *a, **k: pytest.fail("built"))
    with pytest.raises(ValueError, match=r"backend 'cuda' \(--backend\) cannot run on cpu"):
        validation.validate("cifar_resnet20", "cuda", "fp64", 1, device="cpu")


def test_the_reference_backend_against_itself_is_warned():
    report = validation.validate("cifar_resnet20", "reference", "fp64", 1, batch_size=4,
                                 image_size=16, device="cpu")
    assert any("compared with a copy of itself" in w for w in report.warnings)
