"""`python -m fused_resnet validate` as a user meets it (the CLI's main, in this process):
a model that raises exits 3 with its traceback and names the model and phase, apart from
bad arguments (exit 2, one line naming the flag: --arch, --weights, --shortcut, a model's
depth); the header shows the backend "auto" resolved to; --help lists the exit codes;
--seed and --shortcut reach the models."""

import pytest
import torch

from fused_resnet import backend as backends
from fused_resnet import validate as validation
from fused_resnet.__main__ import EXIT_RAISED, EXIT_USAGE, build_parser, main

pytest.importorskip("torchvision")

TINY = ("validate", "--arch", "cifar_resnet20", "--backend", "reference", "--steps", "1",
        "--batch-size", "2", "--image-size", "8")


def cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def must_not_run(*args, **kwargs):
    raise AssertionError("ran before the arguments were checked")


def _broken(monkeypatch, which: str, phase: str, error=RuntimeError):
    """validate's `which` model ("candidate" or "reference") raises `error` in `phase`
    ("training forward", "backward" or "eval forward") of its layer2."""
    twin = validation.reference_twin

    def fail(*args):
        raise error("kernel launch failed: misaligned address\n(a second line)")

    def hook(module, inputs, output):
        if phase == "eval forward" and not module.training:
            fail()
        if phase == "training forward" and module.training:
            fail()
        if phase == "backward" and module.training:
            output.register_hook(fail)

    def reference_twin(arch, candidate, variant):
        reference, name = twin(arch, candidate, variant)
        (candidate if which == "candidate" else reference).layer2.register_forward_hook(hook)
        return reference, name

    monkeypatch.setattr(validation, "reference_twin", reference_twin)


@pytest.mark.parametrize("which, phase, named", [
    ("candidate", "training forward", "the candidate model (cifar_resnet20, backend "
     "reference) raised RuntimeError during step 1: training forward"),
    ("candidate", "backward", "the candidate model (cifar_resnet20, backend reference) raised "
     "RuntimeError during step 1: backward"),
    ("reference", "eval forward", "the reference (fused_resnet reference backend) raised "
     "RuntimeError during eval forward"),
])
def test_a_model_that_raises_exits_3_with_its_traceback_and_names_it(capsys, monkeypatch,
                                                                     which, phase, named):
    _broken(monkeypatch, which, phase)
    rc, out, err = cli(capsys, *TINY)
    assert rc == EXIT_RAISED == 3 and rc != EXIT_USAGE
    assert err.startswith("Traceback (most recent call last):")
    assert "RuntimeError: kernel launch failed: misaligned address" in err  # the original
    last = err.strip().splitlines()[-1]
    assert last == (f"python -m fused_resnet validate: error: {named}: kernel launch failed: "
                    "misaligned address (traceback above)"), last  # the message's first line
    assert "PASSED" not in out and "FAILED" not in out


def test_the_python_api_raises_a_model_run_error_with_the_original_as_cause(monkeypatch):
    _broken(monkeypatch, "reference", "training forward", error=IndexError)
    with pytest.raises(validation.ModelRunError) as info:
        validation.validate("cifar_resnet20", "reference", "fp64", 1, batch_size=2,
                            image_size=8, device="cpu")
    assert (info.value.model, info.value.phase) == ("the reference (fused_resnet reference "
                                                    "backend)", "step 1: training forward")
    assert isinstance(info.value.__cause__, IndexError)


def test_a_backend_that_does_not_implement_the_model_is_an_argument_error(capsys, monkeypatch):
    # (as select_kernels refuses a grouped conv on a backend named "triton")
    _broken(monkeypatch, "candidate", "training forward", error=NotImplementedError)
    rc, _, err = cli(capsys, *TINY)
    assert rc == EXIT_USAGE and "Traceback" not in err
    assert err.strip().splitlines() == ["python -m fused_resnet validate: error: kernel launch "
                                        "failed: misaligned address", "(a second line)"]


def test_an_input_the_model_refuses_is_an_argument_error(capsys, monkeypatch):
    monkeypatch.setattr(validation, "_step", must_not_run)
    rc, _, err = cli(capsys, "validate", "--arch", "resnet18", "--backend", "reference",
                     "--image-size", "8", "--batch-size", "1", "--steps", "1")
    assert rc == EXIT_USAGE and len(err.strip().splitlines()) == 1
    assert "--image-size 8 / --batch-size 1: Expected more than 1 value per channel" in err


@pytest.mark.parametrize("args, message", [
    (("--arch", "resnet51"), "--arch: unknown model 'resnet51'; expected one of resnet18, "),
    (("--arch", "vgg16"), "--arch: unknown model 'vgg16'; expected one of resnet18, "),
    (("--arch", "cifar_resnet21"), "--arch cifar_resnet21: depth must be 6n+2"),
    (("--arch", "plain_cifar7"), "--arch plain_cifar7: depth must be 6n+2"),
    (("--arch", "plain19"), "--arch plain19: depth must be one of [18, 34, 50, 101, 152]"),
    (("--arch", "resnet18", "--weights", "IMAGENET1K_V9"),
     "--weights must name one of ResNet18_Weights's members (DEFAULT, IMAGENET1K_V1)"),
    (("--arch", "cifar_resnet20", "--weights", "DEFAULT"),
     "--weights: torchvision has pretrained weights for resnet18"),
    (("--arch", "plain_cifar20", "--shortcut", "B"),
     "--shortcut: plain_cifar20 is a plain net, without shortcuts"),
    (("--arch", "plain18", "--shortcut", "A"), "--shortcut: plain18 is a plain net"),
    (("--arch", "resnet18", "--weights", "DEFAULT", "--shortcut", "A"),
     "--shortcut A does not fit --weights DEFAULT: torchvision's weights have projection"),
])
def test_model_errors_name_the_flag(capsys, monkeypatch, args, message):
    monkeypatch.setattr(validation, "validate", must_not_run)
    rc, _, err = cli(capsys, "validate", *args)
    assert rc == EXIT_USAGE and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"python -m fused_resnet validate: error: {message}"), line


def test_the_header_shows_the_backend_auto_resolved_to(capsys, monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    rc, out, _ = cli(capsys, *TINY[:4], "auto", *TINY[5:])
    assert rc == 0
    assert out.startswith("validate cifar_resnet20 on backend auto -> reference (from "
                          "FUSED_RESNET_BACKEND=reference) (fp64, cpu, input (2, 3, 8, 8), "
                          "seed 0) against fused_resnet reference backend\n"), out
    rc, out, _ = cli(capsys, *TINY)
    assert out.startswith("validate cifar_resnet20 on backend reference (fp64, "), out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda backend runs here")
def test_an_environment_backend_that_cannot_run_names_the_variable(capsys, monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    monkeypatch.setattr(validation, "load_model", must_not_run)
    rc, _, err = cli(capsys, *TINY[:4], "auto", *TINY[5:])
    assert rc == EXIT_USAGE and "Traceback" not in err
    assert err.startswith("python -m fused_resnet validate: error: FUSED_RESNET_BACKEND=cuda: "
                          "backend 'cuda' cannot run conv_bn_act"), err


def test_resolved_backend_follows_the_ops_resolution(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    cpu = torch.device("cpu")
    names = {backends.resolve("auto", op, cpu) for op in backends.OP_BACKENDS}
    assert len(names) == 1  # on CPU every op takes _C's kernels, or every op the reference
    assert validation.resolved_backend("auto", cpu, "fp64") == f"auto -> {names.pop()}"
    assert validation.resolved_backend("triton", cpu, "fp64") == "triton"
    monkeypatch.setattr(backends, "resolve", lambda backend, op, dev, exclude=():
                        "cuda" if op == "bn_add_relu" else "triton")
    monkeypatch.setattr(validation, "resolve", backends.resolve)
    assert validation.resolved_backend("auto", cpu, "fp32") == \
        "auto -> triton (bn_add_relu: cuda)"


def test_help_lists_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["validate", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "exit status:" in out
    for line in ("  0  PASSED", "  1  FAILED", "  2  bad arguments", "  3  a model raised"):
        assert line in out, out


def test_seed_reaches_validate_and_defaults_to_its_seed(capsys, monkeypatch):
    import inspect

    seen = []
    real = validation.validate

    def spy(*args, **kwargs):
        seen.append(kwargs["seed"])
        return real(*args, **kwargs)

    monkeypatch.setattr(validation, "validate", spy)
    assert cli(capsys, *TINY)[0] == 0
    assert cli(capsys, *TINY, "--seed", "7")[0] == 0
    assert seen == [inspect.signature(real).parameters["seed"].default, 7]
    assert build_parser().parse_args(["validate"]).seed == 0


def test_seed_draws_the_weights_and_the_input(monkeypatch):
    inputs = []
    step = validation._step

    def recorded(model, x, *args):
        inputs.append((x.clone(), next(model.parameters()).detach().clone()))
        return step(model, x, *args)

    monkeypatch.setattr(validation, "_step", recorded)
    for seed in (0, 0, 1):
        validation.validate("cifar_resnet20", "reference", "fp64", 1, batch_size=2,
                            image_size=8, device="cpu", seed=seed)
    (x0, w0), _, (x0_again, w0_again), _, (x1, w1), _ = inputs  # candidate, reference
    assert torch.equal(x0, x0_again) and torch.equal(w0, w0_again)
    assert not torch.equal(x0, x1) and not torch.equal(w0, w1)


def test_shortcut_b_on_a_cifar_net(capsys):
    rc, out, _ = cli(capsys, *TINY[:4], "auto", *TINY[5:-1], "16", "--shortcut", "B")
    assert rc == 0 and "validate cifar_resnet20, shortcut B on backend auto -> " in out
    # option B's two projections (conv, BN weight and bias each) beside option A's 59
    assert "gradients (65;" in out and "PASSED" in out


def test_shortcut_c_of_an_imagenet_net_is_checked_against_the_reference_backend():
    report = validation.validate("resnet18", "auto", "fp64", 1, batch_size=2, image_size=32,
                                 device="cpu", shortcut="C")
    # torchvision's resnet18 has no projection on every block: no twin to load into
    assert report.reference == "fused_resnet reference backend"
    assert report.ok, report.rows
    grads = next(name for name, _ in report.rows if "gradients" in name)
    assert "(77;" in grads  # option B's 62, and 5 more projections: conv, BN weight, bias
