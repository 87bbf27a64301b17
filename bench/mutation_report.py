"""Per-module mutation score from a finished mutmut run (bench/mutation.sh), uncovered lines included.

With ``mutate_only_covered_lines = true`` mutmut makes no mutants on lines that no selected test
executes; such a mutant cannot be killed, so this report regenerates the full mutant set and
counts each one missing from mutmut's run as "uncovered" (its line never ran) or "no tests" (its
function never ran), neither killed. Two scores per module:

    mutmut score = (killed + timeout) / (mutants mutmut ran)
    strict score = (killed + timeout) / (all mutants, uncovered and no tests included)

Usage (from the repository root, after bench/mutation.sh):
    python bench/mutation_report.py [--list FILE] [module ...]   # --list: every non-killed mutant with its diff
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from difflib import unified_diff
from pathlib import Path

import libcst as cst
from mutmut.mutation.diff_apply import generated_function_names
from mutmut.mutation.file_mutation import mutate_file_contents
from mutmut.stats import status_by_exit_code
from mutmut.utils.format_utils import get_mutant_name

# the six modules issue 6 names, then the two that took code out of pipeline.py / neighbors.py
MODULES = (
    "diffusion",
    "sampling",
    "pipeline",
    "train",
    "neighbors",
    "index",
    "conditioning",
    "pseudo_query",
)
COLUMNS = ("killed", "timeout", "survived", "uncovered", "no tests", "suspicious", "not checked")


def _changed_lines(diff: str) -> tuple[str, ...]:
    return tuple(
        line
        for line in diff.splitlines()
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    )


def _functions(code: str) -> dict[str, cst.FunctionDef]:
    """Every top-level function and method of a mutated module, by name (parsed once)."""
    found = {}
    for child in cst.parse_module(code).body:
        if isinstance(child, cst.FunctionDef):
            found[child.name.value] = child
        elif isinstance(child, cst.ClassDef) and isinstance(child.body, cst.IndentedBlock):
            for method in child.body.body:
                if isinstance(method, cst.FunctionDef):
                    found[method.name.value] = method
    return found


def _diff(functions: dict[str, cst.FunctionDef], key: str) -> tuple[str, ...]:
    """The changed lines of mutant ``key``: its function against the unmutated copy."""
    orig, mutant = (functions[n] for n in generated_function_names(key))
    a, b = (
        cst.Module([f.with_changes(name=cst.Name("f"))]).code.splitlines() for f in (orig, mutant)
    )
    return _changed_lines("\n".join(unified_diff(a, b, lineterm="")))


def _function(name: str) -> str:
    return name.rpartition("__mutmut_")[0]


def module_rows(module: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """(mutant name in the full set, status, changed lines) for every mutant of one module."""
    path = Path("src/rdm") / f"{module}.py"
    meta = json.loads((Path("mutants") / f"{path}.meta").read_text())
    ran_status = {k: status_by_exit_code[v] for k, v in meta["exit_code_by_key"].items()}
    # the mutants mutmut ran, keyed by (function, changed lines); the mutated module is mutants/...
    ran: dict[tuple[str, tuple[str, ...]], list[str]] = defaultdict(list)
    ran_functions = _functions((Path("mutants") / path).read_text())
    for key, status in ran_status.items():
        ran[(_function(key), _diff(ran_functions, key))].append(status)
    called = set(
        json.loads(Path("mutants/mutmut-stats.json").read_text())["tests_by_mangled_function_name"]
    )
    full = mutate_file_contents(str(path), path.read_text(), None, None)
    full_functions = _functions(full.code)
    rows = []
    for short in full.mutant_names:
        key = get_mutant_name(path, short)
        changed = _diff(full_functions, key)
        statuses = ran.get((_function(key), changed))
        if statuses:
            status = statuses.pop()
        else:  # never generated: its line, or its whole function, ran in no selected test
            status = "uncovered" if _function(key) in called else "no tests"
        rows.append((key, status, changed))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", type=Path, help="write every mutant not killed, with its diff")
    parser.add_argument("modules", nargs="*", default=MODULES, help="default: all eight")
    args = parser.parse_args()
    total: Counter[str] = Counter()
    listing: list[str] = []
    header = f"{'module':<10}" + "".join(f"{c:>12}" for c in COLUMNS)
    print(header + f"{'mutmut %':>10}{'strict %':>10}")
    for module in args.modules:
        if not (Path("mutants/src/rdm") / f"{module}.py.meta").exists():
            print(f"{module:<10} not run")
            continue
        rows = module_rows(module)
        counts = Counter(status for _, status, _ in rows)
        total += counts
        print(f"{module:<10}" + "".join(f"{counts[c]:>12}" for c in COLUMNS) + _scores(counts))
        for key, status, changed in rows:
            if status not in ("killed", "timeout"):
                listing.append(f"{status:<10} {key}\n" + "".join(f"    {c}\n" for c in changed))
    print(f"{'all':<10}" + "".join(f"{total[c]:>12}" for c in COLUMNS) + _scores(total))
    if args.list:
        args.list.write_text("".join(listing))


def _scores(c: Counter[str]) -> str:
    good = c["killed"] + c["timeout"]
    ran = sum(c.values()) - c["uncovered"] - c["no tests"] - c["not checked"]
    strict = sum(c.values()) - c["not checked"]
    return f"{100 * good / max(ran, 1):>10.1f}{100 * good / max(strict, 1):>10.1f}"


if __name__ == "__main__":
    main()
