#!/usr/bin/env bash
# Mutation testing of rdm's core modules with mutmut 3 (issue 6, part 5; docs/testing.md).
# Needs the [tool.mutmut] section of pyproject.toml and mutmut==3.8.1 in the venv that runs it
# (PY=..., default .venv/bin/python; mutmut is not in the test extra: see docs/testing.md).
# Usage: bench/mutation.sh [module ...]      (default: all eight, maths-heavy first)
# One mutmut run over the modules given, tested module by module in that order (see
# bench/mutmut_fastest_first.py); PER_MODULE=1 runs mutmut once per module instead (each run
# pays mutmut's start-up again: a coverage run and a clean run of the selected tests).
# One worker (2 shared cores); results accumulate in mutants/ and a re-run skips finished mutants
# (a module named on the command line is re-run in full).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
modules=("$@")
[ ${#modules[@]} -eq 0 ] && modules=(diffusion sampling pseudo_query conditioning neighbors train index pipeline)
if [ "${PER_MODULE:-0}" = 1 ]; then
    for m in "${modules[@]}"; do
        echo "=== rdm.$m  $(date -Is)"
        /usr/bin/time -f "rdm.$m wall %e s" "$PY" bench/mutmut_fastest_first.py run --max-children 1 "rdm.$m.*"
    done
else
    patterns=()
    for m in "${modules[@]}"; do patterns+=("rdm.$m.*"); done
    echo "=== ${modules[*]}  $(date -Is)"
    RDM_MUTATION_ORDER=$(IFS=,; echo "${modules[*]}") /usr/bin/time -f "wall %e s" \
        "$PY" bench/mutmut_fastest_first.py run --max-children 1 "${patterns[@]}"
fi
"$PY" -m mutmut export-cicd-stats       # writes mutants/mutmut-cicd-stats.json
"$PY" -m mutmut results --all true > mutants/results.txt
echo "per-module table: $PY bench/mutation_report.py; one mutant's diff: $PY -m mutmut show <name>"
