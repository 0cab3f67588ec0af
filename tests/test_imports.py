"""The package's import graph: no circle (module-level or inside functions), a reason beside every import made inside
a function, and every module importable on its own."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lgd_ray"


def _main_guard(node: ast.AST) -> bool:
    """`if __name__ == "__main__":` — what runs there runs only when the module is a script, not on import."""
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def package_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported lgd_ray module, line, inside a function) of every import in one file, main guards left out."""
    found = []

    def visit(node: ast.AST, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if _main_guard(child):
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("lgd_ray"):
                found.append((child.module, child.lineno, in_function))
            elif isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names if a.name.startswith("lgd_ray."))
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return found


def modules() -> dict[str, Path]:
    return {f"lgd_ray.{p.stem}": p for p in sorted(PACKAGE.glob("*.py")) if p.stem != "__init__"}


def test_the_package_has_no_import_circle():
    graph = {name: {m for m, _, _ in package_imports(path) if m != name} for name, path in modules().items()}
    state, stack, circles = {}, [], []

    def walk(node: str):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = "done"

    for name in graph:
        if name not in state:
            walk(name)
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_every_import_inside_a_function_says_why():
    """A function-level import of the package needs a comment on its line or above it in its block of imports."""
    silent = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        for module, line, in_function in package_imports(path):
            if not in_function:
                continue
            block, i = [lines[line - 1]], line - 2
            while i >= 0 and (not lines[i].strip() or lines[i].lstrip().startswith(("import ", "from ", "#"))):
                block.append(lines[i])
                i -= 1
            if not any("#" in text for text in block):
                silent.append(f"{path.name}:{line} imports {module}")
    assert not silent, "function-level imports without a reason: " + ", ".join(silent)


def test_every_module_imports_on_its_own():
    """Each module imported first, in an interpreter whose lgd_ray modules are all forgotten before each import."""
    code = ("import importlib, sys\n"
            f"for name in {sorted(modules())!r}:\n"
            "    for m in [m for m in sys.modules if m == 'lgd_ray' or m.startswith('lgd_ray.')]:\n"
            "        del sys.modules[m]\n"
            "    importlib.import_module(name)\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
