"""mutmut's CLI, with each mutant's tests run fastest file first, fastest test first.

mutmut 3 runs, for each mutant, the tests whose run entered the mutated function, with ``-x``; it
passes them in set order, so a killed mutant often waits for an 8-second test before a 0.1-second
one fails. Ordering them by the durations mutmut itself measured (grouped by file, so module-scoped
fixtures are built once) changes only how fast a verdict comes, not the verdict.
With ``RDM_MUTATION_ORDER=diffusion,sampling,...`` one run over several modules tests them module by
module in that order (mutmut itself sorts all mutants by estimated test time, mixing modules), so
that a run stopped early leaves whole modules finished; one run instead of one per module saves
mutmut's start-up (a coverage run of the selected tests and a clean run: minutes here).
Usage: python bench/mutmut_fastest_first.py run --max-children 1 'rdm.sampling.*'
       RDM_MUTATION_ORDER=sampling,neighbors python bench/mutmut_fastest_first.py run \
           --max-children 1 'rdm.sampling.*' 'rdm.neighbors.*'
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict

import mutmut.__main__ as mutmut_main
from mutmut.__main__ import cli
from mutmut.runners import harness
from mutmut.state import state

_regular_run = harness.PytestRunner._pytest_args_regular_run


def _fastest_first(self, tests):
    duration = state().duration_by_test
    by_file: dict[str, list[str]] = defaultdict(list)
    for test in tests:
        by_file[test.split("::")[0]].append(test)
    files = sorted(by_file, key=lambda f: (sum(duration.get(t, 0.0) for t in by_file[f]), f))
    ordered = [
        t for f in files for t in sorted(by_file[f], key=lambda t: (duration.get(t, 0.0), t))
    ]
    return _regular_run(self, ordered)


harness.PytestRunner._pytest_args_regular_run = _fastest_first

_ORDER = [m for m in os.environ.get("RDM_MUTATION_ORDER", "").split(",") if m]
_estimate = mutmut_main.estimated_worst_case_time


def _module_first(mutant_name: str) -> tuple[int, float]:
    module = mutant_name.split(".")[1] if mutant_name.startswith("rdm.") else ""
    rank = _ORDER.index(module) if module in _ORDER else len(_ORDER)
    return (rank, _estimate(mutant_name))


if _ORDER:  # mutmut sorts its mutants with this key only
    mutmut_main.estimated_worst_case_time = _module_first

if __name__ == "__main__":
    sys.exit(cli())
