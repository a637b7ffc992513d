"""Where benchmark results go and how they are written: one folder per device and date,
`<out>/<device>-<date>/`, holding `<kind>.csv`, `<kind>.json`, `<kind>.md` and `<kind>.png`
for each kind of run (model, blocks, flops-table, ...)."""

from __future__ import annotations

import datetime
import json
import os
import re
from collections.abc import Sequence

import torch

from fused_resnet.table import format_table, pyplot, write_csv


def device_label() -> str:
    """The GPU's name, or "cpu"."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def versions() -> str:
    """"torch X, triton Y" (Triton when importable)."""
    try:
        import triton
    except ImportError:
        return f"torch {torch.__version__}"
    return f"torch {torch.__version__}, triton {triton.__version__}"


def report_header(title: str, details: str) -> str:
    """A markdown title line naming the device, torch and Triton versions and the date."""
    return f"# {title} on {device_label()}, {versions()}, {details}, {datetime.date.today()}\n\n"


def results_dir(out: str) -> str:
    """`<out>/<device>-<date>` (created): the folder of one day's runs on this device."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", device_label())
    path = os.path.join(out, f"{name}-{datetime.date.today()}")
    os.makedirs(path, exist_ok=True)
    return path


def write_report(rows: list[dict], stem: str, text: str, *, as_json: bool = False) -> None:
    """`rows` to `<stem>.csv` (and `<stem>.json` with the versions when `as_json`), the
    printed report `text` to `<stem>.md`."""
    write_csv(f"{stem}.csv", rows)
    if as_json:
        with open(f"{stem}.json", "w") as f:
            json.dump({"device": device_label(), "versions": versions(),
                       "date": str(datetime.date.today()), "rows": rows}, f, indent=1)
    with open(f"{stem}.md", "w") as f:
        f.write(text + "\n")


def fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    """A number formatted by `spec`, or "-" for None."""
    return "-" if value is None or value == "" else f"{value:{spec}}{suffix}"


def model_table(rows: list[dict]) -> str:
    """The suite's rows as one markdown table, grouped by setting."""
    return format_table(
        ("dtype", "mode", "batch", "column", "ms p50", "ms p20-p90", "img/s", "TFLOP/s",
         "% peak", "act. MiB", "peak MiB", "vs eager CL", "vs compile"),
        [(r["dtype"], r["mode"], r["batch"], r["column"], "error: " + r["error"], "", "", "",
          "", "", "", "", "") if r["error"] else
         (r["dtype"], r["mode"], r["batch"], r["column"], fmt(r["ms"]),
          f"{r['ms_p20']:.2f}-{r['ms_p90']:.2f}", fmt(r["images_per_s"], ".1f"),
          fmt(r["tflops"], ".3f"), fmt(r["pct_peak"], ".1f"), fmt(r["activation_mib"], ".4g"),
          fmt(r["peak_mib"], ".4g"), fmt(r["vs_eager_cl"], ".2f", "x"),
          fmt(r["vs_compile"], ".2f", "x")) for r in rows])


def plot_bars(rows: list[dict], path: str, group_keys: Sequence[str], value: str,
              ylabel: str) -> bool:
    """A grouped bar chart of `value` per column, one group per distinct `group_keys` tuple,
    saved to `path`. Returns False (and says so) when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    ok = [r for r in rows if not r.get("error")]
    groups = list(dict.fromkeys(tuple(r[k] for k in group_keys) for r in ok))
    columns = list(dict.fromkeys(r["column"] for r in ok))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(groups)), 4.0))
    width = 0.8 / max(1, len(columns))
    for i, column in enumerate(columns):
        values = [next((r[value] for r in ok if r["column"] == column and
                        tuple(r[k] for k in group_keys) == g), 0.0) for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], values, width, label=column)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels(["\n".join(map(str, g)) for g in groups], fontsize=7)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
