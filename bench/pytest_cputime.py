"""A pytest plugin: each test's CPU time (its own process plus the children it waited for) beside
its wall time, and the collection's, written to a file sorted by CPU time.

On the shared 2-core machine a niced suite gets a varying share of the CPU, so wall times (and
``--durations``) swell with the load; CPU time does not, and is close to the wall time the same
single-threaded test takes on a quiet core. Not counted: daemons a test starts but does not wait
for (Ray's raylet and workers, a browser still open when the test ends).

    OMP_NUM_THREADS=1 PYTHONPATH=bench nice -n 10 .venv/bin/python -m pytest -q \
        -p pytest_cputime --durations=40   # writes $RDM_CPUTIME_OUT (default /tmp/rdm-cputime.txt)
"""

from __future__ import annotations

import os
import resource
import tempfile
import time

import pytest

_rows: list[tuple[float, float, float, float, str]] = []
_collect: list[tuple[float, float, float]] = []


def _cpu() -> tuple[float, float]:
    """(this process, waited-for children): user + system seconds."""
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_collection(session):
    w0, (s0, c0) = time.perf_counter(), _cpu()
    yield
    w1, (s1, c1) = time.perf_counter(), _cpu()
    _collect.append((w1 - w0, s1 - s0, c1 - c0))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    # setup + call + teardown: a module fixture's cost lands on the first test that uses it
    w0, (s0, c0) = time.perf_counter(), _cpu()
    yield
    w1, (s1, c1) = time.perf_counter(), _cpu()
    _rows.append((s1 - s0 + c1 - c0, w1 - w0, s1 - s0, c1 - c0, item.nodeid))


def pytest_sessionfinish(session):
    own, children = _cpu()
    lines = [f"total cpu self={own:.1f} children={children:.1f}"]
    lines += [f"collect wall={w:.1f} self={s:.1f} children={c:.1f}" for w, s, c in _collect]
    lines.append(
        f"tests={len(_rows)} sum_cpu={sum(r[0] for r in _rows):.1f} "
        f"sum_wall={sum(r[1] for r in _rows):.1f}"
    )
    lines += [
        f"{cpu:7.2f} cpu {wall:7.2f} wall {s:7.2f} self {c:7.2f} child  {nodeid}"
        for cpu, wall, s, c, nodeid in sorted(_rows)[::-1]
    ]
    per: dict[str, list[float]] = {}
    for cpu, wall, _, _, nodeid in _rows:
        a = per.setdefault(nodeid.split("::")[0], [0.0, 0.0, 0])
        a[0], a[1], a[2] = a[0] + cpu, a[1] + wall, a[2] + 1
    lines.append("\nper file:")
    lines += [
        f"{cpu:7.2f} cpu {wall:7.2f} wall {n:4d}  {name}"
        for name, (cpu, wall, n) in sorted(per.items(), key=lambda kv: -kv[1][0])
    ]
    out = os.environ.get("RDM_CPUTIME_OUT", os.path.join(tempfile.gettempdir(), "rdm-cputime.txt"))
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
