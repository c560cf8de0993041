"""The layering of DESIGN.md, read from the source (nothing imported): the harness imports no learner,
gradient_meta no in-context module, and no project module is imported inside a function to dodge a cycle."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("icl_metarl", "gradient_meta")


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported project module, inside a function?, line) of every import in ``path``."""
    found = []

    def visit(node, nested: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name, nested, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module, nested, child.lineno))
            visit(child, nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text()), False)
    return [(m, nested, line) for m, nested, line in found if m.split(".")[0] in PACKAGES]


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package.replace(".", "/")).rglob("*.py"))


@pytest.mark.parametrize("layer, allowed", [
    ("icl_metarl.harness", ("icl_metarl.harness",)),
    ("gradient_meta", ("gradient_meta", "icl_metarl.harness")),
    ("icl_metarl.incontext", ("icl_metarl.incontext", "icl_metarl.harness")),
])
def test_a_layer_imports_only_the_layers_below_it(layer, allowed):
    wrong = [f"{p.relative_to(ROOT)}:{line} imports {m}" for p in _modules(layer) for m, _, line in _imports(p)
             if not m.startswith(allowed)]
    assert wrong == []


#: imports inside a function for their cost, not for a cycle: the generation workers (spawned processes)
#: import recording.py, and only a policy-played shard needs the agent's torch and transformers (~5-10 s)
FOR_COST = {("icl_metarl/incontext/recording.py", "icl_metarl.incontext.agent")}


def test_no_project_module_is_imported_inside_a_function():
    hidden = [f"{p.relative_to(ROOT)}:{line} imports {m}" for pkg in PACKAGES for p in _modules(pkg)
              for m, nested, line in _imports(p) if nested and (str(p.relative_to(ROOT)), m) not in FOR_COST]
    assert hidden == []


def test_the_check_sees_a_hidden_import(tmp_path):
    source = tmp_path / "hidden.py"
    source.write_text("import numpy\nfrom icl_metarl.harness import rollout\n\n\ndef f():\n"
                      "    from icl_metarl.incontext import model\n")
    assert _imports(source) == [("icl_metarl.harness", False, 2), ("icl_metarl.incontext", True, 6)]
