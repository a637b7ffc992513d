"""Command-line flags as the error messages name them: `flag("batch_size")` is
"--batch-size", and `check_at_least` the range check of an optional numeric flag. Shared by
`python -m fused_resnet` (`__main__`), `bench` (bench/cli.py) and `train` (its TrainConfig,
whose fields are train's flags)."""

from __future__ import annotations

import argparse


def flag(name: str) -> str:
    """The command-line spelling of an argument: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def check_at_least(args: argparse.Namespace, name: str, low: int = 1) -> None:
    """Raises ValueError naming the flag where the argument `name` is set and below `low`."""
    value = getattr(args, name, None)
    if value is not None and value < low:
        raise ValueError(f"{flag(name)} must be >= {low}, got {value}")
