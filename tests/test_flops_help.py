"""`flops --help` gives the input size `flops` counts at: 224, 32 for CIFAR nets, whatever
the device (validate's own help keeps its CPU default)."""

import pytest

from fused_resnet.__main__ import build_parser, main


def _help(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse's line breaks undone


def test_flops_help_states_the_size_it_counts_at(capsys):
    text = _help("flops", capsys)
    assert "input height = width (default 224; 32 for CIFAR nets)" in text
    assert "64 on CPU" not in text
    assert main(["flops", "--arch", "cifar_resnet20"]) == 0
    assert "at input (1, 3, 32, 32)" in capsys.readouterr().out
    assert main(["flops", "--arch", "resnet18"]) == 0  # on CPU too
    assert "at input (1, 3, 224, 224)" in capsys.readouterr().out


def test_validate_help_keeps_its_cpu_default(capsys):
    assert "(default 224; 32 for CIFAR nets; 64 on CPU)" in _help("validate", capsys)
