"""The library does not reach up into the application: ``detector/`` never imports ``eval``, ``service`` or
``casc`` (the ``casc`` command, the evaluator and the service build on the library, not the other way); the
applications use only the library's public API (what ``detector`` exports and the names a module lists in its
``__all__``); nothing in the package imports in a cycle; and the library's modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ABOVE_THE_LIBRARY = {"eval", "service", "casc"}


def _imported_modules(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None) == "__import__")):
            yield node.lineno, node.args[0].value


def test_the_library_imports_nothing_above_it():
    files = sorted((ROOT / "detector").rglob("*.py"))
    assert len(files) > 30
    found = [f"{path.relative_to(ROOT)}:{line}: {name}"
             for path in files for line, name in _imported_modules(ast.parse(path.read_text(), str(path)))
             if name.split(".")[0] in ABOVE_THE_LIBRARY]
    assert not found, "detector/ imports the application layer:\n" + "\n".join(found)


def test_the_check_sees_every_kind_of_import():
    code = "import eval.run\nfrom service import app\nimportlib.import_module('casc.cli')\nfrom .x import y\n"
    assert [name for _, name in _imported_modules(ast.parse(code))] == ["eval.run", "service", "casc.cli"]


# --- the applications use only the public API ---------------------------------------------------------------------

APPS = ("eval", "service", "casc")


def _module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def public_names(module: str) -> set[str] | None:
    """What the library module ``module`` offers the applications: its ``__all__`` (a list of names, or
    ``list(_EXPORTS)``, the lazy exports of ``detector``) and ``__version__``; None when it declares no ``__all__``
    (its names are internals)."""
    path = _module_file(module)
    if path is None:
        return None
    assigned = {node.targets[0].id: node.value for node in ast.parse(path.read_text()).body
                if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
    if "__all__" not in assigned:
        return None
    names = assigned["__all__"]
    if isinstance(names, ast.Call):  # list(_EXPORTS)
        names = ast.List([key for key in assigned[names.args[0].id].keys])
    return {element.value for element in names.elts} | ({"__version__"} if "__version__" in assigned else set())


def reaches_past_the_api(tree: ast.AST) -> list[str]:
    """Every import of ``tree`` from ``detector`` that is not public: a module without ``__all__``, or a name
    missing from it (a public sub-module counts as a name of its package)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] == "detector" and public_names(a.name) is None]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] == "detector":
            offered = public_names(node.module) or set()
            found += [f"{node.lineno}: from {node.module} import {a.name}" for a in node.names
                      if a.name not in offered and public_names(f"{node.module}.{a.name}") is None]
    return found


def test_the_applications_import_only_the_public_api():
    files = sorted(p for app in APPS for p in (ROOT / app).rglob("*.py"))
    found = [f"{path.relative_to(ROOT)}:{line}" for path in files
             for line in reaches_past_the_api(ast.parse(path.read_text(), str(path)))]
    assert not found, "the applications reach past the public API (export the name, or use another):\n" + \
        "\n".join(found)


def test_the_public_api_check_tells_internals_from_exports():
    code = ("from detector import convert, images, __version__\nfrom detector.weights import load_detector\n"
            "import detector.families\nfrom detector.runtime import RunCancelled\nimport detector.state\n"
            "from detector.weights import WEIGHTS_DIR\nfrom .local import anything\n")
    assert reaches_past_the_api(ast.parse(code)) == [
        "4: from detector.runtime import RunCancelled", "5: import detector.state",
        "6: from detector.weights import WEIGHTS_DIR"]
    assert "RunCancelled" in public_names("detector") and public_names("detector.state") is None


def test_no_library_module_is_above_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "detector").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"split these along what they do: {long}"


# --- no import cycle anywhere in the package ---------------------------------------------------------------------

PACKAGES = ("detector", "eval", "service", "casc")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function; relative imports resolved, and ``from X
    import name`` counted as an import of ``X.name`` too (it may be a module)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (its own parent packages left out: Python imports those first
    whatever the module says)."""
    modules = {_module_name(p): p for top in PACKAGES for p in (ROOT / top).rglob("*.py")}
    return {m: {t for t in _imports_of(p) if t in modules and t != m and not m.startswith(t + ".")}
            for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 60 and "detector.schedule" in graph["detector.runtime"]
    assert not cycles(graph), f"import cycles: {cycles(graph)}"


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
