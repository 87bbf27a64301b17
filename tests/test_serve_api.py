"""``rdm serve``'s HTTP API, called directly (TestClient, and uvicorn on loopback where a real
connection matters: disconnects and the load test).

The world is tiny and fast: two folders of 12 px colour squares / discs, a fixed random
projection as encoder (tests/fakes_retrieval.py), databases built through the real code, and a
random-initialised tiny UNet (8 px, k = 3). Results are checked against the library called
directly: search against numpy brute force, samples against ``RDMPipeline.__call__`` with the
same conditioning and seeds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import io
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import torch
from fakes_retrieval import ProjectionEncoder
from fastapi.testclient import TestClient
from PIL import Image

import rdm.pipeline
from rdm import conditioning as C
from rdm.cli import main
from rdm.config import preset
from rdm.data import open_source
from rdm.database import Database, build_database
from rdm.errors import RdmError
from rdm.model import RetrievalUNet
from rdm.neighbors import compute_neighbors
from rdm.pipeline import RDMPipeline, pseudo_query_prob
from rdm.serve import Limits, create_app, serving
from rdm.serve.app import database_names, is_loopback

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "grey": (128,) * 3}
HOST = "http://127.0.0.1"  # TestClient's base URL: a loopback Host, as a browser would send


def shapes(folder: Path, n: int, shape: str, seed: int) -> Path:
    """``n`` noisy 12 px squares (or discs on white) cycling through COLOURS, captioned."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:12, :12]
    disc = (yy - 5.5) ** 2 + (xx - 5.5) ** 2 <= 20
    for i in range(n):
        name = list(COLOURS)[i % 4]
        px = np.array(COLOURS[name]) + rng.normal(0, 25, (12, 12, 3))
        if shape == "disc":
            px[~disc] = 255
        Image.fromarray(np.clip(px, 0, 255).astype(np.uint8)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a {name} {shape}")
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    enc = ProjectionEncoder(dim=16, seed=0)
    squares = open_source(str(shapes(root / "squares", 40, "square", seed=0)))
    discs = open_source(str(shapes(root / "discs", 24, "disc", seed=1)))
    db_a = Database.open(build_database(squares, "db", enc, root / "db-a", progress=False))
    compute_neighbors(db_a, squares, "train", enc, k=6, progress=False)
    db_b = Database.open(build_database(discs, "all", enc, root / "db-b", progress=False))
    other = ProjectionEncoder(dim=16, seed=1)  # another encoder: its database is refused
    db_c = Database.open(build_database(squares, "all", other, root / "db-c", progress=False))
    cfg = preset("tiny")
    cfg.model = dataclasses.replace(cfg.model, context_dim=16, k=3)
    cfg.encoder = enc.identity
    torch.manual_seed(0)
    model = RetrievalUNet(cfg.model).eval().requires_grad_(False)
    pipe = RDMPipeline(model, cfg, db_a, encoder=enc, pseudo_query_prob=pseudo_query_prob(db_a))
    return {
        "root": root,
        "enc": enc,
        "pipe": pipe,
        "dbs": {"squares": db_a, "discs": db_b, "other": db_c},
        "squares": squares,
    }


def make_app(world, **limits):
    return create_app(world["pipe"], world["dbs"], limits=Limits(**limits))


@pytest.fixture(scope="module")
def client(world):
    with TestClient(make_app(world), base_url=HOST) as c:
        yield c


@pytest.fixture
def slow_model(world, monkeypatch):
    """The model's forward takes >= 10 ms and is counted (and its thread recorded)."""
    model, real = world["pipe"].model, world["pipe"].model.forward
    calls = []

    def forward(*args, **kwargs):
        calls.append(threading.get_ident())
        time.sleep(0.01)
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    return calls


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def wait_for(c, job_id: str, states=("done", "failed", "cancelled"), timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/api/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} is still {job['state']}")


def sse_events(lines) -> list[tuple[str, dict]]:
    import json

    events, kind = [], None
    for line in lines:
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            events.append((kind, json.loads(line[6:])))
    return events


# --- the schema and the page ----------------------------------------------------------------------


def test_openapi_schema_documents_every_route_and_its_bounds(client):
    schema = client.get("/api/openapi.json").json()
    assert {
        "/api/info",
        "/api/databases",
        "/api/databases/{name}/images/{item_id}",
        "/api/search",
        "/api/generate",
        "/api/jobs/{job_id}",
        "/api/jobs/{job_id}/cancel",
        "/api/jobs/{job_id}/events",
        "/api/jobs/{job_id}/samples/{index}",
        "/api/jobs/{job_id}/grid.png",
    } <= set(schema["paths"])
    forms = schema["components"]["schemas"]
    gen = next(v for k, v in forms.items() if k.startswith("Body_generate"))["properties"]
    lim = Limits()
    assert gen["n"]["maximum"] == lim.max_n and gen["n"]["minimum"] == 1
    assert gen["steps"]["anyOf"][0]["maximum"] == lim.max_steps
    assert gen["guidance"]["anyOf"][0]["maximum"] == lim.max_guidance
    assert gen["mode"]["enum"] == ["text", "image", "unconditional", "class_pool"]
    search = next(v for k, v in forms.items() if k.startswith("Body_search"))["properties"]
    assert search["k"]["maximum"] == lim.max_k
    # the Swagger / ReDoc pages load scripts from a CDN: not served
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404


def test_the_page_loads_only_what_the_server_serves(client):
    import re

    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert "/static/app.js" in refs and "/static/style.css" in refs
    for ref in refs:
        assert ref.startswith("/"), ref  # same origin, nothing from elsewhere
        assert client.get(ref).status_code == 200, ref
    for asset in ("/static/app.js", "/static/style.css"):
        text = client.get(asset).text
        assert "http://" not in text and "https://" not in text and "//cdn" not in text
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"


def test_info_offers_only_databases_of_the_models_encoder(client, world):
    info = client.get("/api/info").json()
    assert [d["name"] for d in info["databases"]] == ["squares", "discs"]
    assert info["databases"][0]["default"] and info["databases"][0]["unconditional"]
    assert not info["databases"][1]["unconditional"]  # no neighbours file: no p(x̃)
    assert [r["name"] for r in info["refused"]] == ["other"]
    assert "encoder" in info["refused"][0]["reason"]
    assert info["model"]["k"] == 3 and info["model"]["resolution"] == 8
    for route, data in (("/api/search", {"text": "x"}), ("/api/generate", {"text": "x"})):
        r = client.post(route, data={"db": "other", **data})
        assert r.status_code == 409 and "not offered" in r.json()["detail"]
        r = client.post(route, data={"db": "nonesuch", **data})
        assert r.status_code == 404 and "squares" in r.json()["detail"]


# --- search ---------------------------------------------------------------------------------------


def test_text_search_is_the_brute_force_top_k(client, world):
    db = world["dbs"]["squares"]
    r = client.post("/api/search", data={"db": "squares", "text": "a red square", "k": 5})
    assert r.status_code == 200
    got = r.json()["results"]
    q = world["enc"].encode_texts(["a red square"])[0]  # (d,)
    scores = db.embeddings.astype(np.float32) @ q  # (N,) cosine, unit vectors
    top = np.argsort(-scores, kind="stable")[:5]
    assert [n["row"] for n in got] == top.tolist()
    np.testing.assert_allclose([n["score"] for n in got], scores[top], atol=1e-4)
    assert [n["caption"] for n in got] == [db.captions[r] for r in top]
    assert [n["id"] for n in got] == db.ids[top].tolist()


def test_image_search_finds_the_uploaded_image_first(client, world):
    db = world["dbs"]["squares"]
    item = int(db.ids[3])
    image = world["squares"].load(item)
    files = {"image": ("query.png", png(image), "image/png")}
    r = client.post("/api/search", data={"db": "squares", "k": 3}, files=files)
    assert r.status_code == 200
    first = r.json()["results"][0]
    assert first["id"] == item and first["score"] == pytest.approx(1.0, abs=1e-3)
    # its image is served by id, and is the database's own image
    served = client.get(first["image"])
    assert served.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(served.content))), np.asarray(image))


def test_switching_the_database_changes_the_neighbours(client):
    def captions(db):
        r = client.post("/api/search", data={"db": db, "text": "a blue thing", "k": 6})
        return [n["caption"] for n in r.json()["results"]]

    squares, discs = captions("squares"), captions("discs")
    assert all(c.endswith("square") for c in squares) and all(c.endswith("disc") for c in discs)


def test_search_needs_exactly_one_query(client, world):
    files = {"image": ("q.png", png(world["squares"].load(1)), "image/png")}
    both = client.post("/api/search", data={"db": "squares", "text": "x"}, files=files)
    assert both.status_code == 422 and "exactly one" in both.json()["detail"]
    assert client.post("/api/search", data={"db": "squares"}).status_code == 422
    empty = client.post("/api/search", data={"db": "squares", "text": "   "})
    assert empty.status_code == 422 and "empty" in empty.json()["detail"]


# --- generation -----------------------------------------------------------------------------------


def test_a_generation_equals_the_pipeline_called_directly(client, world):
    r = client.post(
        "/api/generate",
        data={"db": "squares", "mode": "text", "text": "a green square", "n": 2, "seed": 5,
              "steps": 4, "sampler": "ddim", "guidance": 1.5, "eta": 0.0},
    )  # fmt: skip
    assert r.status_code == 202 and r.headers["location"] == f"/api/jobs/{r.json()['id']}"
    job = r.json()
    pipe, db = world["pipe"], world["dbs"]["squares"]
    cond = C.text_context(db, world["enc"], pipe.k, "a green square", 2)
    # the conditioning neighbours are known (and shown) before the model runs
    assert [[n["row"] for n in s["neighbors"]] for s in job["samples"]] == cond.rows
    with client.stream("GET", job["events"]) as stream:
        events = sse_events(stream.iter_lines())
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and "progress" in kinds
    steps = [e["step"] for k, e in events if k == "progress"]
    assert steps == sorted(steps) and max(steps) <= 4
    done = events[-1][1]
    assert done["fraction"] == 1.0 and done["seeds"] == [5, 6]
    expected = pipe(cond, [5, 6], sampler="ddim", steps=4, guidance_scale=1.5, eta=0.0)
    for s, image in zip(done["samples"], expected, strict=True):
        got = Image.open(io.BytesIO(client.get(s["image"]).content))
        assert np.array_equal(np.asarray(got), np.asarray(image))
    grid = client.get(done["grid"])
    assert grid.headers["content-disposition"].startswith("attachment")
    want = C.grid(cond, expected, db, source=world["squares"])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(grid.content))), np.asarray(want))


@pytest.mark.parametrize(
    "form, label",
    [
        ({"mode": "text", "text": "a red square", "text_mode": "text+neighbors"}, "text+neigh"),
        ({"mode": "text", "text": "a red square", "text_mode": "text"}, "text: a red"),
        ({"mode": "unconditional", "top_m": 0.5}, "pseudo-query"),
        ({"mode": "unconditional", "uniform": True}, "pseudo-query"),
        ({"mode": "class_pool", "text": "a grey square", "pool_size": 6}, "class pool (6)"),
        ({"mode": "image", "include_query": True}, "query image + its embedding"),
    ],
)
def test_every_mode_generates_with_its_neighbours(client, world, form, label):
    files = None
    if form["mode"] == "image":
        files = {"image": ("q.png", png(world["squares"].load(2)), "image/png")}
    r = client.post(
        "/api/generate", data={"db": "squares", "n": 2, "steps": 2, **form}, files=files
    )
    assert r.status_code == 202, r.text
    job = wait_for(client, r.json()["id"])
    assert job["state"] == "done" and label in job["label"]
    k_rows = {"text": 0, "text+neighbors": 2}.get(form.get("text_mode"), 3)
    if form["mode"] == "image":
        k_rows = 2  # φ(x) first, then k - 1 neighbours
    assert all(len(s["neighbors"]) == k_rows for s in job["samples"])
    if form["mode"] == "unconditional":
        assert all(s["query"] is not None for s in job["samples"])
    assert all(client.get(s["image"]).status_code == 200 for s in job["samples"])


def test_unconditional_without_p_of_x_says_how_to_get_it(client):
    r = client.post("/api/generate", data={"db": "discs", "mode": "unconditional"})
    assert r.status_code == 422 and "rdm db neighbors" in r.json()["detail"]


def test_cancel_stops_the_model_at_the_next_step(client, slow_model):
    r = client.post("/api/generate", data={"db": "squares", "text": "x", "steps": 200, "n": 1})
    job_id = r.json()["id"]
    wait_for(client, job_id, states=("running",))
    while client.get(f"/api/jobs/{job_id}").json()["step"] < 2:
        time.sleep(0.01)
    cancelled = client.post(f"/api/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200
    job = wait_for(client, job_id)
    calls = len(slow_model)
    time.sleep(0.2)
    assert job["state"] == "cancelled" and "cancelled by the client" in job["error"]
    assert len(slow_model) == calls and job["step"] < 20  # stopped, far from 200 steps
    assert client.get(f"/api/jobs/{job_id}/grid.png").status_code == 409
    # the worker is free for the next job
    r = client.post("/api/generate", data={"db": "squares", "text": "x", "steps": 2})
    assert wait_for(client, r.json()["id"])["state"] == "done"


def test_a_queued_job_cancelled_never_reaches_the_model(world, slow_model):
    with TestClient(make_app(world), base_url=HOST) as c:
        first = c.post("/api/generate", data={"db": "squares", "text": "x", "steps": 30}).json()
        second = c.post("/api/generate", data={"db": "squares", "text": "y", "steps": 30}).json()
        assert second["state"] == "queued" and second["position"] in (0, 1)
        c.post(f"/api/jobs/{second['id']}/cancel")
        assert c.get(f"/api/jobs/{second['id']}").json()["state"] == "cancelled"
        assert wait_for(c, first["id"])["state"] == "done"
        assert c.app.state.rdm.queue.model_runs == 1


def test_a_client_that_disconnects_cancels_its_job(world, slow_model):
    app = make_app(world)
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        job = c.post("/api/generate", data={"db": "squares", "text": "x", "steps": 200}).json()
        with c.stream("GET", job["events"]) as stream:
            for line in stream.iter_lines():
                if line.startswith("event: progress"):
                    break  # the model is running: hang up
        state = wait_for(c, job["id"])
        calls = len(slow_model)
        time.sleep(0.2)
    assert state["state"] == "cancelled" and "disconnected" in state["error"]
    assert len(slow_model) == calls and state["step"] < 50


def test_a_job_nobody_watches_is_abandoned(world, slow_model):
    with TestClient(make_app(world, abandon_after_s=0.3), base_url=HOST) as c:
        job = c.post("/api/generate", data={"db": "squares", "text": "x", "steps": 200}).json()
        time.sleep(1.0)  # no polling, no event stream
        queue = c.app.state.rdm.queue
        state = queue.snapshot(queue.get(job["id"]), seen=False)
    assert state["state"] == "cancelled" and "nobody polled" in state["error"]


def test_generations_queue_and_run_one_at_a_time(world, slow_model):
    with TestClient(make_app(world, max_pending=2), base_url=HOST) as c:
        ids = [
            c.post("/api/generate", data={"db": "squares", "text": "x", "steps": 5, "seed": s})
            for s in range(3)
        ]
        full = c.post("/api/generate", data={"db": "squares", "text": "x", "steps": 5})
        jobs = [wait_for(c, r.json()["id"]) for r in ids]
    # 1 running + 2 waiting: the fourth is refused, with when to retry
    assert full.status_code == 503 and full.headers["retry-after"] == "5"
    assert "waiting" in full.json()["detail"]
    assert [j["state"] for j in jobs] == ["done"] * 3
    runs = [(j["started_at"], j["finished_at"]) for j in jobs]
    assert all(b[0] >= a[1] for a, b in zip(runs, runs[1:], strict=False))  # in order, no overlap
    assert len(set(slow_model)) == 1  # one worker thread ran the model


def test_results_before_done_and_unknown_jobs(client, slow_model):
    job = client.post("/api/generate", data={"db": "squares", "text": "x", "steps": 50}).json()
    assert client.get(f"/api/jobs/{job['id']}/samples/0").status_code == 409
    assert client.get(f"/api/jobs/{job['id']}/grid.png").status_code == 409
    client.post(f"/api/jobs/{job['id']}/cancel")
    unknown = "0" * 32
    assert client.get(f"/api/jobs/{unknown}").status_code == 404
    assert client.post(f"/api/jobs/{unknown}/cancel").status_code == 404


# --- limits and security --------------------------------------------------------------------------


def test_an_oversized_upload_is_refused_with_413(world):
    with TestClient(make_app(world, max_upload_bytes=4096), base_url=HOST) as c:
        big = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        data = png(Image.fromarray(big))  # ~12 kB of noise: over the 4 kB cap
        files = {"image": ("big.png", data, "image/png")}
        for route in ("/api/search", "/api/generate"):
            r = c.post(route, data={"db": "squares", "mode": "image"}, files=files)
            assert r.status_code == 413 and "4096 bytes" in r.json()["detail"], route

        def chunks():  # no Content-Length: counted while it arrives
            yield b"--x\r\n"
            for _ in range(100):
                yield b"\0" * 1024

        r = c.post(
            "/api/search",
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=x"},
        )
        assert r.status_code == 413 and "4096 bytes" in r.json()["detail"]


def test_a_real_client_sending_a_large_body_gets_the_413(world):
    """Content-Length over the cap: refused before the body is parsed, and a real client that
    is still sending 2 MB reads the answer."""
    with serving(make_app(world, max_upload_bytes=4096)) as url:
        files = {"image": ("big.png", b"\0" * 2**21, "image/png")}
        r = httpx.post(f"{url}/api/search", data={"db": "squares"}, files=files, timeout=30)
    assert r.status_code == 413 and "4096 bytes" in r.json()["detail"]


def test_too_many_pixels_or_not_an_image_is_refused_with_422(world):
    with TestClient(make_app(world, max_pixels=32 * 32), base_url=HOST) as c:
        flat = png(Image.new("RGB", (40, 40), "white"))  # small file, 1600 pixels
        r = c.post("/api/search", data={"db": "squares"}, files={"image": ("a.png", flat)})
        assert r.status_code == 422 and "1600 pixels" in r.json()["detail"]
        r = c.post("/api/search", data={"db": "squares"}, files={"image": ("b.png", b"hello")})
        assert r.status_code == 422 and "not an image" in r.json()["detail"]


@pytest.mark.parametrize(
    "route, field, value",
    [
        ("/api/search", "k", 0),
        ("/api/search", "k", 65),
        ("/api/search", "k", 30),  # within the cap, but the database holds 21 items
        ("/api/search", "text", "x" * 301),
        ("/api/generate", "n", 0),
        ("/api/generate", "n", 17),
        ("/api/generate", "steps", 0),
        ("/api/generate", "steps", 251),
        ("/api/generate", "guidance", -0.5),
        ("/api/generate", "guidance", 21),
        ("/api/generate", "eta", 2),
        ("/api/generate", "seed", -1),
        ("/api/generate", "seed", 2**31),
        ("/api/generate", "pool_size", 0),
        ("/api/generate", "pool_size", 5000),
        ("/api/generate", "top_m", 0),
        ("/api/generate", "top_m", 1.5),
        ("/api/generate", "mode", "shell"),
        ("/api/generate", "sampler", "euler"),
        ("/api/generate", "text_mode", "all"),
        ("/api/generate", "steps", "1e9"),
        ("/api/generate", "n", "nan"),
    ],
)
def test_numbers_and_choices_are_bounded(client, route, field, value):
    base = {"db": "squares", "text": "a red square", "mode": "text"}
    if field == "pool_size" or field == "top_m":
        base["mode"] = "class_pool" if field == "pool_size" else "unconditional"
    r = client.post(route, data={**base, field: value})
    assert r.status_code == 422, (field, value, r.text)
    assert field in r.text or "k = 30" in r.text


TRAVERSALS = [
    "../../../../etc/passwd",
    "..%2f..%2f..%2fetc%2fpasswd",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "..",
    "%2e%2e",
    "....//....//etc/passwd",
    "/etc/passwd",
    "%2fetc%2fpasswd",
    "squares/../../db-c",
    "squares%2f..%2f..%2fdb-c%2fmanifest.json",
    "manifest.json",
    "..\\..\\manifest.json",
    "squares%00",
    "%252e%252e%252fetc",
]


def raw_get(url: str, target: str) -> tuple[int, str]:
    """GET ``target`` byte for byte (HTTP clients normalise '..' away before sending)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
        s.sendall(
            f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), data.partition(b"\r\n\r\n")[2].decode("latin-1")


def test_path_traversal_is_refused_on_every_route_with_an_id_or_a_name(world):
    root = str(world["root"])
    good_id = int(world["dbs"]["squares"].ids[0])
    attacks = TRAVERSALS + [root + "/db-a", root.replace("/", "%2f") + "%2fdb-a", "-1", "1e3"]
    with serving(make_app(world)) as url, httpx.Client(base_url=url, timeout=30) as c:
        job = c.post("/api/generate", data={"db": "squares", "text": "x", "steps": 2}).json()
        wait_for(c, job["id"])
        templates = [
            "/api/databases/{x}/images/" + str(good_id),
            "/api/databases/squares/images/{x}",
            "/api/jobs/{x}",
            "/api/jobs/{x}/events",
            "/api/jobs/{x}/samples/0",
            "/api/jobs/{x}/grid.png",
            f"/api/jobs/{job['id']}/samples/{{x}}",
            "/static/{x}",
            "/{x}",
        ]
        for template in templates:
            for attack in attacks:
                target = template.format(x=attack)
                status, body = raw_get(url, target)
                # 400: uvicorn refuses a malformed request line before the app sees it
                assert status in (400, 404, 422), (target, status)
                assert "root:" not in body and '"format"' not in body, target
        for attack in attacks:  # the database field of the forms, and the cancel route
            for route in ("/api/search", "/api/generate"):
                r = c.post(route, data={"db": attack, "text": "x"})
                assert r.status_code in (404, 422), (route, attack, r.status_code)
                assert "root:" not in r.text
            r = c.post(f"/api/jobs/{attack}/cancel")
            assert r.status_code in (404, 405, 422), attack
        # the same routes answer with a good name and id (the refusals are not blanket 404s)
        assert raw_get(url, f"/api/databases/squares/images/{good_id}")[0] == 200
        assert raw_get(url, f"/api/jobs/{job['id']}/samples/0")[0] == 200
        assert raw_get(url, "/static/app.js")[0] == 200


def test_an_image_id_outside_the_database_is_not_read(client, world, monkeypatch):
    """Ids of the training split exist in the source folder but not in the database: refused
    before anything is loaded."""
    db = world["dbs"]["squares"]
    outside = sorted(set(range(40)) - set(db.ids.tolist()))[0]
    loads = []
    source = client.app.state.rdm.served["squares"].source
    monkeypatch.setattr(source, "load", lambda i: loads.append(i))
    r = client.get(f"/api/databases/squares/images/{outside}")
    assert r.status_code == 404 and loads == []


def test_only_loopback_host_names_are_answered(client):
    assert client.get("/api/info").status_code == 200
    for host in ("evil.example", "evil.example:8000", "10.0.0.1"):
        r = client.get("/api/info", headers={"host": host})
        assert r.status_code == 400, host  # a DNS-rebinding page gets nothing


def test_cross_origin_writes_are_refused(client):
    data = {"db": "squares", "text": "a red square"}
    r = client.post("/api/search", data=data, headers={"origin": "http://evil.example"})
    assert r.status_code == 403 and "cross-origin" in r.json()["detail"]
    r = client.post("/api/search", data=data, headers={"origin": "null"})
    assert r.status_code == 403
    assert client.post("/api/search", data=data, headers={"origin": HOST}).status_code == 200


# --- load -----------------------------------------------------------------------------------------


def load_bench():
    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "bench" / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_load_50_searches_and_10_queued_generations(world, capsys):
    """Bounded load on loopback: nothing dropped, nothing mixed up, one model run at a time; the
    samples of each job are those of the same request run alone (the pipeline directly)."""
    bench = load_bench()
    app = make_app(world)
    form = {"mode": "text", "text": "a red square", "n": 1, "steps": 3}
    with serving(app) as url:
        result = asyncio.run(bench.run_load(url, "squares", generate=form, k=5))
    assert result["problems"] == []
    assert len(result["search_s"]) == 50 and len(result["generation_s"]) == 10
    pipe, db = world["pipe"], world["dbs"]["squares"]
    cond = C.text_context(db, world["enc"], pipe.k, "a red square", 1)
    for job, samples in zip(result["jobs"], result["samples"], strict=True):
        (image,) = pipe(cond, job["seeds"], steps=3)
        assert samples == [png(image)], job["seeds"]
    with capsys.disabled():
        print("\n" + bench.report(result))


# --- the command ----------------------------------------------------------------------------------


@pytest.fixture
def cli_app(world, monkeypatch, tmp_path):
    """``rdm serve`` up to uvicorn.run, which hands back the app instead of serving it."""
    run = world["pipe"].save_pretrained(tmp_path / "run")
    enc = world["enc"]
    monkeypatch.setattr(rdm.pipeline, "load_encoder", lambda spec: enc)
    seen = {}

    def fake_run(app, host, port, **kw):
        seen.update(app=app, host=host, port=port)

    monkeypatch.setattr("uvicorn.run", fake_run)
    return run, seen


def test_cli_serves_a_run_with_named_databases(cli_app, world, capsys):
    run, seen = cli_app
    dbs = world["dbs"]
    args = ["serve", str(run), "--db", str(dbs["squares"].root), "--db",
            f"discs={dbs['discs'].root}", "--db", str(dbs["other"].root), "--port", "0"]  # fmt: skip
    assert main(args) == 0
    state = seen["app"].state.rdm
    assert list(state.served) == ["db-a", "discs"] and list(state.refused) == ["db-c"]
    assert seen["host"] == "127.0.0.1"
    captured = capsys.readouterr()
    assert "not offering database db-c" in captured.err
    assert "http://127.0.0.1:0/" in captured.out
    with TestClient(seen["app"], base_url=HOST) as c:
        r = c.post("/api/search", data={"db": "discs", "text": "a red disc", "k": 2})
        assert r.status_code == 200
        assert c.get("/api/info", headers={"host": "evil.example"}).status_code == 400


def test_cli_on_another_address_warns_and_answers_any_host(cli_app, world, capsys):
    run, seen = cli_app
    assert main(["serve", str(run), "--db", str(world["dbs"]["squares"].root), "--host",
                 "0.0.0.0"]) == 0  # fmt: skip
    assert "not loopback" in capsys.readouterr().err
    with TestClient(seen["app"], base_url="http://example.lan") as c:
        assert c.get("/api/info").status_code == 200


def test_cli_without_arguments_builds_the_demo_database(monkeypatch, capsys, tmp_path):
    import rdm.demo

    seen = {}

    def demo_database(out, source, encoder):
        seen.update(out=out, source=source.spec)
        raise RdmError("stop here: the test only checks what would be built")

    monkeypatch.setattr(rdm.demo, "demo_database", demo_database)
    monkeypatch.setattr("rdm.encoders.load_encoder", lambda spec: f"encoder {spec}")
    monkeypatch.setattr("rdm.data.open_source", lambda spec: type("S", (), {"spec": spec})())
    assert main(["serve"]) == 2
    assert seen == {"out": Path("runs/demo"), "source": "fashion-mnist"}
    assert "stop here" in capsys.readouterr().err


def test_cli_with_only_a_database_serves_the_demo_model_and_refuses_a_misfit(world, capsys):
    assert main(["serve", "--db", str(world["dbs"]["squares"].root)]) == 2
    err = capsys.readouterr().err
    assert "demo-fashion" in err and "db-a" in err  # the shipped model and the database


@pytest.mark.parametrize(
    "extra, message",
    [(["--port", "70000"], "--port"), (["--max-n", "0"], "--max-n"), (["--queue", "0"], "--queue")],
)
def test_cli_bad_arguments_get_a_clear_error(extra, message, capsys):
    assert main(["serve", *extra]) == 2
    assert message in capsys.readouterr().err


def test_database_names_and_loopback():
    names = database_names(["runs/fm-db", "other/fm-db", "style=x/y", "bad name=z"])
    assert list(names) == ["fm-db", "fm-db-2", "style", "bad-name-z"]
    assert names["style"] == Path("x/y")
    assert [is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "localhost")] == [True] * 4
    assert [is_loopback(h) for h in ("0.0.0.0", "192.168.1.2", "example.com")] == [False] * 3
