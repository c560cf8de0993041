"""Command-line help generated from config dataclasses: each field's one-line docstring is its help.

Keeps one source of truth for every option (the dataclass), for pretraining and meta-training alike.
"""

from __future__ import annotations

import ast
import inspect


def field_docs(cls) -> dict[str, str]:
    """The string literal under each field of the dataclass ``cls``, read from its source.

    A '%' is doubled: argparse formats help strings with the % operator.
    """
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value).replace("%", "%%")
    return docs
