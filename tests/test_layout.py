"""The layout docs/development.md describes holds in the code: which part may import which, no import cycle in
the library, and the core library needing only torch, numpy and (optionally) triton.

Imports are read from the source (every `import`, `from ... import` and `importlib.import_module("...")` with a
literal name, at any depth, so lazy imports count too); nothing is executed.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("epa_kernels", "training", "benchmarks", "tests")
# What each part may import from the others: the library at the bottom, programs on it, benchmarks on both.
ALLOWED = {
    "epa_kernels": {"epa_kernels"},
    "training": {"epa_kernels", "training"},
    "benchmarks": {"epa_kernels", "training", "benchmarks"},
    "tests": set(PARTS),
}
# Compiled extensions (setup.py): leaves, not the package they sit in.
EXTENSIONS = {"epa_kernels._C"}
# The core library (everything but its optional subpackages) runs on these alone.
CORE_DEPENDENCIES = {"torch", "numpy", "triton"}
OPTIONAL_SUBPACKAGES = ("epa_kernels.active", "epa_kernels.transformers")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, source: str | None = None) -> set[str]:
    """Every module name the file (or `source`, as if it were that file) imports; for `from a import b`, `a.b`,
    which may be an attribute of `a`."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return found


SOURCES = {module_name(path): path for part in PARTS for path in sorted((ROOT / part).rglob("*.py"))}
IMPORTS = {name: imports(path) for name, path in SOURCES.items()}


def resolve(name: str) -> str | None:
    """The project module an imported name belongs to (longest known prefix), or None for a third-party one."""
    if name in EXTENSIONS:
        return name
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in SOURCES:
            return ".".join(parts[:end])
    return None


def upward_imports(imports_by_module: dict[str, set[str]]) -> list[str]:
    return sorted(f"{module} imports {name}" for module, names in imports_by_module.items()
                  for name in names if name.split(".")[0] in PARTS
                  and name.split(".")[0] not in ALLOWED[module.split(".")[0]])


def library_graph(imports_by_module: dict[str, set[str]]) -> dict[str, set[str]]:
    return {module: {target for name in names if (target := resolve(name)) and target != module
                     and target not in EXTENSIONS}
            for module, names in imports_by_module.items() if module.startswith("epa_kernels")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph (depth-first: a module met again on the current path closes it), or None."""
    done, path = set(), []

    def visit(module):
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if cycle := visit(target):
                return cycle
        path.pop()
        done.add(module)
        return None

    return next((cycle for module in sorted(graph) if (cycle := visit(module))), None)


def test_each_part_imports_only_the_parts_below_it():
    wrong = upward_imports(IMPORTS)
    assert not wrong, "imports against the layout of docs/development.md:\n" + "\n".join(wrong)


def test_the_library_has_no_import_cycle():
    cycle = find_cycle(library_graph(IMPORTS))
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_the_core_library_needs_only_torch_numpy_and_triton():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    extra = sorted(f"{module} imports {name}" for module, names in IMPORTS.items()
                   if module.startswith("epa_kernels") and not module.startswith(OPTIONAL_SUBPACKAGES)
                   for name in names if resolve(name) is None
                   and name.split(".")[0] not in stdlib | CORE_DEPENDENCIES | {"epa_kernels"})
    assert not extra, "the core library's dependencies are torch and numpy (triton optional):\n" + "\n".join(extra)


def test_the_checks_find_the_two_defects_this_layout_was_fixed_for():
    """A program importing the benchmarks for its provenance record, and the Triton backend importing the
    dispatcher that imports it (lazily, by name): both are caught when put back."""
    demo = ROOT / "training" / "train_demo.py"
    assert upward_imports({"training.train_demo": imports(demo, "from benchmarks.harness import environment")}) == [
        "training.train_demo imports benchmarks.harness.environment"]
    kernel = ROOT / "epa_kernels" / "ops" / "triton_logprobs.py"
    cyclic = {**IMPORTS, "epa_kernels.ops.triton_logprobs": imports(
        kernel, "def f():\n    from ..dispatch import backend_name\n")}
    assert find_cycle(library_graph(cyclic)) == [
        "epa_kernels.dispatch", "epa_kernels.ops.triton_logprobs", "epa_kernels.dispatch"]
