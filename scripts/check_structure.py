"""The layout rules, checked: no import cycle, no import of another module's private names, no module in
bench/ over 400 lines, no variant named in bench/ (the harness reads what a variant needs from its class).

    python scripts/check_structure.py        # one line per violation; exit status 1 if any

``tests/test_structure.py`` runs the same checks.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bench", "optimizers", "architectures")
MAX_LINES = 400
#: registered optimizers that are not variants (the harness may name its baselines)
BASELINES = {"sgd", "adamw", "adam"}


def modules() -> dict[str, Path]:
    """dotted name -> file, for every module of the project's packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports(known: dict[str, Path]) -> dict[str, set[tuple[str, str | None]]]:
    """module -> {(imported module, imported name or None)}, every import (module level or in a function)."""
    graph: dict[str, set[tuple[str, str | None]]] = {}
    for module, path in known.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {(a.name, None) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                source = _absolute(module, node, path.name == "__init__.py")
                for alias in node.names:
                    # `from package import module` imports a module, not a name
                    if f"{source}.{alias.name}" in known:
                        edges.add((f"{source}.{alias.name}", None))
                    else:
                        edges.add((source, alias.name))
        graph[module] = {(m, n) for m, n in edges if m.split(".")[0] in PACKAGES}
    return graph


def cycles(graph: dict[str, set[tuple[str, str | None]]]) -> list[list[str]]:
    """Each import cycle once (as the modules along it), a package's own __init__ aside."""
    edges = {m: {t for t, _ in targets if t in graph and t != m and not m.startswith(t + ".")} for m, targets in graph.items()}
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    return found


def private_imports(graph) -> list[str]:
    return [
        f"{m} imports {t}.{n}"
        for m, targets in sorted(graph.items())
        for t, n in sorted(targets, key=str)
        if n and n.startswith("_") and not n.startswith("__") and t != m
    ]


def long_modules(known: dict[str, Path]) -> list[str]:
    counts = {m: len(p.read_text().splitlines()) for m, p in known.items() if m.startswith("bench")}
    return [f"{m}: {n} lines (at most {MAX_LINES})" for m, n in sorted(counts.items()) if n > MAX_LINES]


def variant_names() -> list[str]:
    sys.path.insert(0, str(ROOT))
    from optimizers import available_optimizers

    return sorted(set(available_optimizers()) - BASELINES)


def named_variants(known: dict[str, Path]) -> list[str]:
    """String constants in bench/ holding a registered variant's name as a word."""
    names = [n for n in variant_names() if n not in BASELINES]
    pattern = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True))) + r")(?![\w-])")
    found = []
    for module, path in sorted(known.items()):
        if not module.startswith("bench"):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body
            and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                hit = pattern.search(node.value)
                if hit:
                    found.append(f"{module}:{node.lineno} names the variant {hit.group(1)!r}")
    return found


def violations() -> list[str]:
    known = modules()
    graph = imports(known)
    return [
        *[f"import cycle: {' -> '.join(c)}" for c in cycles(graph)],
        *[f"private import: {p}" for p in private_imports(graph)],
        *[f"long module: {m}" for m in long_modules(known)],
        *named_variants(known),
    ]


if __name__ == "__main__":
    problems = violations()
    print("\n".join(problems) or "structure: no import cycle, no private import, no long module, no variant named in bench/")
    sys.exit(1 if problems else 0)
