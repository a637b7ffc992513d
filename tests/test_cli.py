"""The command line, run as users run it (subprocesses)."""

import gzip
import json
import subprocess
import sys

import pytest
import torch


def run(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "fused_resnet", *args],
                            capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


@pytest.mark.parametrize("command", ["flops", "validate", "bench"])
def test_help(command):
    out = run(command, "--help").stdout
    assert "--arch" in out and "usage" in out


def test_flops_resnet50_prints_stages_and_total():
    out = run("flops", "--arch", "resnet50").stdout
    assert "resnet50 (v1.5)" in out
    total = next(line for line in out.splitlines() if line.startswith("| total"))
    assert "4.089" in total and "25.557" in total
    for stage in ("stem", "layer1", "layer4", "head"):
        assert f"| {stage}" in out


def test_flops_v1_and_layers():
    out = run("flops", "--arch", "resnet50", "--variant", "v1", "--layers").stdout
    assert "| layer1.0.conv1 " in out and "| fc " in out
    assert "3.858" in next(line for line in out.splitlines() if line.startswith("| total"))


def test_flops_all_prints_the_family_beside_the_paper():
    out = run("flops", "--all").stdout
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                         "wide_resnet50_2", "resnext50_32x4d"}
    cells = [c.strip() for c in rows["resnet152"].split("|")[1:-1]]
    assert cells[2:6] == ["11.28", "11.3", "11.51", "11.51"]


def test_flops_cifar():
    out = run("flops", "--arch", "cifar_resnet110").stdout
    assert "(1, 3, 32, 32)" in out and "1.7" in out


def test_validate_passes_and_prints_the_table():
    out = run("validate", "--arch", "cifar_resnet20", "--steps", "1", "--batch-size", "2").stdout
    assert "running stats" in out and "eval logits" in out
    assert "PASSED" in out and "FAIL |" not in out


def test_validate_against_torchvision_in_fp32():
    # 64x64 leaves layer4 8 values per channel to normalize; at 32x32 (2 values) the
    # gradients are so ill-conditioned that fp32 rounding differences exceed 1e-3.
    out = run("validate", "--arch", "resnet18", "--steps", "1", "--batch-size", "2",
              "--image-size", "64", "--dtype", "fp32").stdout
    assert "torchvision.models.resnet18" in out and "(fp32, " in out and "PASSED" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU defaults")
def test_readme_main_job_validates_resnet50_in_fp64_on_cpu():
    # README's main command as written: ResNet-50 at 64x64, batch 4, 2 SGD steps, fp64, every
    # row at the fixed tolerance (no 2x-eager fallback in fp64)
    out = run("validate").stdout
    assert "validate resnet50 on backend auto -> " in out
    assert "(fp64, cpu, input (4, 3, 64, 64), seed 0)" in out
    assert "PASSED: 8 of 8" in out and "2x eager" not in out


def test_fp64_validation_catches_a_wrong_model(monkeypatch):
    # the candidate's one BN normalizes with eps 0.1 where torchvision's twin has 1e-5: a few
    # percent off, far above fp64 rounding, so the fixed tolerance must flag it
    from fused_resnet import validate as validation

    build_model = validation.build_model

    def build_off_by_eps(arch, **kwargs):
        model = build_model(arch, **kwargs)
        model.layer2[0].bn2.eps = 0.1
        return model

    monkeypatch.setattr(validation, "build_model", build_off_by_eps)
    report = validation.validate("resnet18", "auto", "fp64", 1, batch_size=2, image_size=64,
                                 device="cpu")
    assert report.dtype == "fp64" and not report.ok
    assert all(c.bound.startswith("rtol") for _, c in report.rows)


def test_bench_prints_every_column_and_writes_the_results_folder(tmp_path):
    result = run("bench", "--arch", "cifar_resnet20", "--batch-sizes", "2", "--iters", "2",
                 "--out", str(tmp_path))
    for column in ("fused cpu" if _has_extension() else "fused auto", "eager NCHW",
                   "eager channels_last"):
        assert column in result.stdout
    assert result.stdout.count("| train ") == 3 and result.stdout.count("| latency ") == 3
    (folder,) = tmp_path.iterdir()
    header = (folder / "model.csv").read_text().splitlines()[0]
    assert header.startswith("arch,device,dtype,mode,batch,image_size,column,cuda_graphs,ms,")
    assert "wrote " in result.stderr


def test_bench_flops_table_lists_the_family(tmp_path):
    out = run("bench", "--flops-table", "--archs", "resnet18", "resnet34", "--image-size",
              "32", "--batch-sizes", "2", "--iters", "1", "--no-save").stdout
    rows = [line for line in out.splitlines() if line.startswith("| resnet")]
    assert [r.split("|")[1].strip() for r in rows] == ["resnet18", "resnet34"]
    assert "| 11.69 " in rows[0] and "| 1.8 " in rows[0]  # params (M), paper GMACs
    assert "latency ms p50 (p90)" in out and "img/s" in out


def test_bench_profile_prints_the_kernel_table(tmp_path):
    out = run("bench", "--profile", "reference", "--arch", "cifar_resnet20", "--modes",
              "train", "--batch-sizes", "2", "--image-size", "8",
              "--trace", str(tmp_path / "trace")).stdout
    assert "## fused reference, cifar_resnet20, fp32 train batch 2" in out
    assert "aten::convolution" in out and "Self CPU" in out
    with gzip.open(tmp_path / "trace-fp32-train-2.json.gz", "rt") as f:
        events = json.load(f)["traceEvents"]
    assert any(e.get("name") == "aten::convolution" for e in events)


def test_short_benchmark_of_validate():
    from fused_resnet.bench.cli import short_benchmark

    text = short_benchmark("cifar_resnet20", "v1.5", "reference", "fp32", "cpu",
                           columns=("reference", "eager-cl"), image_size=8, batch=2)
    assert "short benchmark (fp32, batch 2 and 1" in text
    assert text.count("| fused reference ") == 3 and text.count("| eager channels_last ") == 3


@pytest.mark.gpu
def test_validate_on_gpu_ends_with_the_short_benchmark():
    out = run("validate", "--arch", "resnet18", "--steps", "1", "--batch-size", "4",
              "--image-size", "64").stdout
    assert "PASSED" in out and "short benchmark" in out and "| compile " in out


def _has_extension():
    try:
        from fused_resnet import _C  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("args, message", [
    (("flops", "--arch", "vgg16"), "arch must be one of"),
    pytest.param(("validate", "--arch", "cifar_resnet20", "--backend", "cuda"),
                 "runs CUDA tensors", marks=pytest.mark.skipif(
                     torch.cuda.is_available(), reason="CUDA tensors run here")),
    (("validate", "--arch", "cifar_resnet20", "--steps", "0"), "steps must be >= 1"),
    (("bench", "--arch", "cifar_resnet20", "--write-table"), "--write-table needs --stages"),
    (("bench", "--arch", "cifar_resnet20", "--trace", "t"), "--trace needs --profile"),
    (("bench", "--arch", "cifar_resnet20", "--batch-sizes", "0"), "batch sizes must be >= 1"),
    pytest.param(("bench", "--arch", "cifar_resnet20", "--cuda-graphs"),
                 "--cuda-graphs needs a CUDA device", marks=pytest.mark.skipif(
                     torch.cuda.is_available(), reason="CUDA graphs run here")),
])
def test_bad_arguments_exit_2_with_a_message(args, message):
    result = run(*args, check=False)
    assert result.returncode == 2
    assert message in result.stderr


def test_ci_runs_exactly_the_readme_test_command():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv")]
    assert len(commands) == 2, "README must start with the two set-up commands"
    ci = (root / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci


def test_readme_python_examples_run():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) >= 2
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md python block {i}", "exec"), {})
