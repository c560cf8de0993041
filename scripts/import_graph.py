"""The project's import graph, read from the source (nothing is imported or run).

Prints, for the packages ``icl_metarl`` and ``gradient_meta``: lines of code per layer, the imports
between layers (module-level and function-level counted apart) and every function-level import with
its place, so a cycle hidden behind lazy imports shows. A layer is a subpackage (``icl_metarl.harness``)
or, for modules directly in a package, the module itself.

    python scripts/import_graph.py            # the table
    python scripts/import_graph.py --edges    # every module -> module import
"""

from __future__ import annotations

import argparse
import ast
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("icl_metarl", "gradient_meta")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> str:
    """gradient_meta is one layer; icl_metarl's layers are its subpackages (or top-level modules)."""
    parts = module.split(".")
    if parts[0] == "gradient_meta" or len(parts) == 1:
        return parts[0]
    return ".".join(parts[:2])


def imports(path: Path, project_only: bool = True) -> list[tuple[str, bool, int]]:
    """(imported module, at function level?, line) for every import (of a project module) in ``path``."""
    tree = ast.parse(path.read_text())
    out = []
    keep = (lambda name: name.split(".")[0] in PACKAGES) if project_only else (lambda name: True)

    def visit(node, nested: bool):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                out.extend((a.name, nested, child.lineno) for a in child.names if keep(a.name))
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0 and keep(child.module):
                out.append((child.module, nested, child.lineno))
            visit(child, inner)

    visit(tree, False)
    return out


def code_lines(path: Path) -> int:
    """Lines that are neither blank nor comments."""
    return sum(1 for line in path.read_text().splitlines() if line.strip() and not line.strip().startswith("#"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--edges", action="store_true", help="also print every module -> module import")
    args = p.parse_args()
    files = sorted(f for pkg in PACKAGES for f in (ROOT / pkg).rglob("*.py"))
    loc = Counter()
    edges = Counter()  # (from layer, to layer, nested) -> count
    nested_list, module_edges = [], []
    for f in files:
        mod = module_name(f)
        loc[layer(mod)] += code_lines(f)
        for target, nested, line in imports(f):
            if layer(target) != layer(mod):
                edges[(layer(mod), layer(target), nested)] += 1
            module_edges.append((mod, target, nested))
            if nested:
                nested_list.append(f"{f.relative_to(ROOT)}:{line} imports {target}")
    print(f"lines of code (no blanks, no comments): {sum(loc.values())} in {len(files)} files")
    for name, n in sorted(loc.items()):
        print(f"  {name:32s} {n:6d}")
    print("imports between layers (module level / inside functions):")
    pairs = sorted({(a, b) for a, b, _ in edges})
    for a, b in pairs:
        print(f"  {a:32s} -> {b:32s} {edges[(a, b, False)]:4d} / {edges[(a, b, True)]:d}")
    packages = {(a.split('.')[0], b.split('.')[0]) for a, b, _ in edges if a.split('.')[0] != b.split('.')[0]}
    print("package edges: " + (", ".join(f"{a} -> {b}" for a, b in sorted(packages)) or "none"))
    third_party = [f"{f.relative_to(ROOT)}:{line} imports {target}" for f in files
                   for target, nested, line in imports(f, project_only=False)
                   if nested and target.split(".")[0] not in PACKAGES]
    print(f"function-level imports of other modules (optional or heavy dependencies): {len(third_party)}")
    for line in third_party:
        print(f"  {line}")
    print(f"function-level imports of project modules: {len(nested_list)}")
    for line in nested_list:
        print(f"  {line}")
    if args.edges:
        print("module imports:")
        for a, b, nested in sorted(set(module_edges)):
            print(f"  {a} -> {b}{' (in a function)' if nested else ''}")


if __name__ == "__main__":
    main()
