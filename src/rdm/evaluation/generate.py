"""The generation glue: N conditionings of one inference mode, sampled through the public pipeline
API, written as PNGs with a ``conditioning.jsonl`` record, and read back for ``--samples DIR``.

Each sample's record holds what conditioned it (the database rows, the query item or the
prompt), so faithfulness can be measured again later from the folder alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from rdm.errors import RdmError

MODES = ("image", "text", "unconditional", "class-pool")
RECORD_NAME = "conditioning.jsonl"


@dataclass
class Sampling:
    """How samples are drawn; ``None`` means the run's own default."""

    sampler: str | None = None
    steps: int | None = None
    eta: float | None = None
    guidance: float | None = None
    clip_sample: bool | None = None  # clip x̂_0 to [-1, 1] while sampling
    guidance_rescale: float | None = None  # CFG rescale φ
    weights: str = "ema"  # "ema" or "model" (the raw weights)
    batch_size: int = 16
    top_m: float | None = None  # unconditional: keep the top-m fraction of p(x̃)
    pool_size: int = 32  # class-pool: L
    # text: the prompt retrieves k neighbours ("neighbors"), is the first of the k context tokens
    # ("text+neighbors") or the whole context ("text"), rdm.conditioning.text_context
    text_mode: str = "neighbors"


def conditionings(pipe, mode: str, n: int, *, queries, prompts, seed: int, sampling: Sampling):
    """One conditioning per sample, in sample order, and each sample's record.

    ``queries``: (source id, PIL image) pairs for ``image`` mode, one per sample; ``prompts``: the
    prompts ``text`` / ``class-pool`` cycle through (sample i gets prompt i mod P).
    """
    from rdm import conditioning as C

    db, k = pipe.db, pipe.k
    if mode == "image":
        if len(queries) < n:
            raise RdmError(f"--mode image needs {n} query images, got {len(queries)}")
        conds = [C.image_context(db, pipe.encoder, k, im, 1) for _, im in queries[:n]]
        extra = [{"query_id": int(i)} for i, _ in queries[:n]]
    elif mode in ("text", "class-pool"):
        if not prompts:
            raise RdmError(f"--mode {mode} needs prompts (--prompt TEXT)")
        chosen = [prompts[i % len(prompts)] for i in range(n)]
        if mode == "text":
            per_prompt = {
                p: C.text_context(db, pipe.encoder, k, p, 1, mode=sampling.text_mode)
                for p in prompts[:n]
            }
            conds = [per_prompt[p] for p in chosen]
        else:  # k of the prompt's top-L, drawn per sample from seed + i
            conds = [
                C.class_pool_context(
                    db, pipe.encoder, k, p, 1, pool_size=sampling.pool_size, seed=seed + i
                )
                for i, p in enumerate(chosen)
            ]
        extra = [{"prompt": p} for p in chosen]
    elif mode == "unconditional":
        conds = [
            C.pseudo_query_context(
                db, k, n, prob=pipe.pseudo_query_prob, top_m=sampling.top_m, seed=seed
            )
        ]
        extra = [{} for _ in range(n)]
    else:
        raise RdmError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
    cond = C.concat(conds)
    return cond, _records(cond, extra, seed)


def sample(pipe, cond, seed: int, sampling: Sampling) -> list[Image.Image]:
    """Image i from seed + i (one generator per sample: independent of the batch size)."""
    return pipe(
        cond,
        seeds=list(range(seed, seed + len(cond))),
        sampler=sampling.sampler,
        steps=sampling.steps,
        eta=sampling.eta,
        guidance_scale=sampling.guidance,
        clip_sample=sampling.clip_sample,
        guidance_rescale=sampling.guidance_rescale,
        batch_size=sampling.batch_size,
    )


def write_samples(images: list[Image.Image], records: list[dict], out: Path) -> None:
    from rdm.io import write_text
    from rdm.sheets import save_png

    out.mkdir(parents=True, exist_ok=True)
    for image, rec in zip(images, records, strict=True):
        save_png(image, out / rec["file"])
    write_text(out / RECORD_NAME, "".join(json.dumps(r) + "\n" for r in records))


def read_samples(folder: Path, n: int | None) -> tuple[list[Image.Image], list[dict] | None]:
    """Sample PNGs of ``folder`` in name order (the first ``n``) and their records, if any."""
    if not folder.is_dir():
        raise RdmError(f"--samples {folder} is not a directory of PNG images")
    # 'rdm sample' and 'rdm eval' name samples sample-SEED.png (beside a grid.png): those, else all
    files = sorted(folder.glob("sample-*.png")) or sorted(folder.glob("*.png"))
    if n is not None:
        if len(files) < n:
            raise RdmError(f"--samples {folder} holds {len(files)} PNG images but --n asks for {n}")
        files = files[:n]
    if not files:
        raise RdmError(f"--samples {folder} holds no PNG images")
    images = []
    for f in files:
        with Image.open(f) as im:
            im.load()
            images.append(im)
    records = None
    record_file = folder / RECORD_NAME
    if record_file.is_file():
        by_file = {}
        for line in record_file.read_text().splitlines():
            rec = json.loads(line)
            by_file[rec["file"]] = rec
        if all(f.name in by_file for f in files):
            records = [by_file[f.name] for f in files]
    return images, records


def _records(cond, extra: list[dict], seed: int) -> list[dict]:
    """Per sample: its PNG name, seed, the database rows that conditioned it, the pseudo-query
    row x̃ (unconditional) and the query id or prompt."""
    out = []
    for i, (rows, e) in enumerate(zip(cond.rows, extra, strict=True)):
        rec = {
            "file": f"sample-{seed + i:05d}.png",
            "seed": seed + i,
            "rows": [int(r) for r in rows],
        }
        x_tilde = getattr(cond, "query_rows", [None] * len(cond))[i]
        if x_tilde is not None:
            rec["pseudo_query_row"] = int(x_tilde)
        out.append({**rec, **e})
    return out
