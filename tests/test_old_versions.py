"""Source rules that keep the package working on the oldest supported versions, which CI does
not install: torch 2.5 (Triton 3.1) up to torch 2.11 (Triton 3.6, the GPU machine's). Each
rule is a failure seen there; README's "Versions" paragraph says how those were run."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fused_resnet"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _is_custom_op(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return ast.unparse(target) == "torch.library.custom_op"


def _custom_op_annotations():
    """(file, function, annotation source) of every custom op's parameters and return."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(map(_is_custom_op, node.decorator_list)):
                args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                for ann in [a.annotation for a in args] + [node.returns]:
                    if ann is not None:
                        yield path.name, node.name, ast.unparse(ann)


def test_the_rule_finds_the_custom_ops():
    functions = {(f, name) for f, name, _ in _custom_op_annotations()}
    assert ("block_ops.py", "block_train") in functions
    assert ("triton_block.py", "bottleneck_eval_op") in functions
    assert len(functions) >= 7


@pytest.mark.parametrize("file, function, annotation", list(_custom_op_annotations()))
def test_custom_op_signatures_use_typing_list(file, function, annotation):
    # torch 2.5 evaluates a custom op's string annotations in its own namespace and accepts
    # typing.List[Tensor] / List[int] / List[float], not list[...]: the package did not import.
    assert "list[" not in annotation, f"{file}: {function} annotates {annotation}"


@pytest.mark.parametrize("path", [p for p in SOURCES if "@triton.jit" in p.read_text()],
                         ids=lambda p: p.name)
def test_kernel_modules_keep_their_annotations_evaluated(path):
    # Triton 3.1's interpreter takes a parameter as constexpr only when its annotation object
    # is tl.constexpr; `from __future__ import annotations` leaves the string "tl.constexpr",
    # and tl.arange(0, BLOCK_M) then failed ("arange's arguments must be of type tl.constexpr").
    assert "from __future__ import annotations" not in path.read_text()


@pytest.mark.parametrize("version, expected", [
    ((3, 1), {"warmup", "rep"}), ((3, 2), {"warmup", "rep"}),
    ((3, 3), {"do_bench"}), ((3, 6), {"do_bench"}), ((3, 8), {"do_bench"}),
])
def test_autotuner_timing_arguments_per_triton_version(monkeypatch, version, expected):
    """Every version gets the short timing windows (3.1 / 3.2 as warmup / rep in ms, later
    ones through a do_bench callable that reaches the GPU only when it is called)."""
    pytest.importorskip("triton")
    from fused_resnet.triton import autotune

    monkeypatch.setattr(autotune, "triton_version", lambda: version)
    args = autotune._lazy_bench_arguments()
    assert set(args) == expected
    if "rep" in args:
        assert (args["warmup"], args["rep"]) == (autotune.AUTOTUNE_WARMUP_MS,
                                                 autotune.AUTOTUNE_REP_MS)
        return
    import triton.testing

    seen = {}
    monkeypatch.setattr(triton.testing, "do_bench",
                        lambda fn, warmup, rep, quantiles: seen.update(
                            warmup=warmup, rep=rep, quantiles=quantiles) or [1.0, 0.9, 1.1])
    assert args["do_bench"](lambda: None, quantiles=(0.5, 0.2, 0.8)) == [1.0, 0.9, 1.1]
    assert seen == {"warmup": autotune.AUTOTUNE_WARMUP_MS, "rep": autotune.AUTOTUNE_REP_MS,
                    "quantiles": (0.5, 0.2, 0.8)}
