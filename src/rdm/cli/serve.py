"""``rdm serve [RUN] [--db [NAME=]DIR ...] [--host 127.0.0.1] [--port 8000]``"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rdm.errors import RdmError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="a web page and JSON API to search a database and generate from it",
        description="Serve a page and an HTTP JSON API (schema at /api/openapi.json) to search "
        "databases by text or image and generate images in every mode, one model run at a "
        "time. With no RUN: the shipped demo model and the Fashion-MNIST demo database "
        "(built in --demo-dir on first use, as 'rdm demo' does).",
    )
    p.add_argument("run", type=Path, nargs="?", help="run directory (default: the demo model)")
    p.add_argument(
        "--db",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="a database to offer (repeat for several; the first is the default). Default: the "
        "run's training database, or the demo database without RUN",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--demo-dir", type=Path, default=Path("runs/demo"), help="default runs/demo")
    p.add_argument("--encoder", help="encoder spec (default: the one recorded in the database)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema")
    p.add_argument("--threads", type=int, help="torch CPU threads for the model")
    p.add_argument("--max-upload-mb", type=float, default=8.0, help="upload size cap (413)")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, help="decoded upload cap (422)")
    p.add_argument("--max-n", type=int, default=16, help="images per generation (default 16)")
    p.add_argument("--max-steps", type=int, default=250, help="sampler steps (default 250)")
    p.add_argument("--queue", type=int, default=16, help="generations that may wait (default 16)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from rdm.serve.app import LOOPBACK_HOSTS, Limits, create_app, is_loopback

    if not 0 <= args.port <= 65535:
        raise RdmError(f"--port {args.port}: choose 0..65535")
    for flag in ("max_n", "max_steps", "queue", "max_pixels"):
        if getattr(args, flag) < 1:
            raise RdmError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= 1")
    if args.max_upload_mb <= 0:
        raise RdmError(f"--max-upload-mb {args.max_upload_mb} must be > 0")
    limits = Limits(
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_pixels=args.max_pixels,
        max_n=args.max_n,
        max_steps=args.max_steps,
        max_pending=args.queue,
    )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    pipe, databases = load(args)
    loopback = is_loopback(args.host)
    app = create_app(
        pipe, databases, limits=limits, allowed_hosts=LOOPBACK_HOSTS if loopback else ("*",)
    )
    state = app.state.rdm
    for name, reason in state.refused.items():
        print(f"rdm serve: not offering database {name}: {reason}", file=sys.stderr)
    if not loopback:
        print(
            f"rdm serve: warning: listening on {args.host}, not loopback: anyone who can reach "
            "this address can use the model and read the databases' images",
            file=sys.stderr,
        )
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"rdm serve: http://{host}:{args.port}/ (databases: {', '.join(state.served)})")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def load(args: argparse.Namespace):
    """The pipeline and the databases to offer ({name: dir}), as the arguments ask."""
    from rdm.pipeline import RDMPipeline
    from rdm.serve.app import database_names

    run_dir = args.run
    databases = database_names(args.db)
    neighbors = None
    if run_dir is None:
        from rdm.demo import SHIPPED_RUN

        run_dir = SHIPPED_RUN
        if not databases:
            db, neighbors = _demo_database(args)
            databases = {"fashion-mnist": db.root}
    first = next(iter(databases.values()), None)  # None: the run's own training database
    pipe = RDMPipeline.from_pretrained(
        run_dir, first, neighbors=neighbors, encoder=args.encoder, weights=args.weights
    )
    return pipe, databases or None


def _demo_database(args: argparse.Namespace):
    from rdm.data import open_source
    from rdm.demo import SOURCE, demo_database
    from rdm.encoders import load_encoder

    print(f"rdm serve: the demo database in {args.demo_dir / 'db'} (built on first use)")
    return demo_database(
        args.demo_dir, open_source(SOURCE), load_encoder(args.encoder or "default")
    )
