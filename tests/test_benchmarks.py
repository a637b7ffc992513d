"""The benchmark scripts run (tiny shapes on CPU): a smoke test of the code, not of speed."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_ops_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_ops.py"), "--smoke", "--out",
         str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "| fused " in result.stdout and "| eager " in result.stdout
    csvs = list(tmp_path.glob("*-ops-smoke.csv"))
    assert len(csvs) == 1
    lines = csvs[0].read_text().splitlines()
    assert lines[0].startswith("shape,batch,dtype,mode,impl,ms")
    assert len(lines) == 1 + 2 * 3 * 2  # 2 shapes x 3 modes x 2 impls
    assert (tmp_path / csvs[0].name.replace(".csv", ".md")).exists()


def test_bench_model_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_model.py"), "--smoke", "--out",
         str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    for column in ("fused_resnet[auto]", "eager NCHW", "eager channels_last"):
        assert column in result.stdout
    csvs = list(tmp_path.glob("*-model-smoke.csv"))
    assert len(csvs) == 1
    rows = csvs[0].read_text().splitlines()
    assert len(rows) == 1 + 3 * 3  # 3 settings (train, infer, infer batch 1) x 3 columns
    assert "fused_speedup" in rows[0]


def test_bench_blocks_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_blocks.py"), "--smoke", "--out",
         str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    csvs = list(tmp_path.glob("*-blocks-smoke.csv"))
    assert len(csvs) == 1
    lines = csvs[0].read_text().splitlines()
    # 2 blocks x 2 modes x (fused, eager), plus "fused single" in eval for the identity block
    assert len(lines) == 1 + 2 * 2 * 2 + 1
    assert sum(",fused single," in line for line in lines) == 1


def test_bench_cpu_smoke(tmp_path):
    pytest.importorskip("fused_resnet._C")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_cpu.py"), "--smoke", "--out",
         str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "geometric-mean speed-up" in result.stdout
    csvs = list(tmp_path.glob("cpu-*-cpu-smoke.csv"))
    assert len(csvs) == 1
    lines = csvs[0].read_text().splitlines()
    assert lines[0].startswith("block,batch,dtype,layout,mode,fused_ms")
    assert len(lines) == 1 + 2 * 2 * 2  # 2 blocks x 2 layouts x 2 modes
