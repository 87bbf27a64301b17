"""``rdm sample RUN --db DIR (--image P | --text T | --unconditional | --class-pool T) ...``

A run imported from the CompVis release (``rdm import checkpoint``: it holds ``official.json``)
is conditioned as the release's ``rdm_sample.py`` / ``sample_with_query`` condition it: the raw
(not unit-norm) query embedding is the first of the k context vectors (``--omit-query``: k
retrieved neighbours), top-m keeps ``int(m · L)`` pseudo-queries; its config carries the release's
DDIM 100, η = 0, s = 2.0 against the zero context. docs/official.md walks through it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rdm.errors import RdmError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="generate images from a trained run, conditioned through a database",
        description="Generate images. Each sample is conditioned on k database neighbours of a "
        "query image, a text prompt, a pseudo-query drawn from p(x̃), or a class pool.",
    )
    p.add_argument("run", type=Path, help="run directory written by 'rdm train'")
    p.add_argument("--db", type=Path, help="database to retrieve from (default: the training one)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--image", type=Path, help="query image: condition on its k neighbours")
    mode.add_argument("--text", help="text prompt: its embedding retrieves from the database")
    mode.add_argument(
        "--unconditional", action="store_true", help="pseudo-queries x̃ ~ p(x̃), then ξ_k(x̃, D)"
    )
    mode.add_argument(
        "--class-pool", metavar="PROMPT", help="draw k of the prompt's top-L per sample"
    )
    p.add_argument(
        "--include-query",
        action="store_true",
        help="--image: the query's embedding is token 1 (the default for an imported CompVis run)",
    )
    p.add_argument(
        "--omit-query",
        action="store_true",
        help="--image / --text: k retrieved neighbours, no query token (an imported CompVis "
        "run's default is the query first, as the release's; its --omit_query)",
    )
    p.add_argument(
        "--text-mode",
        choices=("neighbors", "text+neighbors", "text"),
        help="--text: k retrieved neighbours, text + k-1 neighbours, or the text embedding alone "
        "(default: neighbors; text+neighbors for an imported CompVis run)",
    )
    p.add_argument("--top-m", type=float, help="--unconditional: keep the top-m fraction of p(x̃)")
    p.add_argument(
        "--top-m-rounding",
        choices=("ceil", "floor"),
        help="--top-m keeps ceil(m·L) of the L candidates, or floor(m·L) as the CompVis release "
        "(default: floor for an imported CompVis run, else ceil)",
    )
    p.add_argument(
        "--weighted", action="store_true", help="--unconditional: draw ∝ p(x̃) within the top-m"
    )
    p.add_argument(
        "--uniform", action="store_true", help="--unconditional: x̃ uniform over D (no p(x̃))"
    )
    p.add_argument("--neighbors", type=Path, help="neighbours file of --db giving p(x̃)")
    p.add_argument("--pool-size", type=int, default=32, help="--class-pool: L (default 32)")
    p.add_argument("--encoder", help="encoder spec (default: the one recorded in the database)")
    p.add_argument("-n", "--num", type=int, default=8, help="number of images (default 8)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    p.add_argument("--sampler", choices=("ddim", "dpm++"), help="default: the run's config")
    p.add_argument("--steps", type=int, help="sampling steps (default: the run's config)")
    p.add_argument("--eta", type=float, help="DDIM η (default: the run's config)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale s")
    p.add_argument(
        "--clip-sample",
        action=argparse.BooleanOptionalAction,
        help="clip the predicted x_0 to [-1, 1] while sampling (default: the run's config)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--weights",
        default="ema",
        help="ema (default), model (the raw weights) or a further EMA the run kept "
        "(ema-<kind>-<value>, rdm train --ema-extra)",
    )
    p.add_argument("--device", default="cpu", help="device for the model, e.g. cuda (default: cpu)")
    p.add_argument("--out", type=Path, required=True, help="output directory for PNGs and grid")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rdm import conditioning as C
    from rdm.data import BadImage
    from rdm.data.images import decode_image
    from rdm.io import require_writable
    from rdm.pipeline import RDMPipeline
    from rdm.sheets import save_png

    if args.num < 1:
        raise RdmError(f"-n {args.num}: ask for at least one image")
    if args.steps is not None and args.steps < 1:
        raise RdmError(f"--steps {args.steps} must be >= 1")
    release = imported_release(args.run)
    text_mode = _text_mode(args, release)
    require_writable(args.out, is_dir=True, what="--out")  # before loading and sampling
    pipe = RDMPipeline.from_pretrained(
        args.run,
        args.db,
        neighbors=args.neighbors,
        encoder=args.encoder,
        weights=args.weights,
        device=args.device,
    )
    db, k, n = pipe.db, pipe.k, args.num
    # the release feeds the query token as CLIP outputs it (sample_with_query, normalize=False)
    raw = release
    if args.image is not None:
        if args.image.is_dir():
            raise RdmError(f"--image {args.image} is a directory; give one image file")
        try:
            image = decode_image(args.image)
        except BadImage as exc:
            raise RdmError(f"--image {args.image}: {exc}") from None
        with_query = args.include_query or (release and not args.omit_query)
        cond = C.image_context(
            db, pipe.encoder, k, image, n, include_query=with_query, raw_query=raw
        )
    elif args.text is not None:
        cond = C.text_context(db, pipe.encoder, k, args.text, n, mode=text_mode, raw_query=raw)
    elif args.class_pool is not None:
        cond = C.class_pool_context(
            db, pipe.encoder, k, args.class_pool, n, pool_size=args.pool_size, seed=args.seed
        )
    else:
        cond = C.pseudo_query_context(
            db,
            k,
            n,
            prob=pipe.pseudo_query_prob,
            top_m=args.top_m,
            weighted=args.weighted,
            uniform=args.uniform,
            seed=args.seed,
            top_m_rounding=args.top_m_rounding or ("floor" if release else "ceil"),
        )
    seeds = list(range(args.seed, args.seed + n))
    samples = pipe(
        cond,
        seeds,
        sampler=args.sampler,
        steps=args.steps,
        eta=args.eta,
        guidance_scale=args.guidance,
        clip_sample=args.clip_sample,
        batch_size=args.batch_size,
    )
    for seed, image in zip(seeds, samples, strict=True):
        save_png(image, args.out / f"sample-{seed:05d}.png")
    grid = save_png(C.grid(cond, samples, db), args.out / "grid.png")
    print(f"wrote {len(samples)} samples and {grid} (each row: neighbours, then the sample)")
    return 0


def imported_release(run: Path) -> bool:
    """Whether ``run`` was imported from the CompVis release (``rdm import checkpoint`` writes
    ``official.json``): it is then conditioned as the release conditions it."""
    record = run / "official.json"
    if not record.is_file():
        return False
    try:
        meta = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RdmError(f"{record} cannot be read ({exc}); re-import the run") from None
    return isinstance(meta, dict) and str(meta.get("format", "")).startswith("rdm-official-import/")


def _text_mode(args: argparse.Namespace, release: bool) -> str:
    """--text-mode, defaulting to the release's [text, k − 1 neighbours] for an imported run;
    --omit-query asks for k neighbours and contradicts a query token asked for explicitly."""
    if args.omit_query:
        if args.image is None and args.text is None:
            raise RdmError("--omit-query applies to --image and --text (the query token)")
        if args.include_query:
            raise RdmError("--omit-query and --include-query contradict each other; give one")
        if args.text_mode not in (None, "neighbors"):
            raise RdmError(
                f"--omit-query leaves the text token out, but --text-mode {args.text_mode} "
                "keeps it; give one of them"
            )
        return "neighbors"
    return args.text_mode or ("text+neighbors" if release else "neighbors")
