"""The Ray engine: database shards and neighbour blocks as tasks on encoder actors.

Each worker is a Ray actor that loads the encoder once (``make_encoder()``, on its GPU when it
was given one) and then runs the stages' own units of work, unchanged: a database shard
(:func:`rdm.db_build.build_shard`: a partition of ids embedded and written atomically to
``_build/``) or a neighbour block (:func:`rdm.neighbors.neighbor_block`). A unit already written
is skipped, so the shards of a build are exactly the local engine's (same ids per shard, same
batches) and a rerun after any failure resumes:

- a worker that dies (killed, out of memory, its node lost) is restarted by Ray and its unit is
  retried (``max_restarts`` / ``max_task_retries``); the unit writes nothing until it is done;
- a driver that dies leaves the finished units on disk: the same command resumes from them.

The driver plans (the build's resume checks; the neighbours' threshold and blocks) and finishes
(index and manifest; the joined neighbours file) with the local engine's code. Output and
database directories must be on a filesystem every worker sees (one machine, NFS, a mounted
bucket).

Bits: each worker runs torch with ``threads`` CPU threads (Ray also sets ``OMP_NUM_THREADS`` to
the actor's CPUs, which FAISS follows). CPU matmuls may change their last bits with the thread
count, so the Ray build equals the local one bit for bit when the local engine runs with the
same ``--threads`` (tests/test_ray_engine.py, bench/ray_engine.py).

Why Ray core actors and not Ray Data's ``map_batches``: (1) the unit is a shard that writes its
own file and is skipped when written, a task per shard; ``map_batches`` re-cuts the stream into
its own blocks and returns rows through the object store to one writer, so keeping shard
composition (and the resume contract) would mean one-row-per-shard datasets on top of it.
(2) Measured on the 2-core machine with other jobs holding both cores (Ray 2.55.1, load
average 4-8; docs/scale.md): a trivial ``ray.data.range(100).map_batches(F, batch_size=25,
concurrency=1).take_all()`` on ``ray.init(num_cpus=2)`` did not finish in 3 minutes, twice. Ray
Data's default (V2) cluster autoscaler asks a coordinator actor for the cluster's size with a
5 s timeout (``RAY_DATA_AUTOSCALING_COORDINATOR_REQUEST_GET_TIMEOUT_S``); that actor's worker
process took longer to start, every ask timed out, the cached answer was "0 CPU", and the
executor waited ("Cluster resources are not enough to run any task"). It is CPU starvation, not
a lack of CPUs: with ``RAY_DATA_CLUSTER_AUTOSCALER=V1`` the same job finished, in 134 s, most of
it starting the extra processes (stats and coordinator actors, read-task workers). Ray also
starts workers 15 nice steps below the driver, which a busy machine starves; the engine starts
its local cluster with ``RAY_worker_niceness=0``. Its own actors cost one process per worker.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rdm.data import Source
from rdm.database import Database
from rdm.encoders import Encoder
from rdm.engines import EngineError, import_ray
from rdm.errors import RdmError

#: a dead worker is restarted (and its unit retried) this many times before the run fails
MAX_RESTARTS = 3


class RayEngine:
    """Runs build shards and neighbour blocks on ``workers`` Ray actors.

    ``make_encoder``: a picklable function of no arguments that returns the encoder, called once
    in each worker (e.g. ``functools.partial(load_encoder, spec, device="cuda")``).
    ``address``: an existing cluster (``ray.init(address=...)``, e.g. ``"auto"`` or
    ``"ray://head:10001"``); None starts a local one with ``num_cpus`` CPUs (default: this
    machine's), unless this process is already connected to one. ``workers``: actors (default:
    the cluster's GPUs / ``num_gpus`` with GPUs, else its CPUs / ``threads``). ``threads``: torch
    CPU threads per worker (also its Ray CPUs). ``num_gpus``: GPUs per worker (0: CPU workers).

    Use as a context manager, or call :meth:`close`: the actors are kept between calls (the
    encoder loads once) and stopped on close, with the local cluster if this engine started it.
    """

    def __init__(
        self,
        make_encoder: Callable[[], Encoder],
        *,
        address: str | None = None,
        workers: int | None = None,
        threads: int = 1,
        num_gpus: float = 0.0,
        num_cpus: int | None = None,
    ) -> None:
        if threads < 1 or (workers is not None and workers < 1) or num_gpus < 0:
            raise EngineError(
                f"--threads and --workers must be positive and GPUs per worker not negative, got "
                f"threads={threads}, workers={workers}, num_gpus={num_gpus}"
            )
        self.ray = import_ray()
        self.make_encoder = make_encoder
        self.threads = threads
        self.num_gpus = num_gpus
        self._started = False
        if not self.ray.is_initialized():
            self._init(address, num_cpus)
        self.workers = workers or self._default_workers()
        self._actors: list = []

    # -- cluster --

    def _init(self, address: str | None, num_cpus: int | None) -> None:
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING"}
        if address is None:
            kwargs["num_cpus"] = num_cpus or os.cpu_count() or 1
        # a local cluster's workers do the work the user asked for, at the priority the command
        # was given (nice), not Ray's default of 15 nice steps below it: on a busy machine that
        # default starves them (read once, by the raylet that ray.init starts)
        added = address is None and "RAY_worker_niceness" not in os.environ
        if added:
            os.environ["RAY_worker_niceness"] = "0"
        with warnings.catch_warnings():  # Ray's notice about a future GPU-visibility default
            warnings.simplefilter("ignore", FutureWarning)
            try:
                self.ray.init(address=address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise EngineError(
                    f"cannot connect to the Ray cluster at --address {address} ({exc}); start "
                    "one with 'ray start --head' or leave out --address for a local cluster"
                ) from None
            finally:
                if added:
                    del os.environ["RAY_worker_niceness"]
        self._started = address is None
        where = f"cluster at {address}" if address else f"local cluster ({kwargs['num_cpus']} CPUs)"
        _note(f"ray: connected to a {where}")

    def _default_workers(self) -> int:
        resources = self.ray.cluster_resources()
        if self.num_gpus > 0:
            return max(1, int(resources.get("GPU", 0) // self.num_gpus))
        return max(1, int(resources.get("CPU", 1) // self.threads))

    def close(self) -> None:
        for actor in self._actors:
            self.ray.kill(actor)
        self._actors = []
        if self._started:
            self.ray.shutdown()
            self._started = False

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- stages --

    def build_database(self, source: Source, split: str, encoder: Encoder, out, **options) -> Path:
        """:func:`rdm.db_build.build_database` with its shards run on the workers. ``encoder``
        (the driver's) only names the identity the plan records; the workers load their own."""
        from rdm.db_build import build_database

        return build_database(source, split, encoder, out, run_shards=self._run_shards, **options)

    def compute_neighbors(
        self, db: Database, source: Source, split: str, encoder: Encoder, **options
    ) -> Path:
        """:func:`rdm.neighbors.compute_neighbors` with its blocks run on the workers: the plan
        (and threshold calibration, with ``encoder``) and the joined file are made here."""
        from rdm.neighbors import finish_neighbors, plan_neighbors

        progress = options.pop("progress", True)
        plan = plan_neighbors(db, source, split, encoder, **options)
        pending = plan.pending()
        sizes = {b: stop - start for b, (start, stop) in enumerate(plan.blocks)}
        source_ref, plan_ref = self.ray.put(source), self.ray.put(plan)
        calls = {b: ("neighbor_block", (str(db.root), plan_ref, b, source_ref)) for b in pending}
        with _progress_bar(plan.ids_count, "neighbours", progress) as bar:
            bar.update(plan.ids_count - sum(sizes[b] for b in pending))
            self._run(calls, sizes, bar, what=f"neighbour blocks of {plan.out}")
        return finish_neighbors(db, plan)

    def _run_shards(
        self, out: Path, pending: dict[int, np.ndarray], source: Source, batch_size: int, bar
    ) -> None:
        """``run_shards`` of :func:`rdm.db_build.build_database`."""
        source_ref = self.ray.put(source)
        calls = {
            s: ("build_shard", (str(out), s, ids, source_ref, batch_size))
            for s, ids in pending.items()
        }
        self._run(calls, {s: len(ids) for s, ids in pending.items()}, bar, what=f"shards of {out}")

    # -- dispatch --

    def _run(self, calls: dict[int, tuple[str, tuple]], sizes: dict[int, int], bar, what) -> None:
        """Run ``{unit: (worker method, args)}`` with one unit in flight per worker; advance
        ``bar`` by ``sizes[unit]`` as each finishes. When a unit fails, no new one starts, those
        in flight finish (and are kept), then the error is raised: an RdmError from inside the
        unit as it was (the CLI prints it without a traceback), anything else, or a worker dead
        beyond its restarts, as an EngineError saying that a rerun resumes."""
        ray = self.ray
        queue = list(calls.values())
        idle = list(self._pool(len(calls)))
        in_flight: dict = {}  # ObjectRef -> the actor running it
        failure: Exception | None = None
        while queue or in_flight:
            while idle and queue and failure is None:
                actor, (method, args) = idle.pop(), queue.pop(0)
                in_flight[getattr(actor, method).remote(*args)] = actor
            if not in_flight:
                break
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            idle.append(in_flight.pop(ref))
            try:
                bar.update(sizes[ray.get(ref)])
            except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as exc:
                failure = failure or exc
        if failure is not None:
            raise _unit_failure(ray, failure, what)

    def _pool(self, n_units: int) -> list:
        """The actors, started on first use (never more than there are units to run)."""
        want = min(self.workers, n_units)
        if len(self._actors) < want:
            actor = self.ray.remote(
                num_cpus=self.threads,
                num_gpus=self.num_gpus,
                max_restarts=MAX_RESTARTS,
                max_task_retries=MAX_RESTARTS,
            )(Worker)
            self._actors += [
                actor.remote(self.make_encoder, self.threads, os.getcwd())
                for _ in range(want - len(self._actors))
            ]
        return self._actors[:want]


def _unit_failure(ray, exc: Exception, what: str) -> Exception:
    """The error to raise for a failed unit (see :meth:`RayEngine._run`)."""
    cause = getattr(exc, "cause", None)
    if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(cause, RdmError):
        return cause
    if isinstance(exc, ray.exceptions.RayActorError):
        return EngineError(
            f"a Ray worker died on the {what} and its unit could not be retried ({exc}); the "
            "finished ones are kept: rerun the same command to resume"
        )
    return EngineError(
        f"a Ray worker failed on the {what} ({exc}); the finished ones are kept: fix the cause "
        "and rerun the same command to resume"
    )


class Worker:
    """One Ray actor's state: the encoder (loaded once, on first use) and open databases."""

    def __init__(self, make_encoder: Callable[[], Encoder], threads: int, cwd: str) -> None:
        # relative paths (--out, the database, the neighbours file) mean what they mean to the
        # driver: on another node this needs the same directory on a shared filesystem
        if os.path.isdir(cwd):
            os.chdir(cwd)
        self.make_encoder = make_encoder
        self.threads = threads
        self._encoder: Encoder | None = None
        self._databases: dict[tuple[str, str], Database] = {}

    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = self.make_encoder()
            # the encoder's torch (if it uses torch) runs with the engine's thread count: CPU
            # matmuls can change their last bits with it (the local engine's --threads)
            torch = sys.modules.get("torch")
            if torch is not None:
                torch.set_num_threads(self.threads)
        return self._encoder

    def build_shard(
        self, out: str, s: int, ids: np.ndarray, source: Source, batch_size: int
    ) -> int:
        from rdm.db_build import build_shard

        build_shard(Path(out), s, ids, source, self.encoder(), batch_size)
        return s

    def neighbor_block(self, root: str, plan, b: int, source: Source) -> int:
        from rdm.neighbors import neighbor_block

        key = (root, plan.db_fingerprint)  # a database rebuilt in place is opened again
        if key not in self._databases:
            self._databases[key] = Database.open(root)
        neighbor_block(self._databases[key], source, self.encoder(), plan, b)
        return b


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=desc, disable=not enabled)


def _note(message: str) -> None:
    print(message, file=sys.stderr)
