"""The benchmark scripts run (tiny shapes on CPU): a smoke test of the code, not of speed."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _backends import skip_without_triton

ROOT = Path(__file__).resolve().parents[1]


def run_script(name, *args):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def only_folder(tmp_path):
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert folder.name.startswith("cpu-20")  # <device>-<date>
    return folder


def test_bench_ops_smoke(tmp_path):
    skip_without_triton()  # bench_ops.py times the Triton conv
    result = run_script("bench_ops.py", "--smoke", "--out", str(tmp_path))
    assert "| fused " in result.stdout and "| eager " in result.stdout
    lines = (only_folder(tmp_path) / "ops-smoke.csv").read_text().splitlines()
    assert lines[0].startswith("shape,batch,dtype,mode,impl,ms")
    assert len(lines) == 1 + 2 * 3 * 2  # 2 shapes x 3 modes x 2 impls


def test_run_all_smoke_writes_every_report(tmp_path):
    result = run_script("run_all.py", "--smoke", "--out", str(tmp_path), "--skip", "ops")
    for step in ("model", "stages", "family"):
        assert f"=== {step}: exit 0" in result.stdout
    folder = only_folder(tmp_path)
    for kind in ("model", "blocks"):
        for ext in ("csv", "json", "md", "png"):
            assert (folder / f"{kind}.{ext}").stat().st_size > 0, (kind, ext)
    rows = list(csv.DictReader((folder / "model.csv").open()))
    # 2 dtypes x (train, infer, latency) x 3 columns, none failed
    assert len(rows) == 2 * 3 * 3 and not any(r["error"] for r in rows)
    assert {r["column"] for r in rows} == {"fused cpu", "eager NCHW", "eager channels_last"}
    data = json.loads((folder / "model.json").read_text())
    assert data["device"] == "cpu" and "torch" in data["versions"] and len(data["rows"]) == 18
    family = list(csv.DictReader((folder / "flops-table.csv").open()))
    assert [r["arch"] for r in family] == ["resnet18"]
    table = json.loads((tmp_path / "auto_backend.json").read_text())
    assert table["format"] == 1 and len(table["devices"]["cpu"]) == 5 * 2  # 5 blocks x 2 modes


def test_bench_model_and_blocks_smoke_pass_arguments_on(tmp_path):
    # the two entry points: their presets, with later `bench` arguments winning
    result = run_script("bench_model.py", "--smoke", "--out", str(tmp_path), "--modes",
                        "latency", "--dtypes", "fp32")
    rows = list(csv.DictReader((only_folder(tmp_path) / "model.csv").open()))
    assert {(r["mode"], r["dtype"], r["arch"]) for r in rows} == {
        ("latency", "fp32", "cifar_resnet20")}
    assert {r["column"] for r in rows} == {"fused cpu", "eager NCHW", "eager channels_last"}
    result = run_script("bench_blocks.py", "--smoke", "--no-save")
    assert "bench --stages: cifar_resnet20 blocks" in result.stdout
    assert "| layer3.0 " in result.stdout and "| eval " in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
@pytest.mark.parametrize("script", ["bench_model.py", "bench_blocks.py"])
def test_gpu_presets_refuse_a_cpu_machine(script):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "meant for a GPU; use --smoke" in result.stderr


def test_gpu_session_script_parses_and_names_its_steps(tmp_path):
    # the one-call script for a lent GPU machine cannot run here; bash checks its syntax, and
    # an unknown step is refused before anything is built
    script = ROOT / "benchmarks" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    for step in ("warm)", "profile)", "tests)", "model)", "blocks)", "fuzz)", "graphs|replays)",
                 "bench_model.py", "bench_blocks.py", "gpu and not slow", "-m slow",
                 "test_fuzz.py --fuzz-long", "tests/test_cuda_graphs.py", "--cuda-graphs",
                 "fused_resnet compile --arch 90"):
        assert step in text, step
    refused = subprocess.run(["bash", str(script), "tests", "bogus"], capture_output=True,
                             text=True, env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")})
    assert refused.returncode == 2 and "unknown step 'bogus'" in refused.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("steps,runs,skips", [
    ("replays", ["bench_model.py", "--cuda-graphs"], ["-m pytest", "fused_resnet compile"]),
    ("graphs", ["-m gpu -k graphs", "--cuda-graphs"], ["compile --arch"]),
    ("warm model", ["compile --arch 90", "bench_model.py"], ["-m pytest", "--cuda-graphs"]),
])
def test_gpu_session_runs_the_steps_asked_for(tmp_path, steps, runs, skips):
    """The script run here with python3 / nvidia-smi stubbed (each call's arguments logged):
    the build, then each step's command; nothing else."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    calls = tmp_path / "calls.log"
    for name in ("python3", "nvidia-smi"):
        (stubs / name).write_text(f'#!/bin/bash\necho "$*" >> {calls}\n')
        (stubs / name).chmod(0o755)
    script = ROOT / "benchmarks" / "gpu_session.sh"
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "OUT": str(tmp_path / "out"),
           "HOME": str(tmp_path), "BENCH_COLUMNS": "triton eager-cl"}
    result = subprocess.run(["bash", str(script), *steps.split()], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    logged = calls.read_text()
    assert "pip install --no-build-isolation --no-deps -e ." in logged
    for text in runs + ["--columns triton eager-cl"] * ("bench_model.py" in str(runs)):
        assert text in logged, (text, logged)
    for text in skips:
        assert text not in logged, (text, logged)


def test_bench_cpu_smoke(tmp_path):
    pytest.importorskip("fused_resnet._C")
    result = run_script("bench_cpu.py", "--smoke", "--out", str(tmp_path))
    assert "geometric-mean speed-up" in result.stdout
    lines = (only_folder(tmp_path) / "cpu-blocks-smoke.csv").read_text().splitlines()
    assert lines[0].startswith("block,batch,dtype,layout,mode,fused_ms")
    assert len(lines) == 1 + 2 * 2 * 2  # 2 blocks x 2 layouts x 2 modes


def test_bench_host_times_both_settings():
    skip_without_triton()  # the script stubs the interpreter's launches
    result = run_script("bench_host.py", "--arch", "cifar_resnet20", "--image-size", "8",
                        "--repeat", "1")
    lines = result.stdout.splitlines()
    assert lines[0].startswith("cifar_resnet20 bf16 batch 1 at 8x8") and "19 launches" in lines[0]
    assert lines[1].split()[0] == "plans" and lines[2].split()[:2] == ["no", "plans"]
    assert all(float(line.split(" ms a call")[0].split()[-1]) > 0 for line in lines[1:3])
