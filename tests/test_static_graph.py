"""The static model is one plain graph: no branches in forward, exportable, no float64, no scatter."""

from __future__ import annotations

import ast
import inspect

import pytest
import torch

import runtime.static as static_module
from runtime import StaticShape, StaticWanTransformer, get_preset

from .conftest import STRUCTURAL_PRESETS, relative_error

FORWARD_HELPERS = {"_run", "_rope", "_attention", "_fp32_layer_norm"}
BRANCHES = (ast.If, ast.IfExp, ast.While, ast.Try, ast.Match, ast.Assert, ast.BoolOp)


def _forward_functions():
    tree = ast.parse(inspect.getsource(static_module))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and (node.name == "forward" or node.name in FORWARD_HELPERS):
            yield node


def branch_problems(fn: ast.FunctionDef) -> list[str]:
    """What makes `fn` unfit for a static graph: branches, filtered comprehensions, optional inputs."""
    problems = [f"{fn.name} line {node.lineno}: {type(node).__name__}" for node in ast.walk(fn)
                if isinstance(node, BRANCHES)]
    problems += [f"{fn.name}: filtered comprehension" for node in ast.walk(fn)
                 if isinstance(node, ast.comprehension) and node.ifs]
    args = fn.args
    if args.defaults or args.kw_defaults:
        problems.append(f"{fn.name} has defaulted parameters")
    if args.vararg is not None or args.kwarg is not None:
        problems.append(f"{fn.name} takes *args/**kwargs")
    return problems


def test_forward_paths_have_no_branches_and_no_optional_inputs():
    functions = list(_forward_functions())
    assert len(functions) >= 12  # every module's forward was found
    problems = [p for fn in functions for p in branch_problems(fn)]
    assert not problems, problems


def test_branch_check_catches_a_branch():
    tree = ast.parse("def forward(self, x, y=None):\n    return x if x.sum() > 0 else -x\n")
    assert branch_problems(tree.body[0]) == ["forward line 2: IfExp", "forward has defaulted parameters"]


@pytest.mark.parametrize("preset", STRUCTURAL_PRESETS)
def test_torch_export_captures_one_graph(preset):
    config = get_preset(preset)
    torch.manual_seed(0)
    model = StaticWanTransformer(config, StaticShape(2, 2, 4, 6, 512, config.image_tokens,
                                                     config.per_token_timesteps)).eval()
    inputs = model.example_inputs(seed=1)
    exported = torch.export.export(model, inputs)
    graph = exported.graph_module.graph
    targets = {str(n.target) for n in graph.nodes if n.op == "call_function"}
    assert not any(k in t for t in targets for k in ("scatter", "index_put", "copy_")), targets
    for node in graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            assert val.dtype != torch.float64, f"float64 at {node.name}"
            assert not val.is_complex(), f"complex at {node.name}"
    # Only the declared inputs, all required, in forward's order.
    user_inputs = [s.arg.name for s in exported.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    assert user_inputs == list(model.input_names)
    with torch.no_grad():
        assert relative_error(exported.module()(*inputs), model(*inputs)) < 1e-6
