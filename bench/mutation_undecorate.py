"""Rewrite ``@torch.no_grad()`` functions as ``with torch.no_grad():`` bodies, so mutmut mutates them.

mutmut 3 never mutates a decorated function (its trampoline replaces the function object), so
``sampling.ddim``, ``sampling.dpm_solver_pp``, ``train.ema_update``, ``train.save_sample_grid``
and ``RDMPipeline.__call__`` get no mutants at all. The rewrite keeps behaviour (grad mode is
off for the same statements) and is applied to a throw-away copy of the tree, never to src/.

Usage: python bench/mutation_undecorate.py COPY/src/rdm/sampling.py [more files]   (in place)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def undecorate(source: str) -> str:
    lines = source.splitlines(keepends=True)
    edits = []  # (decorator line index, first body line index, last body line index)
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if [ast.unparse(d) for d in node.decorator_list] != ["torch.no_grad()"]:
            continue
        body = node.body
        if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]  # the docstring stays the function's docstring
        edits.append((node.decorator_list[0].lineno - 1, body[0].lineno - 1, node.end_lineno - 1))
    for deco, first, last in sorted(edits, reverse=True):
        indent = lines[first][: len(lines[first]) - len(lines[first].lstrip())]
        for i in range(first, last + 1):
            if lines[i].strip():
                lines[i] = "    " + lines[i]
        lines.insert(first, f"{indent}with torch.no_grad():\n")
        del lines[deco]
    return "".join(lines)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        path = Path(name)
        path.write_text(undecorate(path.read_text()))
