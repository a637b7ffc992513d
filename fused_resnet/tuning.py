"""Per-shape backend choice for `backend="auto"`, read from a table of measured block timings.

`auto` on its own picks by device (Triton for CUDA tensors, `_C` for CPU tensors). Where the
per-stage benchmark (`python -m fused_resnet bench --stages --write-table`) measured another
backend faster for a block shape on a device, the table records it, and a block built with
`backend="auto"` runs that backend for calls of that shape. The packaged table is
`fused_resnet/data/auto_backend.json`:

    {"format": 1, "devices": {"<torch.cuda.get_device_name()> | cpu": {"<key>": "<choice>"}}}

with keys from `block_key` and choices among `CHOICES`: a backend, or "triton single" (the
Triton backend with the single-launch inference bottleneck, for eval keys of stride-1
identity bottlenecks, taken by `FusedBottleneck(eval_kernel="auto")`).
`FUSED_RESNET_AUTO_TABLE=<path>` reads another table, `FUSED_RESNET_AUTO_TABLE=off` ignores
tables; a backend set by `FUSED_RESNET_BACKEND` or named by the caller always wins; an entry
naming a backend that cannot run here is ignored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from fused_resnet import backend as _backend

TABLE_ENV = "FUSED_RESNET_AUTO_TABLE"
PACKAGED_TABLE = Path(__file__).resolve().parent / "data" / "auto_backend.json"
TABLE_FORMAT = 1
SINGLE_LAUNCH = "triton single"
CHOICES = (*(b for b in _backend.BACKENDS if b != "auto"), SINGLE_LAUNCH)
BATCH_BUCKETS = (1, 8, 32, 128)  # a batch maps to the first bucket >= it, else "256+"

_tables: dict[str, dict] = {}  # path -> parsed table, read once


def batch_bucket(batch: int) -> str:
    for bucket in BATCH_BUCKETS:
        if batch <= bucket:
            return str(bucket)
    return "256+"


def block_key(kind: str, channels: Sequence[int], strides: Sequence[int], height: int,
              width: int, dtype: torch.dtype, training: bool, batch: int) -> str:
    """"<kind>|<c_in>><c_1>,<c_2>,...|s<s_1>,<s_2>,...|<H>x<W>|<dtype>|<train|eval>|b<bucket>":
    kind is the block class and shortcut ("bottleneck/projection", "/d2" after it for a
    block with convs dilated by 2), channels the input
    channels and each main-path conv's outputs, strides those convs' strides, H x W the
    input's size, dtype the compute dtype (autocast's when enabled)."""
    return (f"{kind}|{channels[0]}>{','.join(map(str, channels[1:]))}|"
            f"s{','.join(map(str, strides))}|"
            f"{height}x{width}|{str(dtype).removeprefix('torch.')}|"
            f"{'train' if training else 'eval'}|b{batch_bucket(batch)}")


def device_key(device: torch.device) -> str:
    """The table's name for `device`: the GPU's name, or "cpu"."""
    if device.type != "cuda":
        return device.type
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


@torch.compiler.assume_constant_result
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def table_path() -> Optional[Path]:
    """The table in use: $FUSED_RESNET_AUTO_TABLE, none when it is "off", else the packaged."""
    value = os.environ.get(TABLE_ENV)
    if value == "off":
        return None
    return Path(value) if value else PACKAGED_TABLE


def load_table(path: Path) -> dict:
    """The parsed table at `path` ({} when the file does not exist); ValueError naming the
    file when it is not a table of this format."""
    key = str(path)
    if key not in _tables:
        if not path.exists():
            _tables[key] = {}
        else:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT or not (
                isinstance(data.get("devices"), dict)
            ):
                raise ValueError(f"{path} is not a backend table of format {TABLE_FORMAT} "
                                 '({"format": 1, "devices": {...}})')
            _tables[key] = data["devices"]
    return _tables[key]


def entries_for(device: torch.device) -> dict[str, str]:
    """{key: backend} measured for `device` in the table in use ({} when there is none, or
    when `FUSED_RESNET_BACKEND` names a backend)."""
    path = table_path()
    if path is None or (os.environ.get(_backend.ENV_VAR) or "auto") != "auto":
        return {}
    return load_table(path).get(device_key(device), {})


# The two lookups below read a file and the environment: torch.compile runs them once while
# tracing and keeps their results as constants (a compiled graph fixes its backends anyway).
@torch.compiler.assume_constant_result
def has_entries(device: torch.device) -> bool:
    """Whether the table in use has entries for `device` (checked on every auto call)."""
    return bool(entries_for(device))


@torch.compiler.assume_constant_result
def tuned_backend(device: torch.device, key: str) -> Optional[str]:
    """The choice the table names for `key` on `device` (one of `CHOICES`), if its backend can
    run here, else None."""
    choice = entries_for(device).get(key)
    if choice not in CHOICES:
        return None
    backend = "triton" if choice == SINGLE_LAUNCH else choice
    return choice if _backend.unavailable_reason(backend, device) is None else None


def save_entries(path: Path, device_name: str, entries: dict[str, str]) -> None:
    """Merges `entries` ({key: fastest choice measured}) into the table at `path` under
    `device_name` (file created if absent); keys measured again are replaced, other keys and
    other devices' entries kept."""
    data = {"format": TABLE_FORMAT, "devices": {}}
    if path.exists():
        data["devices"] = dict(load_table(path))
    merged = {**data["devices"].get(device_name, {}), **entries}
    data["devices"][device_name] = dict(sorted(merged.items()))
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    _tables.pop(str(path), None)
