"""``rdm db build | import | verify | query | neighbors``: the retrieval database, one library call
each.

``query`` clips ``-k`` to the database's size with a note on stderr (asking for more neighbours
than there are rows is not an error worth stopping for; ``-k`` below 1 is).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from rdm.engines import ENGINES
from rdm.errors import RdmError

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def register(subparsers) -> None:
    parser = subparsers.add_parser("db", help="build, check and query retrieval databases")
    sub = parser.add_subparsers(dest="db_command", required=True, metavar="ACTION")

    build = sub.add_parser("build", help="embed a source split into a database (resumable)")
    build.add_argument("source", help="a folder of images, 'fashion-mnist[:DIR]', 'emoji-color'…")
    build.add_argument("--out", required=True, type=Path, help="database directory to create")
    build.add_argument("--encoder", default="default", help="encoder spec (default: %(default)s)")
    build.add_argument(
        "--split",
        default="db",
        choices=("all", "train", "db", "test"),
        help="items to embed (default: %(default)s, the half disjoint from 'train'; 'all' for a "
        "database used only at inference)",
    )
    build.add_argument("--db-fraction", type=float, default=0.5, help="share of keys in 'db'")
    build.add_argument("--batch-size", type=int, default=256, help="images per encoder call")
    build.add_argument("--shard-size", type=int, default=4096, help="ids per resumable shard")
    build.add_argument(
        "--memory-budget",
        type=parse_size,
        default="2GB",
        help="memory the index may use, e.g. 2GB, 512MiB (default: %(default)s)",
    )
    build.add_argument("--device", default="cpu", help="device for the encoder")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_engine_arguments(build)
    build.set_defaults(func=run_build)

    imp = sub.add_parser(
        "import",
        help="a database from precomputed embeddings (the CompVis RDM release's .npz parts, or "
        ".npy + parquet)",
        description="Import precomputed embeddings as an rdm database: the CompVis RDM release's "
        "{N}x{d}-part_{n}.npz parts (sorted by part number, vectors kept exactly as stored, "
        "img_id / patch_coords as metadata) or .npy embeddings with parquet metadata (the "
        "clip-retrieval layout). See docs/official.md.",
    )
    imp.add_argument("parts", nargs="+", type=Path, help=".npz parts, .npy files or folders")
    imp.add_argument("--out", required=True, type=Path, help="database directory to create")
    imp.add_argument(
        "--encoder",
        help="encoder spec that made the vectors (default for .npz parts: the release's OpenAI "
        "CLIP ViT-B/32, recorded without loading weights; required for .npy)",
    )
    imp.add_argument(
        "--order",
        choices=("number", "given"),
        default="number",
        help="row order: by part number (default) or as given on the command line",
    )
    imp.add_argument(
        "--metadata",
        nargs="+",
        type=Path,
        help=".npy: one parquet per file (default: found beside)",
    )
    imp.add_argument(
        "--nn-memory",
        type=Path,
        help="the release's nn_memory pickle: p(x̃) for --unconditional sampling, written beside",
    )
    imp.add_argument(
        "--memory-budget",
        type=parse_size,
        default="2GB",
        help="memory the index may use, e.g. 2GB, 24GB (default: %(default)s)",
    )
    imp.add_argument("--device", default="cpu", help="device for loading --encoder")
    imp.add_argument("--no-progress", action="store_true", help="no progress bar")
    imp.set_defaults(func=run_import)

    verify = sub.add_parser(
        "verify", help="check every file's checksum, counts, norms, identity and the index"
    )
    verify.add_argument("dir", type=Path)
    verify.set_defaults(func=run_verify)

    query = sub.add_parser("query", help="nearest database items of a text, image or id")
    query.add_argument("dir", type=Path)
    what = query.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="a caption, embedded by the encoder's text tower")
    what.add_argument("--image", type=Path, help="an image file")
    what.add_argument("--id", type=int, help="a source id already in the database")
    query.add_argument("-k", type=int, default=8, help="neighbours to show (default: %(default)s)")
    query.add_argument("--sheet", type=Path, help="write a PNG contact sheet of the neighbours")
    query.add_argument("--encoder", help="encoder spec (default: the database's own)")
    query.add_argument("--device", default="cpu")
    query.set_defaults(func=run_query)

    nb = sub.add_parser("neighbors", help="k neighbours of every training image, and p(x̃)")
    nb.add_argument("dir", type=Path)
    nb.add_argument("--queries", required=True, help="source of the training images")
    nb.add_argument("--split", default="train", choices=("all", "train", "db", "test"))
    nb.add_argument("-k", type=int, default=20, help="neighbours stored per query")
    nb.add_argument("--k-p", type=int, default=4, help="neighbours counted for p(x̃)")
    nb.add_argument(
        "--exclude-threshold",
        type=float,
        help="near-duplicate cosine (default: derived from how the encoder scores re-encoded "
        "copies of the query images and distinct database images; see docs/retrieval.md)",
    )
    nb.add_argument("--out", type=Path, help="default: DIR/neighbors-SPLIT.safetensors")
    nb.add_argument("--encoder", help="encoder spec (default: the database's own)")
    nb.add_argument("--batch-size", type=int, default=256)
    nb.add_argument("--device", default="cpu")
    nb.add_argument("--no-progress", action="store_true")
    _add_engine_arguments(nb)
    nb.set_defaults(func=run_neighbors)


def _add_engine_arguments(parser) -> None:
    """Where the heavy stages run (rdm.engines): this process, or encoder actors on Ray."""
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help="'local' (default): this process; 'ray': encoder actors on a Ray cluster, one "
        "resumable shard or block per task (pip install 'rdm[ray]')",
    )
    parser.add_argument(
        "--address",
        help="--engine ray: an existing cluster (e.g. auto, ray://head:10001); default: start a "
        "local one with this machine's CPUs",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="--engine ray: encoder actors (default: the cluster's CPUs / --threads, or its GPUs "
        "with --device cuda, one GPU each)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's; 1 per Ray worker); the same count on both "
        "engines gives the same bits",
    )


def parse_size(text: str) -> float:
    """'2GB' -> 2e9, '512MiB' -> 536870912, '1000000' -> 1e6 (bytes)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: write a number with an optional unit (B, KB, MB, GB, TB, "
            "KiB, MiB, GiB, TiB), e.g. 2GB"
        )
    return float(match.group(1)) * _UNITS[unit]


# ---- build / verify -----------------------------------------------------------------------------


def run_build(args: argparse.Namespace) -> int:
    from rdm.data import open_source
    from rdm.db_build import build_database
    from rdm.encoders import load_encoder

    source = open_source(args.source)
    encoder = load_encoder(args.encoder, device=_driver_device(args))
    options = {
        "batch_size": args.batch_size,
        "shard_size": args.shard_size,
        "memory_budget": args.memory_budget,
        "db_fraction": args.db_fraction,
        "progress": not args.no_progress,
    }
    if args.engine == "ray":
        with _ray_engine(args, args.encoder) as engine:
            out = engine.build_database(source, args.split, encoder, args.out, **options)
    else:
        out = build_database(source, args.split, encoder, args.out, **options)
    print(out)
    return 0


def _driver_device(args: argparse.Namespace) -> str:
    """The device of this process's encoder. With --engine ray the workers encode (on
    --device) and the driver only records the encoder's identity and calibrates the
    near-duplicate threshold on a few images, on the CPU; locally it encodes everything."""
    if args.engine != "ray":
        for flag in ("address", "workers"):
            if getattr(args, flag) is not None:
                raise RdmError(f"--{flag} applies to --engine ray only; add --engine ray")
        if args.threads is not None:
            _set_threads(args.threads)
        return args.device
    return "cpu"


def _set_threads(threads: int) -> None:
    import torch

    if threads < 1:
        raise RdmError(f"--threads must be positive, got {threads}")
    torch.set_num_threads(threads)


def _ray_engine(args: argparse.Namespace, spec: str):
    """The Ray engine of --address / --workers / --threads, its workers loading ``spec`` on
    --device (a whole GPU per worker for a cuda device)."""
    from functools import partial

    from rdm.encoders import load_encoder
    from rdm.engines.ray import RayEngine

    return RayEngine(
        partial(load_encoder, spec, device=args.device),
        address=args.address,
        workers=args.workers,
        threads=args.threads or 1,
        num_gpus=1.0 if args.device.startswith("cuda") else 0.0,
    )


def run_import(args: argparse.Namespace) -> int:
    from rdm.encoders import RELEASE_SPEC
    from rdm.official.db_import import import_database

    # the release's own encoder is recorded without its weights (the default for .npz parts)
    named = args.encoder == RELEASE_SPEC
    encoder = _load_encoder(args.encoder, args.device) if args.encoder and not named else None
    argv = ["rdm", "db", "import", *map(str, args.parts)]
    for flag, value in (("--order", args.order), ("--encoder", args.encoder)):
        if value and value != "number":
            argv += [flag, value]
    if args.metadata:
        argv += ["--metadata", *map(str, args.metadata)]
    out = import_database(
        args.parts,
        args.out,
        encoder=encoder,
        order=args.order,
        metadata=args.metadata,
        memory_budget=args.memory_budget,
        nn_memory=args.nn_memory,
        argv=argv,
        progress=not args.no_progress,
    )
    print(out)
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from rdm.database import Database, verify

    problems = verify(args.dir)
    if problems:
        print(f"{args.dir}: {len(problems)} problem(s)", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    db = Database.open(args.dir)
    m = db.manifest
    print(
        f"{args.dir}: ok — {db.count} rows (d={db.dim}, {m['skipped']} skipped) of "
        f"{db.source_spec} split {db.split!r}; index {m['index']['type']} "
        f"recall@{m['index']['k']} {m['index']['recall_at_k']:.3f}; fingerprint {db.fingerprint} "
        f"(content identity), checksum {db.checksum} (bytes)"
    )
    return 0


# ---- query --------------------------------------------------------------------------------------


def run_query(args: argparse.Namespace) -> int:
    from rdm.database import Database

    db = Database.open(args.dir)
    if args.k < 1:
        raise RdmError(f"-k must be at least 1, got {args.k}")
    k = args.k
    if k > db.count:
        print(f"note: {args.dir} holds only {db.count} items; showing all of them", file=sys.stderr)
        k = db.count
    xq, query_image, label = _query_vector(db, args)
    D, I = db.search(xq, k)  # (1, k)
    print(f"{'rank':>4}  {'id':>8}  {'score':>6}  caption")
    for rank, (score, row) in enumerate(zip(D[0], I[0], strict=True), start=1):
        print(f"{rank:>4}  {db.ids[row]:>8}  {score:6.3f}  {db.captions[row]}")
    if args.sheet:
        source = _open_database_source(db)
        if args.id is not None:
            query_image = _load(source, args.id)
        _write_sheet(db, source, args.sheet, D[0], I[0], query_image, label)
        print(f"wrote {args.sheet}", file=sys.stderr)
    return 0


def _query_vector(db, args):
    """(1, d) float32 query, the query image (or None) and a label for the sheet's title."""
    if args.id is not None:
        row = int(db.rows_of([args.id])[0])
        if args.encoder:  # an explicit encoder must still be the database's
            db.require_encoder(_load_encoder(args.encoder, args.device), f"encoder {args.encoder}")
        return db.vectors([row]), None, f"id {args.id}"
    encoder = _load_encoder(args.encoder or db.identity["spec"], args.device)
    db.require_encoder(encoder, f"encoder {args.encoder or db.identity['spec']}")
    if args.text is not None:
        if not args.text.strip():
            raise RdmError("--text is empty: give a caption to search for")
        return encoder.encode_texts([args.text]), None, repr(args.text)
    image = _read_query_image(args.image)
    return encoder.encode_images([image]), image, args.image.name


def _load_encoder(spec: str, device: str):
    from rdm.encoders import load_encoder

    return load_encoder(spec, device=device)


def _read_query_image(path: Path):
    from rdm.data import BadImage
    from rdm.data.images import decode_image

    if not path.exists():
        raise RdmError(f"--image {path} does not exist")
    if path.is_dir():
        raise RdmError(f"--image {path} is a directory; give one image file")
    try:
        return decode_image(path)
    except BadImage as exc:
        raise RdmError(f"--image {path} cannot be used as an image ({exc})") from None


def _write_sheet(db, source, path: Path, D, I, query_image, label: str) -> None:
    """Contact sheet: the query image first (when there is one), then the neighbours by rank."""
    from rdm.sheets import contact_sheet, save_png

    images = [_load(source, int(db.ids[row])) for row in I]
    captions = [f"{db.ids[row]} {db.captions[row]}" for row in I]  # cells are in rank order
    scores = [float(s) for s in D]
    if query_image is not None:
        images, captions, scores = [query_image, *images], ["query", *captions], [1.0, *scores]
    title = f"{db.root.name}: {len(I)} nearest to {label}"
    save_png(contact_sheet(images, captions, scores, title=title), path)


def _open_database_source(db):
    from rdm.data import open_source

    try:
        return open_source(db.source_spec)
    except RdmError as exc:
        raise RdmError(
            f"the images of {db.root} come from {db.source_spec}, which cannot be opened "
            f"({exc}); run without --sheet, or restore the source"
        ) from None


def _load(source, item_id: int):
    """An item's image for a sheet; a grey cell if it became unreadable since the build."""
    from PIL import Image

    from rdm.data import BadImage

    try:
        return source.load(item_id)
    except BadImage:
        return Image.new("RGB", (32, 32), (235, 235, 235))


# ---- neighbours ---------------------------------------------------------------------------------


def run_neighbors(args: argparse.Namespace) -> int:
    from rdm.data import open_source
    from rdm.database import Database
    from rdm.neighbors import compute_neighbors

    db = Database.open(args.dir)
    source = open_source(args.queries)
    spec = args.encoder or db.identity["spec"]
    encoder = _load_encoder(spec, _driver_device(args))
    options = {
        "k": args.k,
        "k_p": args.k_p,
        "exclude_threshold": args.exclude_threshold,
        "batch_size": args.batch_size,
        "out": args.out,
        "progress": not args.no_progress,
    }
    if args.engine == "ray":
        with _ray_engine(args, spec) as engine:
            path = engine.compute_neighbors(db, source, args.split, encoder, **options)
    else:
        path = compute_neighbors(db, source, args.split, encoder, **options)
    print(path)
    return 0
