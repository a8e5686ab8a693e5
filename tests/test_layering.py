"""The library does not reach up into the application: ``detector/`` never imports ``eval``, ``service`` or
``casc`` (the ``casc`` command, the evaluator and the service build on the library, not the other way), and
its modules stay small."""

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
    code = "import eval.runner\nfrom service import app\nimportlib.import_module('casc.cli')\nfrom .x import y\n"
    assert [name for _, name in _imported_modules(ast.parse(code))] == ["eval.runner", "service", "casc.cli"]


def test_no_library_module_is_above_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "detector").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"split these along what they do: {long}"
