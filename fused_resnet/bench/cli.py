"""`python -m fused_resnet bench`: arguments and the runs they start.

    bench [--arch resnet50] [--dtypes bf16 fp16 ...] [--batch-sizes 256 ...] [--columns ...]
          [--modes train infer latency] [--cuda-graphs] [--layout channels_last|nchw]
    bench --stages [--write-table [PATH]]     per-block breakdown (+ the per-shape auto table)
    bench --flops-table [--archs ...]         the family's MACs, params, latency and img/s
    bench --profile COLUMN                    torch.profiler's per-kernel table of one column

Results go to `<--out>/<device>-<date>/` (model / blocks / flops-table .csv .json .md .png);
the markdown table is printed too. `--no-save` writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from fused_resnet.bench.hardware import default_device
from fused_resnet.bench.report import (
    fmt,
    model_table,
    plot_bars,
    report_header,
    results_dir,
    write_report,
)
from fused_resnet.bench.suite import BENCH_DTYPES, COLUMNS, MODES, SuiteConfig, run_suite
from fused_resnet.flags import check_at_least
from fused_resnet.models import build_model
from fused_resnet.table import format_table


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-sizes", "--batch-size", dest="batch_sizes", type=int, nargs="+",
                   default=None, help="train / infer batch sizes (default 256 on GPU, 8 on CPU)")
    p.add_argument("--latency-batch", type=int, default=1, help="latency batch (default 1)")
    p.add_argument("--dtypes", "--dtype", dest="dtypes", nargs="+", choices=BENCH_DTYPES,
                   default=None, help="fp32 (TF32 off), tf32, or bf16 / fp16 autocast "
                   "(default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help=f"what to time (default: all of {' '.join(MODES)})")
    p.add_argument("--columns", nargs="+", choices=COLUMNS, default=None,
                   help="fused backends and baselines to time (default: all that run at full "
                        "speed here)")
    p.add_argument("--layout", choices=("channels_last", "nchw"), default="channels_last",
                   help="input memory format of the fused and compiled columns (default "
                        "channels_last)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay every step (training too) from a CUDA graph")
    p.add_argument("--measure-peaks", action="store_true",
                   help="'%% peak' over a matrix product measured here, not the datasheet")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs on CPU (default 2)")
    p.add_argument("--iters", type=int, default=5, help="timed runs on CPU (default 5)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--stages", action="store_true",
                   help="per-block breakdown instead of the whole model")
    p.add_argument("--write-table", nargs="?", const="", default=None, metavar="PATH",
                   help="with --stages: record each block shape's fastest backend in the "
                        "per-shape auto table (default: the packaged table)")
    p.add_argument("--flops-table", action="store_true",
                   help="the family's MACs, params, latency and img/s in one table")
    p.add_argument("--archs", nargs="+", default=None, help="with --flops-table: the archs")
    p.add_argument("--profile", default=None, choices=COLUMNS, metavar="COLUMN",
                   help="print torch.profiler's per-kernel table of this column's runs")
    p.add_argument("--trace", default=None, metavar="PREFIX",
                   help="with --profile: also write each setting's Chrome trace to "
                        "PREFIX-<dtype>-<mode>-<batch>.json.gz")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"),
                   help="results folder (default benchmarks/results)")
    p.add_argument("--no-save", action="store_true", help="print only, write no files")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def check_writable_file(path: str, name: str) -> None:
    """Raises ValueError naming the flag `name` where a file cannot be written at `path`
    (checked before a long run, by creating and removing a file beside it; nothing else
    changes)."""
    import tempfile

    if os.path.isdir(path):
        raise ValueError(f"{name} {path!r} is a folder; it takes a file path")
    try:
        with tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(path))):
            pass
        if os.path.exists(path):
            with open(path, "a"):
                pass
    except OSError as exc:
        raise ValueError(f"{name} {path!r} cannot be written ({exc.strerror or exc})") from None


def check_writable_folder(path: str, name: str) -> None:
    """Raises ValueError naming the flag `name` where `path` is not a folder files can be
    written in; creates it (and its parents) where missing."""
    import tempfile

    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ValueError(f"{name} {path!r} is not a folder files can be written in "
                         f"({exc.strerror or exc})") from None


def check_arguments(args: argparse.Namespace) -> None:
    """Raises ValueError naming the flag: a bad number, or flags that do not combine."""
    runs = [name for name, on in (("--stages", args.stages), ("--flops-table", args.flops_table),
                                  ("--profile", args.profile is not None)) if on]
    if len(runs) > 1:
        raise ValueError(f"{' and '.join(runs)} are separate runs; give one of them")
    if args.write_table is not None and not args.stages:
        raise ValueError("--write-table needs --stages (the table comes from block timings)")
    if args.trace is not None and not args.profile:
        raise ValueError("--trace needs --profile (the trace is of the profiled column)")
    if args.archs is not None and not args.flops_table:
        raise ValueError("--archs needs --flops-table (the other runs take one --arch)")
    if args.batch_sizes is not None and min(args.batch_sizes) < 1:
        raise ValueError(f"--batch-sizes: batch sizes must be >= 1, got "
                         f"{' '.join(map(str, args.batch_sizes))}")
    for name, low in (("latency_batch", 1), ("image_size", 1), ("iters", 1), ("warmup", 0)):
        check_at_least(args, name, low)
    device = default_device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        raise ValueError(f"--cuda-graphs needs a CUDA device, got {device}")


def check_outputs(args: argparse.Namespace) -> None:
    """Raises ValueError naming the flag where an output cannot be written, before the run
    (creates the --out folder)."""
    if not args.no_save and not args.profile:  # first: a table may go into this folder
        check_writable_folder(args.out, "--out")
    if args.write_table is not None:
        from fused_resnet import tuning

        path = args.write_table or str(tuning.PACKAGED_TABLE)
        check_writable_file(path, "--write-table")
        if os.path.exists(path):
            try:
                tuning.load_table(Path(path))
            except (ValueError, OSError) as exc:  # json's errors are ValueErrors
                raise ValueError(f"--write-table {path!r}: {exc}") from None
    if args.trace is not None:
        check_writable_file(f"{args.trace}-trace.json.gz", "--trace")


def config_from(args: argparse.Namespace) -> SuiteConfig:
    gpu = default_device(args.device).type == "cuda"
    return SuiteConfig(
        arch=args.arch, variant=args.variant or "v1.5",
        batch_sizes=tuple(args.batch_sizes or ((256,) if gpu else (8,))),
        latency_batch=args.latency_batch,
        dtypes=tuple(args.dtypes or (("bf16",) if gpu else ("fp32",))),
        modes=tuple(args.modes), columns=tuple(args.columns) if args.columns else None,
        image_size=args.image_size, layout=args.layout, cuda_graphs=args.cuda_graphs,
        measure_peaks=args.measure_peaks,
        warmup=args.warmup, iters=args.iters, device=args.device)


def cmd_bench(args: argparse.Namespace) -> int:
    check_arguments(args)
    cfg = config_from(args)
    cfg.check()
    check_outputs(args)
    if args.profile:
        from fused_resnet.bench.profile import profile_column

        print(profile_column(cfg, args.profile, trace=args.trace))
        return 0
    if args.flops_table:
        return _flops_table(args, cfg)
    if args.stages:
        return _stages(args, cfg)
    rows = run_suite(cfg, progress=not args.no_progress)
    details = (f"{cfg.arch}, input {rows[0]['image_size']}x{rows[0]['image_size']}, "
               f"{cfg.layout}{', CUDA graphs' if cfg.cuda_graphs else ''}")
    text = report_header("fused_resnet bench", details) + model_table(rows)
    print(text)
    # A CUDA-graph run (benchmarks/run_all.py's second step) beside the eager one, not over it.
    _save(args, "model-graphs" if cfg.cuda_graphs else "model", rows, text,
          ("dtype", "mode", "batch"), "images_per_s", "images / s")
    return 0 if not any(r["error"] for r in rows) else 1


def short_benchmark(arch: str, variant: str, backend: str, dtype: str, device=None,
                    columns=None, image_size=None, batch: int = 64) -> str:
    """The benchmark `validate` prints after a passing run on a GPU: the model on `backend`
    against eager channels_last and torch.compile, training, inference at `batch`, latency."""
    cfg = SuiteConfig(arch, variant, batch_sizes=(batch,), dtypes=(dtype,),
                      columns=tuple(columns or (backend, "eager-cl", "compile")),
                      image_size=image_size, device=device)
    return (f"short benchmark ({dtype}, batch {batch} and 1; the full run is "
            f"`python -m fused_resnet bench`):\n\n{model_table(run_suite(cfg))}")


def _stages(args: argparse.Namespace, cfg: SuiteConfig) -> int:
    from fused_resnet import tuning
    from fused_resnet.bench.blocks import bench_stages, fastest_backends

    rows = []
    for dtype in cfg.dtypes:
        for batch in cfg.batch_sizes:
            rows += bench_stages(cfg.arch, batch=batch, dtype=dtype, image_size=cfg.image_size,
                                 device=cfg.device, warmup=cfg.warmup, iters=cfg.iters,
                                 channels_last=cfg.layout == "channels_last",
                                 variant=cfg.variant)
    best = fastest_backends(rows)
    for r in rows:
        times = {q["column"]: q["ms"] for q in rows if q["key"] == r["key"]}
        r["vs_reference"] = times["reference"] / r["ms"] if "reference" in times else None
        r["auto_table"] = best.get(r["key"], "")
    text = report_header(f"fused_resnet bench --stages: {cfg.arch} blocks", cfg.layout)
    text += format_table(
        ("block", "input", "dtype", "batch", "mode", "column", "ms p50", "ms p20-p80",
         "TFLOP/s", "vs reference", "fastest backend"),
        [(r["block"], r["input"], r["dtype"], r["batch"], r["mode"], r["column"],
          f"{r['ms']:.3f}", f"{r['ms_p20']:.3f}-{r['ms_p80']:.3f}", f"{r['tflops']:.2f}",
          fmt(r["vs_reference"], ".2f", "x"), r["auto_table"]) for r in rows])
    print(text)
    _save(args, "blocks", rows, text, ("block", "mode", "dtype", "batch"), "tflops",
          "TFLOP/s")
    if args.write_table is not None:
        path = Path(args.write_table) if args.write_table else tuning.PACKAGED_TABLE
        device = default_device(cfg.device)
        tuning.save_entries(path, tuning.device_key(device), best)
        print(f"\nwrote {len(best)} entries for {tuning.device_key(device)!r} to {path}",
              file=sys.stderr)
    return 0


def _flops_table(args: argparse.Namespace, cfg: SuiteConfig) -> int:
    from fused_resnet.bench.family import FAMILY, family_text, flops_table

    columns = cfg.columns or ("auto", "eager-cl")
    for arch in args.archs or ():  # every name before the first arch is timed
        try:
            with torch.device("meta"):
                build_model(arch)
        except ValueError as exc:
            raise ValueError(f"--archs {arch}: {exc}") from None
    rows = flops_table(tuple(args.archs or FAMILY), batch=cfg.batch_sizes[0],
                       dtype=cfg.dtypes[0], columns=columns, image_size=cfg.image_size,
                       variant=cfg.variant, latency_batch=cfg.latency_batch,
                       device=cfg.device, warmup=cfg.warmup,
                       iters=cfg.iters, progress=not args.no_progress)
    text = report_header("fused_resnet bench --flops-table",
                         f"{cfg.dtypes[0]}, input {rows[0]['image_size']}, latency at batch "
                         f"{cfg.latency_batch}, img/s at batch {cfg.batch_sizes[0]}")
    text += family_text(rows, columns)
    print(text)
    _save(args, "flops-table", rows, text, None, None, None)
    return 0


def _save(args, kind: str, rows: list[dict], text: str, group_keys, value, ylabel) -> None:
    if args.no_save:
        return
    folder = results_dir(args.out)
    stem = os.path.join(folder, kind)
    write_report(rows, stem, text, as_json=True)
    wrote = [".csv", ".json", ".md"]
    if group_keys and plot_bars(rows, f"{stem}.png", group_keys, value, ylabel):
        wrote.append(".png")
    print(f"\nwrote {stem}{{{','.join(wrote)}}}", file=sys.stderr)


def run_preset(doc: str, preset, default_out, argv=None) -> int:
    """Main of a benchmark script that is `bench` with fixed defaults: `preset(smoke, out)`
    gives the `bench` arguments; `--smoke` (tiny CPU shapes) and `--out` are the script's,
    every other argument is passed on to `bench` after the preset's, so it wins."""
    from fused_resnet.__main__ import main as cli

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes: the code path")
    parser.add_argument("--out", default=str(default_out), help="results folder")
    args, rest = parser.parse_known_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("this run is meant for a GPU; use --smoke on CPU (or `python -m "
                     "fused_resnet bench`, whose defaults suit a CPU)")
    return cli(preset(args.smoke, args.out) + rest)
