"""The import layering, read from the source with `ast` (every import, function-level ones and
importlib.import_module("...") included): roberta_kernels (the ops) <- roberta_ds (the application) <-
kernel_tools (the tooling, which may import both); no arrow the other way and no import cycle."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("roberta_kernels", "roberta_ds", "kernel_tools")
FORBIDDEN = {"roberta_kernels": ("roberta_ds", "kernel_tools"), "roberta_ds": ("kernel_tools",)}


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _dynamic_target(call: ast.Call) -> str | None:
    """The module named by import_module("a.b") / __import__("a.b"), or the literal head of an f-string."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name not in ("import_module", "__import__") or not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        return str(arg.values[0].value).split("{")[0].rstrip(".") or None
    return None


def _known(name: str, modules) -> str | None:
    """The deepest project module among `name` and its parents (None outside the project)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(path: Path, module: str, modules) -> set[str]:
    """The project modules `path` imports, anywhere in the file. `from p import name` counts as p.name
    where that is a module, else as p (so a package importing its own submodules is no cycle)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [_known(a.name, modules) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found += [_known(f"{base}.{a.name}", modules) for a in node.names]
        elif isinstance(node, ast.Call) and (target := _dynamic_target(node)):
            found.append(_known(target, modules))
    return {m for m in found if m and m != module}


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """{module: project modules it imports} over every .py file of `packages` under `root`."""
    files = {_module_name(f, root): f for p in packages for f in sorted((root / p).rglob("*.py"))}
    return {module: imports_of(path, module, files.keys()) for module, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state, stack = {}, []  # state: 1 on the current path, 2 done

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{m} imports {t}"
        for m, targets in sorted(graph.items())
        for t in sorted(targets)
        if t.split(".")[0] in FORBIDDEN.get(m.split(".")[0], ())
    ]


def test_every_package_is_layered():
    graph = import_graph(ROOT)
    assert {m.split(".")[0] for m in graph} == set(PACKAGES)
    ops_imports = graph["roberta_ds.model.ops"]
    assert any(t.startswith("roberta_kernels") for t in ops_imports)  # the graph sees imports
    assert upward_imports(graph) == []


def test_no_import_cycle():
    assert find_cycle(import_graph(ROOT)) is None


def test_the_checks_fail_on_planted_bad_imports(tmp_path):
    files = {
        "roberta_kernels/__init__.py": "from roberta_kernels.ops import f\n",
        "roberta_kernels/ops.py": "def f():\n    from roberta_ds import app  # function-level: an arrow\n",
        "roberta_ds/__init__.py": "",
        "roberta_ds/app.py": "import importlib\nT = importlib.import_module('kernel_tools.report')\n",
        "kernel_tools/__init__.py": "",
        "kernel_tools/report.py": "from . import calibrate\n",
        "kernel_tools/calibrate.py": "def c():\n    from kernel_tools.report import x\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert upward_imports(graph) == [
        "roberta_ds.app imports kernel_tools.report",
        "roberta_kernels.ops imports roberta_ds.app",
    ]
    assert find_cycle(graph) == ["kernel_tools.calibrate", "kernel_tools.report", "kernel_tools.calibrate"]
