"""The HTTP API of ``rdm serve`` and the page that uses it.

:func:`create_app` turns a loaded :class:`rdm.pipeline.RDMPipeline` and the databases to offer into
a FastAPI app: a JSON API documented by its OpenAPI schema (``/api/openapi.json``) and one plain
HTML/JS page (``static/``, no build step, nothing loaded from elsewhere). Searches run at once, in
the request's thread; generations go through :class:`rdm.serve.jobs.JobQueue`, one model run at
a time, with progress by server-sent events (or polling) and cancellation.

Secure by default: the CLI binds to loopback and the app answers only loopback ``Host`` names
(DNS rebinding), refuses cross-origin writes, caps request bodies (413) and decoded pixels (422),
bounds every number it accepts, and never opens a path taken from a request: databases are
chosen by the names given at start-up, images by their integer database id, jobs by a random
id, static files from a fixed list.
"""

import asyncio
import contextlib
import dataclasses
import json
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from fastapi import Path as PathParam
from fastapi.middleware.trustedhost import TrustedHostMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel

import rdm
from rdm import conditioning as C
from rdm.database import Database
from rdm.errors import RdmError
from rdm.pipeline import RDMPipeline
from rdm.sampling import SAMPLERS, default_timesteps
from rdm.serve.jobs import TERMINAL, Job, JobQueue, QueueFull, png_bytes

#: Host header values a loopback server answers (anything else may be a DNS-rebinding page)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
#: database names: what the page and the API call a database; never a path
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
JOB_PATTERN = r"^[0-9a-f]{32}$"
MODES = ("text", "image", "unconditional", "class_pool")
STATIC = {"app.js": "text/javascript", "style.css": "text/css"}  # served from static/, no others
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the form's text fields beside one file
MAX_SEED = 2**31 - 1
#: what a job view takes from JobQueue.snapshot
JOB_PROGRESS = ("state", "position", "step", "batch", "batches", "fraction", "elapsed_s",
                "waited_s", "started_at", "finished_at", "error")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for. The OpenAPI schema states these bounds."""

    max_upload_bytes: int = 8 * 2**20  # an uploaded image file (413 past it)
    max_pixels: int = 4096 * 4096  # its decoded size (422 past it)
    max_k: int = 64  # search results
    max_n: int = 16  # images per generation
    max_steps: int = 250  # sampler steps
    max_guidance: float = 20.0
    max_pool: int = 1024  # class-pool size L
    max_text: int = 300  # characters of a prompt
    max_pending: int = 16  # generations waiting in the queue (503 past it)
    keep_jobs: int = 64  # finished jobs whose results stay fetchable
    abandon_after_s: float = 60.0  # cancel a job nobody polls or watches for this long
    thumb_px: int = 256  # database images are served at most this size
    image_cache: int = 4096  # database images kept encoded in memory


@dataclasses.dataclass
class Served:
    """One database offered by the server: the model retrieving from it, and its images."""

    name: str
    pipe: RDMPipeline
    source: object | None  # rdm.data.Source the database was built from, None when not at hand

    @property
    def db(self) -> Database:
        return self.pipe.db

    def describe(self, default: bool) -> dict:
        db = self.db
        return {
            "name": self.name,
            "count": len(db),
            "dim": db.dim,
            "source": db.source_spec,
            "split": db.split,
            "fingerprint": db.fingerprint,
            "encoder": db.identity.get("arch", ""),
            "unconditional": self.pipe.pseudo_query_prob is not None,
            "images": self.source is not None,
            "default": default,
        }


# --- response models (they make the OpenAPI schema say what comes back) --------------------------


class Neighbour(BaseModel):
    row: int
    id: int
    caption: str
    score: float | None = None
    image: str  # URL of the database image


class SearchResult(BaseModel):
    db: str
    query: str
    k: int
    results: list[Neighbour]


class SampleView(BaseModel):
    index: int
    seed: int
    label: str
    neighbors: list[Neighbour]
    query: Neighbour | None = None  # the pseudo-query x̃ (unconditional mode)
    uploaded_query: bool = False  # image mode: the uploaded image led the row
    image: str | None = None  # URL of the sample once the job is done


class JobView(BaseModel):
    id: str
    state: Literal["queued", "running", "done", "failed", "cancelled"]
    position: int | None  # place in the queue while queued (0: next)
    db: str
    mode: str
    label: str
    n: int
    seeds: list[int]
    sampler: str
    steps: int
    guidance: float
    eta: float
    step: int
    batch: int
    batches: int
    fraction: float
    elapsed_s: float
    waited_s: float
    started_at: float | None  # Unix time the model run began
    finished_at: float | None
    error: str | None
    samples: list[SampleView]
    grid: str | None  # URL of the result grid PNG once done
    events: str  # URL of the server-sent event stream


# --- the app -------------------------------------------------------------------------------------


def create_app(
    pipe: RDMPipeline,
    databases: Mapping[str, str | Path | Database] | None = None,
    *,
    limits: Limits = Limits(),
    allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
) -> FastAPI:
    """The API and page for ``pipe``'s model over ``databases`` (name -> database; default:
    ``pipe.db`` alone, named after its folder). The first is the default. A database of another
    encoder than the model's is not offered (``/api/info`` lists it under ``refused`` with the
    reason, and requests naming it get 409). ``allowed_hosts=("*",)`` answers any Host header."""
    state = _State(pipe, databases, limits)
    app = FastAPI(
        title="rdm serve",
        version=rdm.__version__,
        summary="Search a retrieval database and generate images from it (retrieval-augmented "
        "diffusion, Blattmann et al. 2022).",
        openapi_url="/api/openapi.json",
        docs_url=None,  # the Swagger / ReDoc pages load their scripts from a CDN
        redoc_url=None,
        lifespan=state.lifespan,
    )
    app.state.rdm = state
    _page_routes(app)
    _database_routes(app, state)
    _job_routes(app, state)
    if tuple(allowed_hosts) != ("*",):
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    app.add_middleware(Guard, max_upload=limits.max_upload_bytes)
    return app


class _State:
    """What the routes share: the served databases, the encoder, the queue and the limits."""

    def __init__(self, pipe, databases, limits: Limits):
        self.limits = limits
        self.model = pipe
        self.encoder = pipe.encoder  # loaded once, shared by every database's pipeline
        self.served: dict[str, Served] = {}
        self.refused: dict[str, str] = {}
        if databases is None:
            databases = {safe_name(pipe.db.root.name): pipe.db}
        for name, db in databases.items():
            if not re.match(NAME_PATTERN, name):
                raise RdmError(
                    f"database name {name!r}: use letters, digits, '.', '_' and '-' (at most 64)"
                )
            self._add(name, db)
        if not self.served:
            reasons = "; ".join(f"{n}: {r}" for n, r in self.refused.items())
            raise RdmError(f"no database fits the model, so there is nothing to serve ({reasons})")
        self.default = next(iter(self.served))
        self.queue = JobQueue(
            max_pending=limits.max_pending,
            keep=limits.keep_jobs,
            abandon_after=limits.abandon_after_s,
        )
        self.thumbnail = lru_cache(maxsize=limits.image_cache)(self._thumbnail)

    def _add(self, name: str, db) -> None:
        db = db if isinstance(db, Database) else Database.open(db)
        try:
            same = db.root.resolve() == self.model.db.root.resolve()
            pipe = self.model if same else self.model.with_database(db)
        except RdmError as exc:  # another encoder, another d: not offered
            self.refused[name] = str(exc)
            return
        # Read what every request needs now (and check it against the manifest), not in the
        # first requests' threads at once.
        db.index, db.ids, db.captions, db.vectors([0])
        self.served[name] = Served(name, pipe, C.database_source(db))

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI):
        self.queue.start()
        try:
            yield
        finally:
            await asyncio.to_thread(self.queue.stop)

    # --- lookups that answer the HTTP errors -------------------------------------------------

    def database(self, name: str) -> Served:
        if name in self.served:
            return self.served[name]
        if name in self.refused:
            raise HTTPException(409, f"database {name!r} is not offered: {self.refused[name]}")
        raise HTTPException(
            404, f"no database named {name!r}; choose one of {', '.join(self.served)}"
        )

    def job(self, job_id: str) -> Job:
        job = self.queue.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id} (unknown, or finished long ago)")
        return job

    def upload(self, file: UploadFile) -> Image.Image:
        """Decode an uploaded image: 413 past the byte limit, 422 past the pixel limit or when it
        is not an image."""
        from rdm.data import BadImage
        from rdm.data.images import decode_image_bytes

        data = file.file.read(self.limits.max_upload_bytes + 1)
        if len(data) > self.limits.max_upload_bytes:
            raise HTTPException(413, _too_large(self.limits.max_upload_bytes))
        try:
            return decode_image_bytes(data, max_pixels=self.limits.max_pixels)
        except BadImage as exc:
            raise HTTPException(
                422,
                f"uploaded file {file.filename!r}: {exc} (images of at most "
                f"{self.limits.max_pixels} pixels in PNG, JPEG, WebP, GIF, BMP or TIFF)",
            ) from None

    def neighbour(self, served: Served, row: int, score: float | None = None) -> dict:
        db = served.db
        item = int(db.ids[row])
        return {
            "row": int(row),
            "id": item,
            "caption": db.captions[row] or "",
            "score": None if score is None else round(float(score), 5),
            "image": f"/api/databases/{served.name}/images/{item}",
        }

    def _thumbnail(self, name: str, item: int) -> bytes:
        from rdm.data import BadImage

        served = self.served[name]
        if served.source is None:
            raise HTTPException(
                404, f"the images of database {name!r} ({served.db.source_spec}) are not here"
            )
        try:
            image = served.source.load(item)
        except BadImage as exc:
            raise HTTPException(404, f"image {item} of database {name!r}: {exc}") from None
        if max(image.size) > self.limits.thumb_px:
            image.thumbnail((self.limits.thumb_px, self.limits.thumb_px))
        return png_bytes(image)

    # --- jobs --------------------------------------------------------------------------------

    def job_view(self, job: Job, snap: dict | None = None) -> dict:
        snap = snap or self.queue.snapshot(job)
        done = snap["state"] == "done"
        base = f"/api/jobs/{job.id}"
        samples = [
            {**s, "image": f"{base}/samples/{s['index']}" if done else None}
            for s in job.info["samples"]
        ]
        request = {k: v for k, v in job.info.items() if k != "samples"}  # steps: the asked for
        progress = {k: snap[k] for k in JOB_PROGRESS}
        return {
            "id": job.id,
            **request,
            **progress,
            "samples": samples,
            "grid": f"{base}/grid.png" if done else None,
            "events": f"{base}/events",
        }


# --- routes --------------------------------------------------------------------------------------

NameParam = Annotated[str, PathParam(pattern=NAME_PATTERN, description="a served database")]
JobParam = Annotated[str, PathParam(pattern=JOB_PATTERN, description="a job id")]


def _page_routes(app: FastAPI) -> None:
    files = resources.files("rdm.serve") / "static"
    page = (files / "index.html").read_text(encoding="utf-8")
    static = {name: (files / name).read_bytes() for name in STATIC}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    def static_file(name: Annotated[str, PathParam(max_length=32)]) -> Response:
        if name not in static:
            raise HTTPException(404, f"no static file {name!r}")
        return Response(static[name], media_type=STATIC[name])


def _database_routes(app: FastAPI, state: _State) -> None:
    lim = state.limits

    @app.get("/api/info", tags=["server"])
    def info() -> dict:
        """The model, the databases offered (and those refused, with why), limits and defaults."""
        model, s = state.model, state.model.config.sample
        cfg = model.config.model
        return {
            "rdm_version": rdm.__version__,
            "model": {
                "name": model.run_dir.name if model.run_dir else "model",
                "k": model.k,
                "resolution": cfg.resolution,
                "channels": cfg.in_channels,
                "prediction": model.config.diffusion.prediction_type,
                "encoder": model.db.identity.get("arch", ""),
            },
            "databases": [d.describe(d.name == state.default) for d in state.served.values()],
            "refused": [{"name": n, "reason": r} for n, r in state.refused.items()],
            "modes": list(MODES),
            "text_modes": list(C.TEXT_MODES),
            "samplers": list(SAMPLERS),
            "defaults": {
                "sampler": s.sampler,
                "steps": s.steps,
                "guidance": s.guidance_scale,
                "eta": s.eta,
                "n": min(4, lim.max_n),
                "k": min(8, lim.max_k),
            },
            "limits": dataclasses.asdict(lim),
            "queue": state.queue.counts(),
        }

    @app.get("/api/databases", tags=["databases"])
    def databases() -> list[dict]:
        """The databases offered: those built with the model's encoder."""
        return [d.describe(d.name == state.default) for d in state.served.values()]

    @app.get(
        "/api/databases/{name}/images/{item_id}",
        tags=["databases"],
        response_class=Response,
        responses={200: {"content": {"image/png": {}}, "description": "the image as PNG"}},
    )
    def database_image(
        name: NameParam, item_id: Annotated[int, PathParam(ge=0, le=2**53)]
    ) -> Response:
        """An image of a served database by its id (the ``id`` of search results), as PNG."""
        served = state.database(name)
        try:
            served.db.rows_of([item_id])  # the database's own ids only
        except RdmError:
            raise HTTPException(404, f"database {name!r} holds no item with id {item_id}") from None
        png = state.thumbnail(name, item_id)
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.post("/api/search", tags=["databases"])
    def search(
        db: Annotated[str, Form(pattern=NAME_PATTERN, description="a served database")],
        k: Annotated[int, Form(ge=1, le=lim.max_k)] = 8,
        text: Annotated[str | None, Form(max_length=lim.max_text)] = None,
        image: Annotated[UploadFile | None, File(description="a query image")] = None,
    ) -> SearchResult:
        """The top-k neighbours of a text prompt or an uploaded image, by cosine similarity."""
        served = state.database(db)
        if (text is None) == (image is None):
            raise HTTPException(422, "give exactly one of 'text' or 'image'")
        if k > len(served.db):
            raise HTTPException(422, f"k = {k} but database {db!r} holds {len(served.db)} items")
        if image is not None:
            q, query = state.encoder.encode_images([state.upload(image)]), "uploaded image"
        else:
            if not text.strip():
                raise HTTPException(422, "the text prompt is empty")
            q, query = state.encoder.encode_texts([text]), text
        scores, rows = served.db.search(q, k)  # (1, k) cosine scores and database rows
        results = [state.neighbour(served, r, s) for r, s in zip(rows[0], scores[0], strict=True)]
        return SearchResult(db=db, query=query, k=k, results=results)


def _job_routes(app: FastAPI, state: _State) -> None:
    lim, queue = state.limits, state.queue
    defaults = state.model.config.sample

    @app.post("/api/generate", status_code=202, tags=["generation"])
    def generate(
        db: Annotated[str, Form(pattern=NAME_PATTERN)],
        mode: Annotated[Literal[MODES], Form()] = "text",
        text: Annotated[str | None, Form(max_length=lim.max_text)] = None,
        text_mode: Annotated[Literal[C.TEXT_MODES], Form()] = "neighbors",
        image: Annotated[UploadFile | None, File()] = None,
        include_query: Annotated[bool, Form()] = False,
        top_m: Annotated[float | None, Form(gt=0, le=1)] = None,
        weighted: Annotated[bool, Form()] = False,
        uniform: Annotated[bool, Form()] = False,
        pool_size: Annotated[int, Form(ge=1, le=lim.max_pool)] = 32,
        n: Annotated[int, Form(ge=1, le=lim.max_n)] = 4,
        seed: Annotated[int, Form(ge=0, le=MAX_SEED)] = 0,
        sampler: Annotated[Literal[tuple(SAMPLERS)] | None, Form()] = None,
        steps: Annotated[int | None, Form(ge=1, le=lim.max_steps)] = None,
        guidance: Annotated[float | None, Form(ge=0, le=lim.max_guidance)] = None,
        eta: Annotated[float | None, Form(ge=0, le=1)] = None,
    ) -> JSONResponse:
        """Queue a generation: ``n`` images from a text (three text modes), an uploaded image,
        pseudo-queries x̃ ~ p(x̃) (``unconditional``, optionally top-m) or a class pool. Answers
        202 with the job (its conditioning neighbours already known); follow ``events`` (SSE)
        or poll ``/api/jobs/{id}``. Unset sampler options come from the model's config."""
        served = state.database(db)
        if (mode == "image") != (image is not None):
            raise HTTPException(422, "mode 'image' needs an uploaded 'image' (and only it does)")
        if mode in ("text", "class_pool") and not (text or "").strip():
            raise HTTPException(422, f"mode {mode!r} needs a non-empty 'text'")
        options = {
            "sampler": sampler or defaults.sampler,
            "steps": steps or defaults.steps,
            "guidance_scale": defaults.guidance_scale if guidance is None else guidance,
            "eta": defaults.eta if eta is None else eta,
        }
        query = state.upload(image) if image is not None else None
        try:
            default_timesteps(options["sampler"], served.pipe.config.diffusion, options["steps"])
            cond = _conditioning(
                state,
                served,
                mode,
                n,
                seed,
                text=text,
                text_mode=text_mode,
                query=query,
                include_query=include_query,
                top_m=top_m,
                weighted=weighted,
                uniform=uniform,
                pool_size=pool_size,
            )
        except RdmError as exc:
            raise HTTPException(422, str(exc)) from None
        info = {
            "db": db,
            "mode": mode if mode != "text" else f"text ({text_mode})",
            "label": cond.labels[0] if cond.labels else mode,
            "n": n,
            "seeds": list(range(seed, seed + n)),
            "sampler": options["sampler"],
            "steps": options["steps"],
            "guidance": options["guidance_scale"],
            "eta": options["eta"],
            "samples": _sample_views(state, served, cond, seed),
        }
        job = Job(
            pipe=served.pipe,
            cond=cond,
            seeds=info["seeds"],
            options=options,
            grid=lambda images: C.grid(cond, images, served.db, source=served.source),
            info=info,
        )
        try:
            queue.submit(job)
        except QueueFull as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from None
        except RdmError as exc:
            raise HTTPException(503, str(exc)) from None
        view = state.job_view(job)
        return JSONResponse(view, status_code=202, headers={"Location": f"/api/jobs/{job.id}"})

    @app.get("/api/jobs/{job_id}", tags=["generation"])
    def job_status(job_id: JobParam) -> JobView:
        """A job's state, progress and (once done) the URLs of its images. Polling keeps the job
        alive: one that nobody polls or watches for ``abandon_after_s`` is cancelled."""
        return JobView(**state.job_view(state.job(job_id)))

    @app.post("/api/jobs/{job_id}/cancel", tags=["generation"])
    def cancel(job_id: JobParam) -> JobView:
        """Cancel a job: a queued one at once, a running one at its next sampler step."""
        state.job(job_id)
        job = queue.cancel(job_id, "cancelled by the client")
        return JobView(**state.job_view(job))

    @app.get(
        "/api/jobs/{job_id}/events",
        tags=["generation"],
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def events(job_id: JobParam) -> StreamingResponse:
        """Server-sent events: one ``queued`` / ``progress`` event (the job view) whenever the job
        changes, then ``done``, ``failed`` or ``cancelled``, and the stream ends. Closing the
        stream before the job has finished cancels it (the client has gone)."""
        job = state.job(job_id)
        return StreamingResponse(
            _event_stream(state, job),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    @app.get(
        "/api/jobs/{job_id}/samples/{index}",
        tags=["generation"],
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
    )
    def sample_image(
        job_id: JobParam, index: Annotated[int, PathParam(ge=0, le=lim.max_n)]
    ) -> Response:
        """Sample ``index`` of a finished job as PNG."""
        job = state.job(job_id)
        if job.state != "done":
            raise HTTPException(409, f"job {job_id} is {job.state}, not done")
        if index >= len(job.samples):
            raise HTTPException(404, f"job {job_id} has {len(job.samples)} samples")
        return Response(job.samples[index], media_type="image/png")

    @app.get(
        "/api/jobs/{job_id}/grid.png",
        tags=["generation"],
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
    )
    def grid(job_id: JobParam) -> Response:
        """The result grid of a finished job (per row: the neighbours that conditioned a sample,
        then the sample) as a PNG download."""
        job = state.job(job_id)
        if job.state != "done" or job.grid_png is None:
            raise HTTPException(409, f"job {job_id} is {job.state}, not done")
        name = f"rdm-{job.info['db']}-{job.id[:8]}.png"
        return Response(
            job.grid_png,
            media_type="image/png",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )


def _conditioning(
    state: _State, served: Served, mode: str, n: int, seed: int, *, text, text_mode, query, **kw
) -> C.Conditioning:
    """The conditioning of one request, by the plain functions of :mod:`rdm.conditioning`."""
    db, enc, k = served.db, state.encoder, served.pipe.k
    if mode == "text":
        return C.text_context(db, enc, k, text, n, mode=text_mode)
    if mode == "image":
        return C.image_context(db, enc, k, query, n, include_query=kw["include_query"])
    if mode == "class_pool":
        return C.class_pool_context(db, enc, k, text, n, pool_size=kw["pool_size"], seed=seed)
    return C.pseudo_query_context(
        db,
        k,
        n,
        prob=served.pipe.pseudo_query_prob,
        top_m=kw["top_m"],
        weighted=kw["weighted"],
        uniform=kw["uniform"],
        seed=seed,
    )


def _sample_views(state: _State, served: Served, cond: C.Conditioning, seed: int) -> list[dict]:
    views = []
    for i in range(len(cond)):
        q = cond.query_rows[i]
        views.append(
            {
                "index": i,
                "seed": seed + i,
                "label": cond.labels[i],
                "neighbors": [state.neighbour(served, r) for r in cond.rows[i]],
                "query": state.neighbour(served, q) if q is not None else None,
                "uploaded_query": cond.query_images[i] is not None,
            }
        )
    return views


async def _event_stream(state: _State, job: Job):
    """SSE frames for ``job`` until it is finished; the stream's end while it is not finished
    (the client went away: Starlette cancels this generator) cancels the job."""
    queue = state.queue
    queue.watch(job, +1)
    try:
        last, beat = -1, time.monotonic()
        while True:
            snap = queue.snapshot(job)
            if snap["version"] != last:
                last, beat = snap["version"], time.monotonic()
                kind = {"queued": "queued", "running": "progress"}.get(snap["state"], snap["state"])
                yield f"event: {kind}\ndata: {json.dumps(state.job_view(job, snap))}\n\n"
                if snap["state"] in TERMINAL:
                    return
            elif time.monotonic() - beat > 10:
                beat = time.monotonic()
                yield ": still here\n\n"  # a comment line: keeps proxies from closing the stream
            await asyncio.sleep(0.05)
    finally:
        queue.watch(job, -1)


# --- security and limits, below the routes ---------------------------------------------------------


class Guard:
    """Pure ASGI middleware (streams pass through untouched): security headers on every answer,
    413 for a body over ``max_upload`` + FORM_OVERHEAD bytes (before it is read when
    Content-Length says so; the upload itself is checked against ``max_upload`` by the route),
    and 403 for a write whose ``Origin`` is another site (a page elsewhere posting here)."""

    HEADERS = [
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"no-referrer"),
        (b"cross-origin-resource-policy", b"same-origin"),
        (
            b"content-security-policy",
            b"default-src 'self'; img-src 'self' blob: data:; script-src 'self'; "
            b"style-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
            b"form-action 'self'",
        ),
    ]

    def __init__(self, app, max_upload: int):
        self.app, self.max_upload = app, max_upload
        self.max_body = max_upload + FORM_OVERHEAD

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.HEADERS]}
            await send(message)

        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["method"] not in ("GET", "HEAD", "OPTIONS") and _foreign(headers):
            return await _answer(
                send_with_headers,
                403,
                f"cross-origin request from {headers.get('origin')} refused: use the page this "
                "server serves, or a client that sends no Origin header",
            )
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return await _answer(send_with_headers, 413, _too_large(self.max_upload))

        seen = 0

        async def receive_limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:  # a chunked body with no Content-Length
                    raise HTTPException(413, _too_large(self.max_upload))
            return message

        await self.app(scope, receive_limited, send_with_headers)


def _foreign(headers: dict) -> bool:
    """Whether a request's Origin names another site than the Host it was sent to."""
    origin = headers.get("origin")
    if origin is None:
        return False  # not sent by a browser page (curl, scripts): no cross-site risk
    return origin == "null" or urlsplit(origin).netloc.lower() != headers.get("host", "").lower()


async def _answer(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _too_large(limit: int) -> str:
    size = f"{limit / 2**20:.1f} MiB" if limit >= 2**20 else f"{limit / 2**10:.1f} KiB"
    return (
        f"the upload is larger than the limit of {limit} bytes ({size}); send a smaller image, "
        "or start rdm serve with a larger --max-upload-mb"
    )


# --- running it ------------------------------------------------------------------------------------


def safe_name(text: str) -> str:
    """A database name from a folder name: unsafe characters become '-'."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", text).strip(".-_")[:64]
    return name or "db"


def database_names(specs: Sequence[str]) -> dict[str, Path]:
    """``NAME=DIR`` or ``DIR`` (named after its folder) -> {name: dir}; repeated names get -2,
    -3, ... so every database keeps its own name."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = str(spec).partition("=")
        if not sep or not re.match(NAME_PATTERN, name):
            name, path = safe_name(Path(spec).resolve().name), str(spec)
        base, i = name, 1
        while name in out:
            i += 1
            name = f"{base}-{i}"
        out[name] = Path(path)
    return out


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread (``port=0``: a free one) and yield its
    base URL; the server stops when the block ends. For tests, benchmarks and notebooks."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="rdm-serve-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RdmError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(30)
