"""`triton.launch.launch`: an autotuned conv kernel goes through its autotuner once per tuning
key, then straight to its JIT function with the config the autotuner chose. Checked with a
stand-in autotuner (the real ones cannot tune without a GPU) and against the interface of the
real kernels (the attributes `launch` reads). Under torch's profiler each launch is a range
named by its kernel and variant."""

import pytest
import torch

from tests._backends import skip_without_triton


class _Recorder:
    """Records launches: `tuner[grid](...)` as "tuned", `tuner.fn[grid](...)` or
    `tuner.fn.run(..., grid=, warmup=)` (JITFunction's) as "direct"."""

    def __init__(self, calls, how):
        self.calls, self.how = calls, how

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.how, args, kwargs))

    def run(self, *args, grid, warmup, **kwargs):
        assert warmup is False
        self.calls.append((self.how, args, dict(kwargs, grid=grid)))


class _FakeTuner:
    """The Autotuner attributes `launch` uses; picks BLOCK_M = 32 for M < 100, else 128."""

    arg_names = ["x_ptr", "M", "C", "KH"]
    keys = ["M", "C", "KH"]

    def __init__(self):
        import triton

        self.calls = []
        self.fn = _Recorder(self.calls, "direct")
        self._tuner = _Recorder(self.calls, "tuned")
        self._config = triton.Config
        self.best_config = None

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            block_m = 32 if args[1] < 100 else 128
            self.best_config = self._config({"BLOCK_M": block_m}, num_warps=4, num_stages=3)
            self._tuner[grid](*args, **kwargs)
        return run


@pytest.fixture
def unpinned(monkeypatch):
    skip_without_triton()
    from fused_resnet.triton import launch

    monkeypatch.setattr(launch, "pinned_config", lambda: None)
    launch.clear_launch_cache()
    yield launch
    launch.clear_launch_cache()


def test_tuned_once_per_key_then_launched_with_the_chosen_config(unpinned):
    tuner = _FakeTuner()
    x16, x32 = torch.zeros(1, dtype=torch.float16), torch.zeros(1)
    for args, kwargs in [((x16, 50, 8), {"KH": 3}), ((x16, 50, 8), {"KH": 3}),
                         ((x16, 500, 8), {"KH": 3}), ((x16, 500, 8), {"KH": 3}),
                         ((x16, 50, 8), {"KH": 1}), ((x32, 50, 8), {"KH": 3}),
                         ((x16, 50, 8), {"KH": 3})]:
        unpinned.launch(tuner, None, *args, **kwargs)
    how = [(h, a[1], k.get("KH"), k.get("BLOCK_M")) for h, a, k in tuner.calls]
    assert how == [("tuned", 50, 3, None), ("direct", 50, 3, 32),
                   ("tuned", 500, 3, None), ("direct", 500, 3, 128),
                   ("tuned", 50, 1, None),  # KH is a key argument, passed by keyword
                   ("tuned", 50, 3, None),  # another dtype
                   ("direct", 50, 3, 32)]
    direct = tuner.calls[1][2]
    assert direct["num_warps"] == 4 and direct["num_stages"] == 3


def test_compile_only_launches_cache_nothing(unpinned, monkeypatch):
    monkeypatch.setattr(unpinned, "compile_only_arch", lambda: 90)
    tuner = _FakeTuner()
    for _ in range(2):
        unpinned.launch(tuner, None, torch.zeros(1), 50, 8, KH=3)
    assert [h for h, _, _ in tuner.calls] == ["tuned", "tuned"]


def test_the_real_kernels_have_what_launch_reads():
    skip_without_triton()
    import inspect

    from triton.runtime.autotuner import Autotuner

    from fused_resnet.triton.autotune import CONV_TUNING_KEY, FWD_CONFIGS
    from fused_resnet.triton.conv import _conv_fwd_kernel
    from fused_resnet.triton.conv_bwd import _conv_dgrad_kernel, _conv_wgrad_kernel

    # The transformed-operand loops and the statistics epilogue tune apart from the plain
    # kernel of the same shape (a bottleneck's conv3 and its projection), and so do conv 3's
    # statistics pass and its block-ending pass.
    for kernel, variant in ((_conv_fwd_kernel, ["PROLOGUE", "STATS", "STATS_ONLY", "BN_OUT"]),
                            (_conv_dgrad_kernel, ["BN_BWD", "REDUCE", "REDUCE_ACT"]),
                            (_conv_wgrad_kernel, ["PROLOGUE", "BN_BWD", "ACT", "SUB"])):
        assert isinstance(kernel, Autotuner) and hasattr(kernel, "fn")
        assert list(kernel.keys) == CONV_TUNING_KEY + variant
        assert set(kernel.keys) <= set(kernel.arg_names)
    assert "self.best_config = config" in inspect.getsource(Autotuner.run)
    # a tuned launch calls JITFunction.run(*args, grid=, warmup=False, **kwargs) directly
    run = inspect.signature(type(_conv_fwd_kernel.fn).run).parameters
    assert run["grid"].kind == run["warmup"].kind == inspect.Parameter.KEYWORD_ONLY
    kwargs = FWD_CONFIGS[0].all_kwargs()
    assert {"BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"} <= set(kwargs)


def test_a_launch_that_chose_no_config_caches_nothing(unpinned):
    """A stale best_config from an earlier launch is not taken for this key's choice."""
    tuner = _FakeTuner()
    unpinned.launch(tuner, None, torch.zeros(1), 50, 8, KH=3)  # chooses BLOCK_M 32
    silent = _Recorder(tuner.calls, "tuned")
    tuner.__class__ = type("_Silent", (_FakeTuner,), {"__getitem__": lambda self, g: silent[g]})
    for _ in range(2):
        unpinned.launch(tuner, None, torch.zeros(1), 500, 8, KH=3)
    assert [h for h, _, _ in tuner.calls] == ["tuned", "tuned", "tuned"]


def test_a_prepared_launch_runs_the_config_once_known_and_asks_again(unpinned, monkeypatch):
    from fused_resnet.triton.config import TileConfig

    tuner = _FakeTuner()
    prepared = unpinned.PreparedLaunch(tuner, lambda meta: (1000 // meta["BLOCK_M"],),
                                       {"KH": 3})
    x = torch.zeros(1, dtype=torch.float16)

    def calls(n):
        tuner.calls.clear()
        for _ in range(n):
            prepared(x, 50, 8)
        return [(h, a[1:], k.get("KH"), k.get("BLOCK_M"), k.get("grid"))
                for h, a, k in tuner.calls]

    # the first launch tunes (through `launch`); later ones run the choice, grid evaluated
    tuned, chosen = ("tuned", (50, 8), 3, None, None), ("direct", (50, 8), 3, 32, (31,))
    assert calls(3) == [tuned, chosen, chosen]
    unpinned.clear_launch_cache()  # forgotten choices: tuned again
    assert calls(2) == [tuned, chosen]
    monkeypatch.setattr(unpinned, "pinned_config", lambda: TileConfig(16, 64, 32))
    assert calls(2) == [("direct", (50, 8), 3, 16, None),  # `launch`'s pinned launch
                        ("direct", (50, 8), 3, 16, (62,))]
    monkeypatch.setattr(unpinned, "compile_only_arch", lambda: 90)
    unpinned.clear_launch_cache()
    assert [h for h, *_ in calls(2)] == ["direct", "direct"]  # never prepared: no grid
    assert all(k.get("grid") is None for _, _, k in tuner.calls)


def test_launches_are_profiler_ranges_named_by_variant(monkeypatch):
    """While torch's profiler records, each conv launch runs in a range 'fr::<kernel> <k>x<k>
    <flags>' (so a profile's table separates, e.g., the forward with the BN + ReLU prologue
    from the plain one); otherwise no range is entered."""
    skip_without_triton()
    from torch.profiler import profile

    from fused_resnet.triton.conv import conv_fwd
    from fused_resnet.triton.conv_bwd import conv_wgrad

    cl = torch.channels_last
    x = torch.randn(2, 32, 5, 5).contiguous(memory_format=cl)  # 32 channels: per tap
    w = torch.randn(4, 32, 3, 3)
    v = torch.rand(32) + 0.5
    with profile() as prof:
        out, _ = conv_fwd(x, w, stride=1, padding=1, in_scale=v, in_shift=v, in_relu=True,
                          stats=True)
        conv_fwd(x, w[:, :, :1, :1], stride=1, padding=0)
        conv_wgrad(x, out, w.shape, stride=1, padding=1)
        conv_fwd(x[:, :3], w[:, :3], stride=2, padding=1)  # 3 channels: flattened K
    names = {event.key for event in prof.key_averages()}
    assert {"fr::conv_fwd 3x3 prologue stats", "fr::conv_fwd 1x1", "fr::conv_wgrad 3x3",
            "fr::conv_fwd 3x3 flat_k"} <= names
    # `bench --profile`'s table of them: one row each, launches and time per step
    from fused_resnet.bench.profile import variant_table

    table = variant_table(prof.key_averages(), "cpu", steps=1)
    rows = [line for line in table.splitlines() if line.startswith("| conv_")]
    assert len(rows) == 4 and "| conv_fwd 3x3 prologue stats | 1 | " in table
    assert variant_table([], "cpu", steps=1) == ""
    # on a GPU a range is also listed on the device timeline: only the host one is a row
    from types import SimpleNamespace

    device_copy = SimpleNamespace(key="fr::conv_fwd 1x1", device_type="DeviceType.CUDA",
                                  count=1, cpu_time_total=5.0)
    assert variant_table([device_copy], "cpu", steps=1) == ""

    def refuse(*args, **kwargs):
        raise AssertionError("a profiler range was entered without a profiler")

    monkeypatch.setattr(torch.profiler, "record_function", refuse)
    conv_fwd(x, w, stride=1, padding=1)


def test_launches_count_their_work_when_asked():
    """Inside `counting_work` each launch adds its work to its range's row: a conv
    2 * M * C_out * C_in * KH * KW FLOPs, and every kernel (an elementwise one through `run`
    too) the bytes of its distinct tensor arguments, a tensor passed twice (a stand-in
    pointer) once; outside it (even under the profiler) nothing. `variant_table` divides
    them by the profiled time."""
    skip_without_triton()
    from torch.profiler import profile

    from fused_resnet.bench.profile import _rates, variant_table
    from fused_resnet.triton import launch
    from fused_resnet.triton.conv import conv_fwd
    from fused_resnet.triton.eltwise import bn_act_fwd

    cl = torch.channels_last
    x = torch.randn(2, 32, 5, 5).contiguous(memory_format=cl)
    w = torch.randn(8, 32, 3, 3)
    y, r = (torch.randn(2, 8, 5, 5).contiguous(memory_format=cl) for _ in range(2))
    v = torch.rand(8)

    def step():
        for _ in range(2):
            conv_fwd(x, w, stride=1, padding=1)
        bn_act_fwd(y, v, v + 1, residual=r)

    with launch.counting_work() as counted:
        step()
    m = 2 * 5 * 5  # output pixels
    conv_bytes = 4 * (x.numel() + w.numel() + m * 8)  # x, w read, out written; fp32
    work = {"fr::conv_fwd 3x3": [2, 2 * 2 * m * 8 * 32 * 9, 2 * conv_bytes],
            "fr::bn_act_fwd has_res": [1, 0, 4 * (3 * y.numel() + 2 * 8)]}
    assert counted == work
    with profile() as prof:  # not counted
        step()
    assert counted == work
    with launch.counting_work() as again:  # starts from nothing
        assert again == {}

    table = variant_table(prof.key_averages(), "cpu", steps=1, work=work, peak=(1.0, 1.0))
    assert "| kernel variant | launches a step | ms a step | share | TFLOP/s | GB/s | " \
           "% roofline |" in table
    assert "| conv_fwd 3x3 | 2 | " in table and "| bn_act_fwd has_res | 1 | " in table
    assert table.splitlines()[-1].startswith("| all | | ")
    # 2 GFLOP and 1 GB in 4 ms: 0.5 TFLOP/s, 250 GB/s; at 1 TFLOP/s and 1 TB/s they need
    # max(2 ms, 1 ms): 50% of the roofline
    assert _rates(4.0, 2e9, 1e9, (1.0, 1.0)) == " 0.5 | 250 | 50% |"
    assert _rates(4.0, 0, 1e9, None) == " - | 250 | - |"
