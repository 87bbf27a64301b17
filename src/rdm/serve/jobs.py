"""Generation jobs and the queue that runs them one at a time.

A model run takes seconds on a CPU and uses every core it is given, so requests queue instead of
running side by side: one worker thread takes the oldest pending :class:`Job`, samples it through
:class:`rdm.pipeline.RDMPipeline` and keeps its PNGs in memory for the client to fetch. The
pipeline's per-step callback reports progress and is also where work stops: a job that is
cancelled, whose client disconnected or that nobody has looked at for ``abandon_after`` seconds
raises :class:`rdm.sampling.Cancelled` at the next sampler step, so no further model evaluation
happens for it.

Everything here is plain threading; the HTTP layer (:mod:`rdm.serve.app`) only submits, reads
snapshots and cancels.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import threading
import time
import uuid
from collections.abc import Callable

from PIL import Image

from rdm.errors import RdmError

#: a job's life: queued -> running -> done | failed | cancelled (or queued -> cancelled)
TERMINAL = ("done", "failed", "cancelled")


class QueueFull(RdmError):
    """More jobs are waiting than the server accepts; the client should retry later."""


@dataclasses.dataclass(eq=False)  # a job is itself: compared (and found in the queue) by identity
class Job:
    """One generation request: what to sample (a conditioning and a pipeline), its progress and
    its result. Fields after ``options`` change while it runs; read them through
    :meth:`JobQueue.snapshot`, which takes the queue's lock."""

    pipe: object  # rdm.pipeline.RDMPipeline of the chosen database
    cond: object  # rdm.conditioning.Conditioning, one context per sample
    seeds: list[int]
    options: dict  # sampler, steps, eta, guidance_scale: passed to the pipeline call
    grid: Callable[[list[Image.Image]], Image.Image]  # the result grid of the samples
    info: dict = dataclasses.field(default_factory=dict)  # echoed to the client as is
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    state: str = "queued"
    step: int = 0  # sampler steps finished in the current batch
    steps: int = 0
    batch: int = 0
    batches: int = 0
    created: float = dataclasses.field(default_factory=time.time)  # Unix times
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    samples: list[bytes] = dataclasses.field(default_factory=list)  # PNG bytes per sample
    grid_png: bytes | None = None
    cancel_reason: str | None = None
    watchers: int = 0  # open event streams
    last_seen: float = dataclasses.field(default_factory=time.time)
    version: int = 0  # bumped on every change an event stream should send


class JobQueue:
    """Pending jobs in order, one worker thread, and the finished jobs kept for their clients.

    ``max_pending`` bounds the waiting line (:class:`QueueFull` past it); the ``keep`` most recent
    finished jobs stay fetchable; a job nobody polls or watches for ``abandon_after`` seconds is
    cancelled (its client is gone).
    """

    def __init__(self, *, max_pending: int = 16, keep: int = 64, abandon_after: float = 60.0):
        self.max_pending, self.keep, self.abandon_after = max_pending, keep, abandon_after
        self._jobs: dict[str, Job] = {}  # every job still known, oldest first
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.model_runs = 0  # jobs that reached the model (for tests and /api/info)

    # --- the worker ---------------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._work, name="rdm-serve-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel what is pending or running and wait for the worker to end."""
        with self._cond:
            self._stopping = True
            for job in list(self._pending) + [
                j for j in self._jobs.values() if j.state == "running"
            ]:
                self._cancel(job, "the server is shutting down")
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._pending.popleft()
                job.state, job.started = "running", time.time()
                self._changed(job, *self._pending)  # every waiting job moved up one place
            self._run(job)

    def _run(self, job: Job) -> None:
        """Sample ``job`` (outside the lock), then record its result or why it stopped."""
        from rdm.sampling import Cancelled

        def on_step(info: dict) -> None:  # the pipeline callback: progress, and where work stops
            with self._cond:
                job.step, job.steps = info["i"] + 1, info["n"]
                job.batch, job.batches = info["batch"], info["batches"]
                self._changed(job)
                self._check_cancelled(job)

        try:
            with self._cond:
                self._check_cancelled(job)
                self.model_runs += 1
            images = job.pipe(job.cond, job.seeds, callback=on_step, progress=False, **job.options)
            samples = [png_bytes(im) for im in images]
            grid = png_bytes(job.grid(images))
        except Cancelled as exc:
            self._finish(job, "cancelled", error=str(exc))
        except RdmError as exc:
            self._finish(job, "failed", error=str(exc))
        except Exception as exc:  # a bug must fail this one job, not kill the worker
            self._finish(job, "failed", error=f"internal error: {type(exc).__name__}: {exc}")
        else:
            self._finish(job, "done", samples=samples, grid=grid)

    def _finish(self, job: Job, state: str, *, error=None, samples=(), grid=None) -> None:
        with self._cond:
            job.state, job.error, job.finished = state, error, time.time()
            job.samples, job.grid_png = list(samples), grid
            self._changed(job)
            self._forget_old()

    # --- what the HTTP layer calls ------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._stopping or self._thread is None:
                raise RdmError("the server is not accepting jobs (not started or shutting down)")
            if len(self._pending) >= self.max_pending:
                raise QueueFull(
                    f"{len(self._pending)} generation requests are already waiting (the limit "
                    f"is {self.max_pending}); retry when one has finished"
                )
            self._jobs[job.id] = job
            self._pending.append(job)
            self._changed(job)
            self._cond.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def cancel(self, job_id: str, reason: str = "cancelled by the client") -> Job | None:
        """Cancel a pending job at once, a running one at its next sampler step."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is not None:
                self._cancel(job, reason)
            return job

    def snapshot(self, job: Job, *, seen: bool = True) -> dict:
        """A consistent copy of the job's changing fields (``seen``: counts as the client
        looking at it, which keeps an unwatched job from being abandoned)."""
        with self._cond:
            if seen:
                job.last_seen = time.time()
            position = self._pending.index(job) if job.state == "queued" else None
            now = job.finished or time.time()
            return {
                "state": job.state,
                "position": position,
                "step": job.step,
                "steps": job.steps,
                "batch": job.batch,
                "batches": job.batches,
                "fraction": _fraction(job),
                "elapsed_s": round(now - job.started, 3) if job.started else 0.0,
                "waited_s": round((job.started or now) - job.created, 3),
                "started_at": job.started,
                "finished_at": job.finished,
                "error": job.error,
                "version": job.version,
                "n_samples": len(job.samples),
                "has_grid": job.grid_png is not None,
            }

    def watch(self, job: Job, delta: int) -> None:
        """An event stream opened (+1) or closed (-1); the last one closing on an unfinished job
        means its client disconnected, which cancels it."""
        with self._cond:
            job.watchers += delta
            job.last_seen = time.time()
            if delta < 0 and job.watchers <= 0 and job.state not in TERMINAL:
                self._cancel(job, "the client disconnected")

    def counts(self) -> dict:
        with self._cond:
            states = collections.Counter(j.state for j in self._jobs.values())
            return {"pending": len(self._pending), **states, "model_runs": self.model_runs}

    # --- under the lock -----------------------------------------------------------------------

    def _cancel(self, job: Job, reason: str) -> None:
        if job.state in TERMINAL:
            return
        job.cancel_reason = job.cancel_reason or reason
        if job.state == "queued":
            self._pending.remove(job)
            job.state, job.error, job.finished = "cancelled", job.cancel_reason, time.time()
            self._changed(job, *self._pending)
            self._forget_old()
        else:
            self._changed(job)  # running: the next on_step raises Cancelled

    def _check_cancelled(self, job: Job) -> None:
        """Raise Cancelled for a job cancelled by its client or abandoned by it."""
        from rdm.sampling import Cancelled

        idle = time.time() - job.last_seen
        if job.cancel_reason is None and job.watchers <= 0 and idle > self.abandon_after:
            job.cancel_reason = f"nobody polled or watched the job for {self.abandon_after:g} s"
        if job.cancel_reason is not None:
            raise Cancelled(job.cancel_reason)

    def _changed(self, *jobs: Job) -> None:
        for job in jobs:
            job.version += 1

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.state in TERMINAL]
        for job in finished[: max(0, len(finished) - self.keep)]:
            del self._jobs[job.id]


def _fraction(job: Job) -> float:
    if job.state == "done":
        return 1.0
    if not job.steps or not job.batches:
        return 0.0
    return round((job.batch * job.steps + job.step) / (job.batches * job.steps), 4)


def png_bytes(image: Image.Image) -> bytes:
    """``image`` encoded as PNG."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
