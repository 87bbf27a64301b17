"""Load test of ``rdm serve`` on loopback: concurrent searches and queued generations.

    .venv/bin/python bench/serve_load.py [RUN] [--db DIR] [--searches 50] [--generations 10]

Starts the server in this process (uvicorn on 127.0.0.1, a free port; with no RUN the shipped demo
model and ``runs/demo/db``, as ``rdm serve`` does), then at once sends ``--searches`` text searches
(distinct prompts) and ``--generations`` generation requests (distinct seeds), which queue: one
model run at a time. Each generation is followed through its server-sent event stream. Prints the
latency percentiles and checks that nothing was dropped or mixed up between clients: every
request answered 200/202, every search equals the same search sent alone afterwards, every job
ended ``done`` with its own seeds and prompt, the jobs ran one at a time, and samples of
different seeds differ. :func:`run_load` is also what ``tests/test_serve_api.py`` runs on a tiny
model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np


async def run_load(
    base_url: str,
    db: str,
    *,
    searches: int = 50,
    generations: int = 10,
    k: int = 8,
    generate: dict | None = None,
    timeout: float = 600.0,
) -> dict:
    """Send the load and check it; returns latencies (s) and every answer for more checks."""
    import httpx

    generate = {"mode": "text", "text": "Sneaker", "n": 1, **(generate or {})}
    prompts = [f"prompt {i}" for i in range(searches)]
    limits = httpx.Limits(max_connections=searches + generations + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:

        async def search(text: str):
            t0 = time.perf_counter()
            r = await client.post("/api/search", data={"db": db, "text": text, "k": k})
            return time.perf_counter() - t0, r

        async def generation(seed: int):
            t0 = time.perf_counter()
            r = await client.post("/api/generate", data={"db": db, "seed": seed, **generate})
            if r.status_code != 202:
                return time.perf_counter() - t0, r, None, []
            job, kinds = r.json(), []
            async with client.stream("GET", job["events"]) as stream:
                kind = None
                async for line in stream.aiter_lines():
                    if line.startswith("event: "):
                        kind = line[7:]
                        kinds.append(kind)
                    elif line.startswith("data: ") and kind in ("done", "failed", "cancelled"):
                        job = json.loads(line[6:])
                        break
            return time.perf_counter() - t0, r, job, kinds

        t0 = time.perf_counter()
        results = await asyncio.gather(
            *[search(p) for p in prompts], *[generation(1000 + 10 * i) for i in range(generations)]
        )
        wall = time.perf_counter() - t0
        found, jobs = results[:searches], results[searches:]
        alone, alone_s = [], []
        for p in prompts:  # the same searches one at a time: the reference, and the baseline
            t, r = await search(p)
            alone.append(r)
            alone_s.append(t)
        samples = [
            [(await client.get(s["image"])).content for s in job["samples"]] if job else []
            for _, _, job, _ in jobs
        ]

    problems = []
    for p, (_, r), ref in zip(prompts, found, alone, strict=True):
        if r.status_code != 200:
            problems.append(f"search {p!r}: {r.status_code} {r.text[:200]}")
        elif r.json() != ref.json():
            problems.append(f"search {p!r}: the answer under load differs from the one alone")
    for i, (_, r, job, kinds) in enumerate(jobs):
        seed = 1000 + 10 * i
        n = generate["n"]
        if r.status_code != 202:
            problems.append(f"generation {i}: {r.status_code} {r.text[:200]}")
        elif job is None or job["state"] != "done":
            problems.append(f"generation {i}: ended {job and job['state']}: {job and job['error']}")
        elif job["seeds"] != list(range(seed, seed + n)) or (
            generate.get("text") and generate["text"] not in job["label"]
        ):
            problems.append(f"generation {i}: answered with another request's job")
        elif kinds[-1] != "done":
            problems.append(f"generation {i}: events {kinds}")
    done = [job for _, _, job, _ in jobs if job and job["state"] == "done"]
    runs = sorted((j["started_at"], j["finished_at"]) for j in done)
    if any(b[0] < a[1] for a, b in zip(runs, runs[1:], strict=False)):
        problems.append("two model runs overlapped (the queue should run one at a time)")
    flat = [b for per_job in samples for b in per_job]
    if len(set(flat)) != len(flat):
        problems.append("two jobs with different seeds returned the same sample")
    return {
        "wall_s": wall,
        "search_s": [t for t, _ in found],
        "search_alone_s": alone_s,
        "generation_s": [t for t, _, _, _ in jobs],
        "queued_s": [j["waited_s"] for j in done],
        "run_s": [j["elapsed_s"] for j in done],
        "jobs": [job for _, _, job, _ in jobs],
        "samples": samples,
        "problems": problems,
    }


def percentiles(values) -> str:
    if not len(values):
        return "none"
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return f"p50 {p50:.3f}  p90 {p90:.3f}  p99 {p99:.3f}  max {max(values):.3f}  (n={len(values)})"


def report(result: dict) -> str:
    lines = [
        f"wall {result['wall_s']:.2f} s for everything at once",
        f"search latency (s)        {percentiles(result['search_s'])}",
        f"  the same, one at a time {percentiles(result['search_alone_s'])}",
        f"generation, submit->done  {percentiles(result['generation_s'])}",
        f"  of which waiting        {percentiles(result['queued_s'])}",
        f"  of which running        {percentiles(result['run_s'])}",
        "problems: " + ("; ".join(result["problems"]) or "none (nothing dropped or mixed up)"),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import platform

    import torch

    from rdm.cli.serve import load
    from rdm.serve import create_app, serving

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, nargs="?")
    p.add_argument("--db", action="append", default=[])
    p.add_argument("--demo-dir", type=Path, default=Path("runs/demo"))
    p.add_argument("--encoder")
    p.add_argument("--weights", default="ema")
    p.add_argument("--searches", type=int, default=50)
    p.add_argument("--generations", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe, databases = load(args)
    app = create_app(pipe, databases)
    db = app.state.rdm.default
    gen = {"mode": "text", "text": "Sneaker", "n": args.n, "steps": args.steps}
    with serving(app) as url:
        result = asyncio.run(
            run_load(url, db, searches=args.searches, generations=args.generations, generate=gen)
        )
    print(
        f"rdm serve load: {args.searches} concurrent searches + {args.generations} queued "
        f"generations (n={args.n}, {args.steps} steps) on {url} against {db} "
        f"({len(pipe.db)} images); torch threads {args.threads}; {platform.processor() or ''} "
        f"{platform.machine()}"
    )
    print(report(result))
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
