"""Engines: where the heavy stages' units of work run.

The two heavy stages are cut into pure units of work that know nothing of the engine running
them: a database build into shards (:func:`rdm.db_build.build_shard`, a partition of ids that
writes its own ``_build/`` shard atomically) and the training neighbours into blocks
(:func:`rdm.neighbors.neighbor_block`). An engine decides where those units run:

- ``local`` (the default): one after another in this process; needs nothing beyond rdm.
- ``ray``: as tasks on encoder actors of a Ray cluster (:mod:`rdm.engines.ray`), either an
  existing one (``--address``) or a local one started for the run. Needs the optional extra
  ``pip install 'rdm[ray]'``; Ray is imported only when this engine is chosen.

Both engines write the same files: units already written are skipped, so a rerun after any
failure resumes, and the finish step (index, manifest; the joined neighbours file) is the same
function in the driver.
"""

from __future__ import annotations

from types import ModuleType

from rdm.errors import RdmError

ENGINES = ("local", "ray")
RAY_INSTALL = "pip install 'rdm[ray]'"


class EngineError(RdmError):
    """An engine that cannot be used or a run it could not finish; the message says what to do."""


def import_ray() -> ModuleType:
    """The ``ray`` module, or a clear error naming the extra that installs it."""
    try:
        import ray
    except ImportError as exc:
        raise EngineError(
            f"--engine ray needs Ray, which is not installed here ({exc}): install the extra "
            f"with {RAY_INSTALL}, or use the default --engine local"
        ) from None
    return ray
