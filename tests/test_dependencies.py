"""Every third-party module imported anywhere in src/ is declared in pyproject.toml's
dependencies (not only pulled in by another package, as fontTools comes with matplotlib)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_top_level_modules(src: Path) -> dict[str, set[str]]:
    """{top-level module: files importing it} over every ``import`` in ``src`` (lazy ones, inside
    functions or under TYPE_CHECKING, included), without relative imports."""
    found: dict[str, set[str]] = {}
    for path in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(src)))
    return found


def distribution_name(requirement: str) -> str:
    """'faiss-cpu>=1.8' -> 'faiss-cpu', normalised as PEP 503 does (open_clip_torch = open-clip-torch)."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement.strip()).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_dependencies(extras: bool = False) -> set[str]:
    """The [project] dependencies; with ``extras``, also those of the optional extras a user
    installs for a feature (``rdm[ray]``), not the ``test`` extra."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    required = list(project["dependencies"])
    if extras:
        for name, reqs in project.get("optional-dependencies", {}).items():
            required += [] if name == "test" else reqs
    return {distribution_name(r) for r in required}


def top_level_imports(path: Path) -> set[str]:
    """Modules ``path`` imports at module level (outside functions and classes)."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_distribution_name_normalises():
    assert distribution_name("open_clip_torch>=3.0") == "open-clip-torch"
    assert distribution_name("Pillow>=10") == "pillow"
    assert distribution_name("torch==2.14.1") == "torch"


def test_every_third_party_import_in_src_is_declared():
    modules = imported_top_level_modules(ROOT / "src")
    third_party = {
        m: files for m, files in modules.items() if m not in sys.stdlib_module_names and m != "rdm"
    }
    assert {"torch", "faiss", "PIL", "open_clip"} <= set(third_party)  # the scan sees imports
    # the installed distributions say which one provides each module (PIL -> pillow,
    # faiss -> faiss-cpu, open_clip -> open_clip_torch, fontTools -> fonttools, ...)
    providers = importlib.metadata.packages_distributions()
    declared = declared_dependencies(extras=True)
    missing = []
    for module, files in sorted(third_party.items()):
        dists = {distribution_name(d) for d in providers.get(module, [])}
        if not dists:
            missing.append(
                f"{module} (no installed distribution provides it; used in {sorted(files)})"
            )
        elif not dists & declared:
            missing.append(f"{module} from {sorted(dists)} (used in {sorted(files)})")
    assert not missing, "undeclared in pyproject.toml [project] dependencies: " + "; ".join(missing)


def test_an_optional_extra_is_imported_only_where_it_is_used():
    """A module that only an optional extra provides (ray, for ``--engine ray``) is never
    imported at module level, so rdm imports and its local engine runs without the extra."""
    providers = importlib.metadata.packages_distributions()
    optional = declared_dependencies(extras=True) - declared_dependencies()
    assert "ray" in optional  # the scan knows the extra
    eager = [
        f"{module} in {path.relative_to(ROOT)}"
        for path in sorted((ROOT / "src").rglob("*.py"))
        for module in top_level_imports(path)
        if {distribution_name(d) for d in providers.get(module, [module])} & optional
    ]
    assert not eager, "optional extras imported at module level: " + "; ".join(eager)
