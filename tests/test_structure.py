"""The package's shape: no import cycles, nothing imported from a higher layer, no module over 600
lines, and the README's module map naming every module."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lrjax"

# The layers of the README's module map, bottom (0) to top: a module may import only modules of
# its own layer or below.
LAYERS = {
    "costs": 0, "decompose": 0, "ranks": 0, "iterative": 0, "xla_flags": 0, "macs": 0,
    "sites": 0, "moments": 0, "lapack": 0, "batchnorm": 0, "own_code": 0, "replay": 0,
    "conv_views": 0, "site_runs": 0, "einsums": 0,
    "formulations": 1, "layers": 1, "models": 1, "onnx_graph": 1, "onnx_loops": 1, "onnx_convert": 1,
    "onnx_passes": 1, "boxes": 1, "linen_trace": 1, "onnx_arrays": 1, "onnx_math": 1, "onnx_scatter": 1,
    "litert_math": 1, "complex_real": 1, "splittable": 1, "linen_cells": 1, "linen_written": 1,
    "linen_products": 1, "linen_calls": 1, "linen_placeholders": 1, "written_products": 1,
    "reparametrized": 1,
    "linen_kernels": 1, "linen_bridge": 1,
    "linen_unbound": 1, "nnx_layers": 1, "ragged": 1, "linen_wrappers": 1, "nnx_wrappers": 1,
    "runtimes": 1, "timing": 1, "gate": 1, "checkpoint": 1, "pretrained": 1, "data": 1,
    "rules": 2, "problem": 2, "report": 2, "surgery": 2, "linen_moments": 2, "nnx_surgery": 2,
    "nnx_written": 2, "nnx_products": 2, "nnx_views": 1, "nnx_bridge": 2,
    "cost_report": 2,
    "convert": 2,
    "export": 3, "export.failures": 3, "train": 3, "reporting": 3, "saved": 3,
    "cli": 4, "cli.convert": 4, "cli.export": 4, "convert.__main__": 4, "export.__main__": 4,
}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        if parts:
            out[".".join(parts)] = path
    return out


def _imports(path: pathlib.Path, modules) -> set[str]:
    """The lrjax modules a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.startswith("lrjax."):
                name = name[len("lrjax."):]
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name:
                    found.add(name)
    return found


def _graph():
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_every_module_has_a_layer():
    assert sorted(set(_modules()) - set(LAYERS)) == []


def test_no_import_cycles():
    graph = _graph()
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == []


def test_nothing_imports_upward():
    upward = [f"{m} (layer {LAYERS[m]}) imports {d} (layer {LAYERS[d]})"
              for m, deps in _graph().items() for d in sorted(deps) if LAYERS[d] > LAYERS[m]]
    assert upward == []


@pytest.mark.parametrize("name", sorted(_modules()))
def test_module_size(name):
    lines = len(_modules()[name].read_text().splitlines())
    assert lines <= 600, f"lrjax.{name} has {lines} lines"


def test_readme_module_map_names_every_module():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Module map"):]
    section = section[:section.index("\n## ", 1)]
    missing = [m for m in _modules() if f"`lrjax.{m}`" not in section
               and not m.endswith("__main__")]
    assert missing == []
