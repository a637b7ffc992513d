"""The benchmark library (`fused_resnet.bench`) on CPU: configuration errors, rows, ratios,
timers, GPU peaks, and a pytest-benchmark smoke suite of fused vs eager steps on tiny shapes
(it times the code paths the GPU run times; the numbers here are not targets)."""

import copy

import pytest
import torch
from torch import nn

import fused_resnet as fr
from fused_resnet.bench import SuiteConfig, Timing, run_suite, time_columns
from fused_resnet.bench.hardware import device_peak, percent_of_peak
from fused_resnet.bench.suite import add_ratios
from fused_resnet.bench.timing import activation_bytes
from fused_resnet.nn import FusedBasicBlock, FusedBottleneck
from fused_resnet.testing import compare

TINY = dict(arch="cifar_resnet20", image_size=8, batch_sizes=(2,), dtypes=("fp32",),
            warmup=1, iters=2)


@pytest.mark.parametrize("field, value, message", [
    ("dtypes", ("fp8",), "dtypes must be a non-empty subset"),
    ("dtypes", (), "dtypes must be a non-empty subset"),
    ("modes", ("backward",), "modes must be a non-empty subset"),
    ("columns", ("tensorrt",), "columns must be a non-empty subset"),
    ("batch_sizes", (0,), "batch sizes must be >= 1"),
    ("latency_batch", 0, "batch sizes must be >= 1"),
    ("layout", "nhwc", "layout must be 'channels_last' or 'nchw'"),
    ("iters", 0, "iters must be >= 1"),
])
def test_bad_config_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        run_suite(SuiteConfig(**{**TINY, field: value}), progress=False)


def test_fp16_training_steps_go_through_a_grad_scaler(monkeypatch):
    """Every column's fp16 training step scales its loss and steps through a GradScaler
    (fp16 training without one underflows its gradients); the other dtypes' do not. The
    optimizer starts from zero momentum buffers (fused on CUDA)."""
    steps = []
    stock = torch.amp.GradScaler.step
    monkeypatch.setattr(torch.amp.GradScaler, "step",
                        lambda self, opt, *a, **k: steps.append(opt) or stock(self, opt, *a, **k))
    rows = run_suite(SuiteConfig(**{**TINY, "dtypes": ("fp16", "fp32"), "modes": ("train",),
                                    "columns": ("reference", "eager-cl")}), progress=False)
    assert [r["error"] for r in rows] == [""] * 4
    # fp16: the first call and warmup + iters timed calls per column; fp32: none
    assert len(steps) == 2 * (1 + TINY["warmup"] + TINY["iters"])
    opt = steps[0]
    assert opt.defaults["fused"] is None  # CPU: the stock update
    assert all("momentum_buffer" in opt.state[p] for p in opt.param_groups[0]["params"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA graphs run here")
def test_cuda_graphs_need_cuda():
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        run_suite(SuiteConfig(**TINY, cuda_graphs=True), progress=False)


def test_suite_rows_ratios_and_a_failing_column():
    """Every (setting, column) gets a row; eager channels_last is the 1.00x of its setting;
    a column that cannot run here becomes a row with its error, not a crash."""
    columns = ("reference", "eager-cl", "cuda" if not torch.cuda.is_available() else "cpu")
    rows = run_suite(SuiteConfig(**TINY, columns=columns), progress=False)
    assert [(r["mode"], r["batch"]) for r in rows[::3]] == [("train", 2), ("infer", 2),
                                                              ("latency", 1)]
    for r in rows:
        if r["column"] == "eager channels_last":
            assert r["vs_eager_cl"] == pytest.approx(1.0) and r["error"] == ""
        elif r["column"] == "fused reference":
            assert r["ms"] > 0
            assert r["images_per_s"] == pytest.approx(r["batch"] / r["ms"] * 1e3)
            assert r["tflops"] > 0 and r["pct_peak"] is None  # no GPU peak for "cpu"
            assert (r["activation_mib"] or 0) > 0 if r["mode"] == "train" else (
                r["activation_mib"] is None)
        else:
            assert "cannot run" in r["error"] and r["ms"] is None and r["vs_eager_cl"] is None


def test_the_written_operand_column_is_the_triton_model_run_in_that_mode(monkeypatch):
    """"triton-written" builds the Triton model and runs every call of its steps (forward,
    backward) with `config.operands() == "written"`; the other columns keep the default."""
    from fused_resnet.bench import suite
    from fused_resnet.triton import config

    models = suite.build_columns(SuiteConfig(**TINY), fr.models.build_model("cifar_resnet20"),
                                 torch.device("cpu"), ("triton", "triton-written"))
    assert list(models) == ["fused triton", "fused triton, written operands"]
    assert {m.backend for m, _ in models.values()} == {"triton"}
    seen = []
    monkeypatch.setattr(suite, "_step", lambda *a: lambda: seen.append(config.operands()))
    monkeypatch.setattr(suite, "time_columns", lambda fns, *a: {
        k: (fn(), Timing.of([1.0]))[1] for k, fn in fns.items()})
    monkeypatch.setattr(suite, "build_columns", lambda *a: models)
    monkeypatch.setattr(suite, "activation_bytes", lambda *a: 0)
    rows = run_suite(SuiteConfig(**TINY, modes=("train",), columns=("triton", "triton-written"),
                                 device="cpu"), progress=False)
    assert [r["column"] for r in rows] == list(models)
    assert seen == ["on_load", "written"] * 2  # the first call, then the timed one
    assert config.operands() == "on_load"


def test_an_interrupted_run_reports_the_settings_that_finished(monkeypatch):
    """A time limit's SIGINT (KeyboardInterrupt) during the second setting returns the first
    setting's rows; one during the first setting, with nothing to report, propagates."""
    from fused_resnet.bench import suite

    timed = suite._time_setting

    def interrupt_after(n):
        calls = []

        def time_setting(*args):
            calls.append(1)
            if len(calls) > n:
                raise KeyboardInterrupt
            return timed(*args)
        return time_setting

    monkeypatch.setattr(suite, "_time_setting", interrupt_after(1))
    rows = run_suite(SuiteConfig(**TINY, columns=("eager-cl",)), progress=False)
    assert [(r["mode"], r["error"]) for r in rows] == [("train", "")]
    assert rows[0]["vs_eager_cl"] == pytest.approx(1.0)
    monkeypatch.setattr(suite, "_time_setting", interrupt_after(0))
    with pytest.raises(KeyboardInterrupt):
        run_suite(SuiteConfig(**TINY, columns=("eager-cl",)), progress=False)


def test_measured_peaks_give_percentages_on_any_device():
    cfg = SuiteConfig(**{**TINY, "modes": ("latency",)}, columns=("eager-cl",),
                      measure_peaks=True)
    (row,) = run_suite(cfg, progress=False)
    assert row["peak_tflops"] > 0
    assert row["pct_peak"] == pytest.approx(100 * row["tflops"] / row["peak_tflops"])


def test_measure_ceilings_are_positive():
    from fused_resnet.bench.hardware import measure_ceilings

    tflops, tb_s = measure_ceilings(torch.device("cpu"), "fp32", n=128, copy_mib=4)
    assert 0 < tflops < 100 and 0 < tb_s < 100


def test_add_ratios_divides_images_per_second():
    base = dict(arch="a", dtype="bf16", mode="train", batch=8, error="")
    rows = [dict(base, column="fused triton", images_per_s=300.0),
            dict(base, column="eager channels_last", images_per_s=200.0),
            dict(base, column="compile", images_per_s=250.0)]
    add_ratios(rows)
    assert rows[0]["vs_eager_cl"] == pytest.approx(1.5)
    assert rows[0]["vs_compile"] == pytest.approx(1.2)


def test_timing_quantiles_and_interleaving():
    assert Timing.of([5.0]) == Timing(5.0, 5.0, 5.0, 5.0)
    t = Timing.of([float(i) for i in range(1, 12)])  # 1..11
    assert t.median == 6.0 and t.p20 == pytest.approx(3.0) and t.p90 == pytest.approx(10.0)
    calls = []
    time_columns({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                 torch.device("cpu"), warmup=1, iters=2)
    assert calls == ["a", "b"] * 3


def test_activation_bytes_counts_saved_storages_once():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(8, 16)
    # saved: x for the first weight grad, the ReLU output (its mask and the second
    # Linear's input share one storage); parameters are not counted
    assert activation_bytes(model, lambda: model(x)) == 8 * 16 * 4 + 8 * 32 * 4


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H200", "H200 SXM"), ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB"),
    ("NVIDIA L4", "L4"), ("cpu", None)])
def test_device_peaks_by_name(name, expected):
    peak = device_peak(name)
    assert (peak.name if peak else None) == expected


def test_percent_of_peak():
    assert percent_of_peak(494.7, "NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(50.0, 0.01)
    assert percent_of_peak(67.0, "NVIDIA H100 80GB HBM3", "fp32") == pytest.approx(100.0)
    assert percent_of_peak(1.0, "cpu", "bf16") is None


# --- pytest-benchmark smoke suite: fused CPU blocks vs the same blocks on eager ops ---------

BLOCKS = {
    "basic": (lambda b: FusedBasicBlock(16, 16, 1, backend=b), 16),
    "basic-A": (lambda b: FusedBasicBlock(16, 32, 2, shortcut="A", backend=b), 16),
    "bottleneck-proj": (lambda b: FusedBottleneck(32, 8, 2, backend=b), 32),
}


@pytest.fixture(params=["cpu", "reference"])
def bench_backend(request):
    if request.param == "cpu":
        pytest.importorskip("fused_resnet._C")
    return request.param


@pytest.mark.parametrize("block", list(BLOCKS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_block_step_benchmark(benchmark, bench_backend, block, mode):
    make, channels = BLOCKS[block]
    reference = make("reference")
    module = make(bench_backend)
    module.load_state_dict(reference.state_dict())
    x = torch.randn(4, channels, 8, 8).contiguous(memory_format=torch.channels_last)
    module.train(mode == "train")
    reference.train(mode == "train")

    calls = []

    def step():
        calls.append(1)
        if mode == "train":
            xg = x.clone().requires_grad_()
            module(xg).sum().backward()
            return xg.grad
        with torch.no_grad():
            return module(x)

    out = benchmark.pedantic(step, rounds=3, warmup_rounds=1, iterations=1)
    # the timed function computed the right thing (the state after its calls against as many
    # reference calls: 4 here, 1 where pytest-xdist disables pytest-benchmark)
    ref_module = copy.deepcopy(reference)
    for _ in range(len(calls)):
        if mode == "train":
            xg = x.clone().requires_grad_()
            ref_module(xg).sum().backward()
            expected = xg.grad
        else:
            with torch.no_grad():
                expected = ref_module(x)
    assert compare(out, expected, kind="grad" if mode == "train" else "output").ok
    if mode == "train":
        assert torch.allclose(module.bn1.running_mean, ref_module.bn1.running_mean, atol=1e-5)


def test_model_inference_benchmark(benchmark):
    model = fr.models.cifar_resnet(20).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = benchmark.pedantic(lambda: model(x), rounds=3, warmup_rounds=1)
        expected = fr.models.set_backend(copy.deepcopy(model), "reference")(x)
    assert compare(out, expected).ok


# --- on a GPU: every column runs, CUDA graphs replay, memory and peaks are filled -----------

@pytest.mark.gpu
def test_gpu_suite_every_column_runs():
    cfg = SuiteConfig(arch="resnet18", image_size=64, batch_sizes=(8,), dtypes=("bf16", "fp32"),
                      columns=("triton", "cuda", "eager-nchw", "eager-cl", "compile"))
    rows = run_suite(cfg, progress=False)
    assert [r["error"] for r in rows] == [""] * len(rows)
    assert all(r["peak_mib"] > 0 and r["pct_peak"] is not None for r in rows
               if "H100" in r["device"] or "H200" in r["device"])
    # each column's peak above what it found held (every column's model and state): a
    # column's own inference peak is below its training step's
    assert all(r["held_mib"] > 0 for r in rows)
    peaks = {(r["dtype"], r["mode"], r["column"]): r["peak_mib"] for r in rows}
    assert all(peaks[(d, "infer", c)] < peaks[(d, "train", c)] for d, m, c in peaks)


@pytest.mark.gpu
def test_gpu_suite_cuda_graphs():
    cfg = SuiteConfig(arch="resnet18", image_size=64, batch_sizes=(8,), columns=("triton",
                      "cuda", "eager-cl", "compile"), cuda_graphs=True)  # training too
    rows = run_suite(cfg, progress=False)
    assert all(r["cuda_graphs"] and r["error"] == "" for r in rows)


@pytest.mark.gpu
def test_gpu_suite_fp16_training_graphs():
    """fp16 training steps, GradScaler included (the fused SGD's inf check on the device),
    captured and replayed."""
    cfg = SuiteConfig(arch="resnet18", image_size=64, batch_sizes=(8,), dtypes=("fp16",),
                      modes=("train",), columns=("triton", "eager-cl"), cuda_graphs=True)
    rows = run_suite(cfg, progress=False)
    assert len(rows) == 2 and all(r["error"] == "" for r in rows)


@pytest.mark.gpu
def test_gpu_stages_rows_and_table_entries():
    from fused_resnet.bench.blocks import bench_stages, fastest_backends

    rows = bench_stages("resnet50", batch=2, dtype="bf16", image_size=64, iters=2)
    columns = {r["column"] for r in rows}
    assert {"triton", "cuda", "reference", "compile", "triton single"} <= columns
    entries = fastest_backends(rows)
    assert entries and set(entries.values()) <= {"triton", "cuda", "reference"}
