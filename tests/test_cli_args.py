"""Bad command-line arguments: each exits 2 with one line naming the flag, no traceback, and
before anything expensive runs (the CLI's main, run in this process)."""

import ast
import importlib.util
import os
import time
from pathlib import Path

import pytest
import torch

from fused_resnet.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
TINY_TRAIN = ("train", "--arch", "cifar_resnet20", "--epochs", "1", "--batch-size", "8",
              "--synthetic-size", "16", "--image-size", "8", "--no-progress")
TINY_VALIDATE = ("validate", "--arch", "cifar_resnet20", "--backend", "reference", "--steps",
                 "1", "--batch-size", "2", "--image-size", "8")
TINY_BENCH = ("bench", "--arch", "cifar_resnet20", "--batch-sizes", "2", "--image-size", "8",
              "--warmup", "0", "--iters", "1", "--no-progress")


def cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_error(capsys, args, *messages) -> str:
    """The command exits 2 with one error line holding every one of `messages`."""
    rc, out, err = cli(capsys, *args)
    assert rc == 2, (rc, out[-2000:], err[-2000:])
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for message in messages:
        assert message in lines[0], lines[0]
    return lines[0]


def must_not_run(*args, **kwargs):
    raise AssertionError("ran before the arguments were checked")


# 1. 0 is not replaced by the default; 0 and negative values name the flag


@pytest.mark.parametrize("args, message", [
    (("flops", "--arch", "cifar_resnet20", "--image-size", "0"),
     "--image-size must be >= 1, got 0"),
    (("flops", "--arch", "resnet50", "--image-size", "-5"), "--image-size must be >= 1, got -5"),
    (TINY_VALIDATE + ("--batch-size", "0"), "--batch-size must be >= 1, got 0"),
    (TINY_VALIDATE + ("--image-size", "0"), "--image-size must be >= 1, got 0"),
    (TINY_VALIDATE + ("--image-size", "-4"), "--image-size must be >= 1, got -4"),
    (TINY_TRAIN + ("--image-size", "0"), "--image-size must be an integer >= 1, got 0"),
    (TINY_TRAIN + ("--image-size", "-3"), "--image-size must be an integer >= 1, got -3"),
    (TINY_BENCH + ("--image-size", "0", "--no-save"), "--image-size must be >= 1, got 0"),
    (TINY_BENCH + ("--batch-sizes", "-2", "--no-save"), "--batch-sizes"),
])
def test_zero_and_negative_sizes_name_the_flag(capsys, tmp_path, args, message):
    if args[0] == "train":
        args += ("--out", tmp_path / "run")
    assert_error(capsys, args, message)


def test_flops_input_too_small_for_a_training_pass_names_the_flags(capsys):
    assert_error(capsys, ("flops", "--arch", "resnet50", "--image-size", "32"),
                 "--image-size 32 at --batch-size 1", "pass --batch-size 2")


def test_zero_sizes_are_not_the_default_in_the_python_api():
    from fused_resnet.bench.suite import SuiteConfig
    from fused_resnet.train import TrainConfig
    from fused_resnet.validate import validate

    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        validate("cifar_resnet20", "reference", steps=1, batch_size=0, image_size=8)
    with pytest.raises(ValueError, match="image_size must be >= 1, got 0"):
        validate("cifar_resnet20", "reference", steps=1, batch_size=2, image_size=0)
    with pytest.raises(ValueError, match="--image-size must be an integer >= 1, got 0"):
        TrainConfig(image_size=0).check()
    with pytest.raises(ValueError, match="image_size must be >= 1"):
        SuiteConfig(arch="cifar_resnet20", image_size=0, device="cpu").check()
    assert SuiteConfig(arch="cifar_resnet20", image_size=None).size(torch.device("cpu")) == 32


# 2. train reports only what it wrote; --max-iters must be >= 1


@pytest.mark.parametrize("value", ["0", "-1"])
def test_train_max_iters_must_be_positive(capsys, tmp_path, value):
    assert_error(capsys, TINY_TRAIN + ("--max-iters", value, "--out", tmp_path),
                 f"--max-iters must be an integer >= 1, got {value}")
    assert not any(tmp_path.iterdir())


def test_train_reports_only_the_files_it_wrote_and_refuses_a_finished_resume(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / "iterations.csv"  # an earlier run's log, not this run's
    stale.write_text("iteration\n")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    # 2 iterations, a log row every 10: no iterations.csv; curves (the epoch's validation
    # point) where matplotlib is installed
    rc, stdout, _ = cli(capsys, *TINY_TRAIN, "--out", out)
    assert rc == 0
    wrote = stdout.strip().splitlines()[-1]
    curves = ", curves.png" if importlib.util.find_spec("matplotlib") else ""
    assert wrote == f"wrote {out}/checkpoint.pt, epochs.csv{curves}", wrote
    # resuming the finished run with the same --epochs trains nothing: an error, not "wrote"
    again = tmp_path / "again"
    assert_error(capsys, TINY_TRAIN + ("--resume", out / "checkpoint.pt", "--out", again),
                 "--resume", "nothing left to train", "--epochs")
    assert not again.exists()


# 3. non-finite and negative settings of train


@pytest.mark.parametrize("flag, value, message", [
    ("--weight-decay", "nan", "--weight-decay must be a finite number, got nan"),
    ("--weight-decay", "inf", "--weight-decay must be a finite number, got inf"),
    ("--lr", "inf", "--lr must be a finite number, got inf"),
    ("--momentum", "nan", "--momentum must be a finite number, got nan"),
    ("--warmup-iters", "-5", "--warmup-iters must be an integer >= 0, got -5"),
    ("--patience", "-1", "--patience must be an integer >= 0, got -1"),
])
def test_train_rejects_non_finite_and_negative_settings(capsys, tmp_path, monkeypatch,
                                                       flag, value, message):
    monkeypatch.setattr("fused_resnet.train.loop.make_datasets", must_not_run)
    assert_error(capsys, TINY_TRAIN + (flag, value, "--out", tmp_path), message)


# 4. bad files: a one-line error naming the flag and the file


def test_train_resume_from_a_corrupt_file(capsys, tmp_path, monkeypatch):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    line = assert_error(capsys, TINY_TRAIN + ("--resume", bad, "--out", tmp_path / "r"),
                        "--resume", str(bad), "not a checkpoint")
    assert "weights_only" not in line


def test_train_resume_from_a_file_without_the_keys(capsys, tmp_path):
    path = tmp_path / "state_dict.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    assert_error(capsys, TINY_TRAIN + ("--resume", path, "--out", tmp_path / "r"),
                 "--resume", str(path), "lacks model, optimizer, scaler, state")


def test_train_resume_from_a_checkpoint_of_another_arch(capsys, tmp_path):
    from fused_resnet.models import build_model

    path = tmp_path / "checkpoint.pt"
    torch.save({"model": build_model("cifar_resnet32").state_dict(), "optimizer": {},
                "scaler": {}, "state": {}, "config": {"arch": "cifar_resnet32"}}, path)
    assert_error(capsys, TINY_TRAIN + ("--resume", path, "--out", tmp_path / "r"),
                 "--resume", str(path), "of cifar_resnet32", "--arch")


@pytest.mark.parametrize("layout, message", [
    ((), "Couldn't find any class folder"),
    (("cat",), "Found no valid file"),
])
def test_train_data_folder_without_classes_or_images(capsys, tmp_path, layout, message):
    root = tmp_path / "images"
    root.mkdir()
    for name in layout:
        (root / name).mkdir()
    assert_error(capsys, TINY_TRAIN + ("--data", root, "--out", tmp_path / "r"),
                 f"--data '{root}'", message)


def test_corrupt_cached_pretrained_weights_name_the_flag_and_file(capsys, tmp_path,
                                                                  monkeypatch):
    from fused_resnet.models.pretrained import checkpoint_path, resolve_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = Path(checkpoint_path(resolve_weights("resnet18", "DEFAULT")))
    assert path.is_relative_to(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage")
    assert_error(capsys, ("validate", "--arch", "resnet18", "--backend", "reference",
                          "--weights", "DEFAULT", "--steps", "1", "--batch-size", "2",
                          "--image-size", "32"),
                 "--weights DEFAULT", str(path), "delete it")


def test_bench_unwritable_table_fails_before_the_benchmark(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("fused_resnet.bench.blocks.bench_stages", must_not_run)
    table = tmp_path / "missing_dir" / "table.json"
    assert_error(capsys, TINY_BENCH + ("--stages", "--no-save", "--write-table", table),
                 "--write-table", str(table))


def test_bench_flops_table_checks_every_arch_before_timing_any(capsys, monkeypatch):
    monkeypatch.setattr("fused_resnet.bench.family.run_suite", must_not_run)
    bench = ("bench", "--flops-table", "--no-save", "--archs", "resnet18", "bogus")
    assert_error(capsys, bench, "--archs bogus")


def test_bench_corrupt_table_fails_before_the_benchmark(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("fused_resnet.bench.blocks.bench_stages", must_not_run)
    table = tmp_path / "table.json"
    table.write_text("{not json")
    assert_error(capsys, TINY_BENCH + ("--stages", "--no-save", "--write-table", table),
                 "--write-table", str(table))


def test_bench_unwritable_out_fails_before_the_benchmark(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("fused_resnet.bench.cli.run_suite", must_not_run)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert_error(capsys, TINY_BENCH + ("--out", blocker / "results"), "--out",
                 str(blocker / "results"))


def test_compile_unwritable_out_fails_before_compiling(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("fused_resnet.compile_check.check", must_not_run)
    out = tmp_path / "missing_dir" / "builds.csv"
    assert_error(capsys, ("compile", "--workload", "blocks", "--out", out), "--out", str(out))


# 5. --compare checks every run before the first trains


def test_compare_checks_every_depth_before_training(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("fused_resnet.train.cli.train", must_not_run)
    assert_error(capsys, TINY_TRAIN[:1] + ("--compare", "cifar_resnet", "--depths", "20,21",
                                           "--out", tmp_path) + TINY_TRAIN[3:],
                 "--depths 21", "6n+2")


# 6. compile --arch: compute capabilities the compiler check knows


@pytest.mark.parametrize("arch", ["0", "-5", "999", "75"])
def test_compile_arch_is_checked_first(capsys, monkeypatch, arch):
    monkeypatch.setattr("fused_resnet.compile_check.check", must_not_run)
    assert_error(capsys, ("compile", "--arch", "90", arch, "--workload", "blocks"),
                 "--arch takes compute capabilities among 80, 86", f"got {arch}")


def test_compile_archs_are_those_with_a_shared_memory_limit():
    from fused_resnet.__main__ import COMPILE_ARCHS

    tree = ast.parse((ROOT / "fused_resnet" / "triton" / "aot.py").read_text())
    (limits,) = [ast.literal_eval(node.value) for node in tree.body
                 if isinstance(node, ast.Assign)
                 and any(getattr(t, "id", None) == "SHARED_LIMIT" for t in node.targets)]
    assert tuple(sorted(limits)) == COMPILE_ARCHS


# 7. flags that do not apply are errors, not ignored


@pytest.mark.parametrize("args, messages", [
    (("flops", "--all", "--arch", "cifar_resnet20"), ("--all", "--arch")),
    (("flops", "--all", "--layers"), ("--all", "--layers")),
    (("flops", "--all", "--variant", "v1"), ("--all", "--variant")),
    (("flops", "--arch", "resnet18", "--variant", "v1"), ("--variant", "resnet18")),
    (("flops", "--arch", "cifar_resnet20", "--variant", "v1"), ("--variant", "cifar_resnet20")),
    (TINY_VALIDATE + ("--variant", "v1"), ("--variant", "cifar_resnet20")),
    (TINY_BENCH + ("--variant", "v1.5", "--no-save"), ("--variant", "cifar_resnet20")),
    (TINY_BENCH + ("--stages", "--flops-table", "--no-save"), ("--stages and --flops-table",)),
    (TINY_BENCH + ("--stages", "--profile", "cpu", "--no-save"), ("--stages and --profile",)),
    (TINY_BENCH + ("--archs", "resnet18", "--no-save"), ("--archs needs --flops-table",)),
])
def test_inapplicable_flags_are_errors(capsys, monkeypatch, args, messages):
    for target in ("fused_resnet.bench.cli.run_suite", "fused_resnet.bench.blocks.bench_stages",
                   "fused_resnet.bench.family.flops_table", "fused_resnet.flops.count_flops",
                   "fused_resnet.validate.validate"):
        monkeypatch.setattr(target, must_not_run)
    assert_error(capsys, args, *messages)


def test_variant_is_for_bottleneck_nets_only(capsys):
    from fused_resnet.__main__ import has_bottlenecks

    rc, out, _ = cli(capsys, "flops", "--arch", "resnet50", "--variant", "v1", "--image-size",
                     "64")
    assert rc == 0 and "resnet50 (v1) at input (1, 3, 64, 64)" in out
    assert [a for a in ("resnet18", "resnet34", "resnet50", "resnet152", "wide_resnet50_2",
                        "resnext50_32x4d", "plain34", "plain50", "cifar_resnet56",
                        "plain_cifar110") if has_bottlenecks(a)] == [
        "resnet50", "resnet152", "wide_resnet50_2", "resnext50_32x4d", "plain50"]


@pytest.mark.parametrize("args, messages", [
    (("--mode", "infer", "--operands", "written"), ("--operands", "--mode train")),
    (("--arch", "resnext50_32x4d"), ("--arch resnext50_32x4d", "grouped")),
])
def test_traffic_flags_that_do_not_apply(capsys, monkeypatch, args, messages):
    monkeypatch.setattr("fused_resnet.traffic.step_counts", must_not_run)
    assert_error(capsys, ("traffic", "--arch", "cifar_resnet20", "--batch", "2") + args,
                 *messages)


def test_traffic_help_lists_no_grouped_arch(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["traffic", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "resnet50" in out and "resnext50_32x4d" not in out


# 8. messages name the flag


@pytest.mark.parametrize("args, message", [
    (("flops", "--arch", "resnet50", "--batch-size", "0"), "--batch-size must be >= 1, got 0"),
    (TINY_VALIDATE + ("--steps", "0"), "--steps must be >= 1, got 0"),
    (TINY_TRAIN + ("--batch-size", "0"), "--batch-size must be an integer >= 1, got 0"),
    (TINY_TRAIN + ("--log-every", "0"), "--log-every must be an integer >= 1, got 0"),
    (TINY_TRAIN + ("--epochs", "-1"), "--epochs must be an integer >= 1, got -1"),
    (TINY_VALIDATE + ("--device", "gpu"), "--device must be cpu or cuda"),
    (TINY_BENCH + ("--device", "mps", "--no-save"), "--device must be cpu or cuda"),
    pytest.param(TINY_VALIDATE + ("--device", "cuda"), "--device cuda: no CUDA device",
                 marks=pytest.mark.skipif(CUDA, reason="a CUDA device is here")),
    pytest.param(TINY_TRAIN + ("--device", "cuda"), "--device cuda: no CUDA device",
                 marks=pytest.mark.skipif(CUDA, reason="a CUDA device is here")),
    pytest.param(TINY_BENCH + ("--device", "cuda", "--no-save"), "--device cuda: no CUDA device",
                 marks=pytest.mark.skipif(CUDA, reason="a CUDA device is here")),
])
def test_messages_name_the_flag(capsys, tmp_path, args, message):
    if args[0] == "train":
        args += ("--out", tmp_path / "run")
    line = assert_error(capsys, args, message)
    assert line.startswith(f"python -m fused_resnet {args[0]}: error: ")
    assert "batch_size" not in line and "input_size" not in line


# 9. validate warns where the last stage's BNs see too few values


def test_validate_warns_about_ill_conditioned_batch_statistics(capsys):
    rc, out, _ = cli(capsys, "validate", "--arch", "cifar_resnet20", "--backend", "reference",
                     "--steps", "1", "--batch-size", "2", "--image-size", "4")
    # (the reference backend against itself is warned too: the other warning line)
    warning = [line for line in out.splitlines()
               if line.startswith("warning:") and "values per channel" in line]
    assert len(warning) == 1, out
    assert "2 values per channel" in warning[0] and "ill-conditioned" in warning[0]
    assert "--image-size" in warning[0] and "--batch-size" in warning[0]
    assert "rtol=atol=" in out  # the fixed tolerances, not loosened
    rc, out, _ = cli(capsys, "validate", "--arch", "cifar_resnet20", "--backend", "reference",
                     "--steps", "1", "--batch-size", "2", "--image-size", "16")
    assert rc == 0 and "values per channel" not in out and "PASSED" in out


def test_values_per_channel_at_the_last_stage():
    from fused_resnet.models import build_model
    from fused_resnet.validate import MIN_BN_VALUES, bn_values_per_channel, few_values_warning

    model = build_model("resnet50")
    assert bn_values_per_channel(model, 2, 32) == 2
    assert bn_values_per_channel(model, 4, 64) == 16 == MIN_BN_VALUES  # README's CPU input
    assert few_values_warning(model, 4, 64) is None
    assert "2 values per channel" in few_values_warning(model, 2, 32)
