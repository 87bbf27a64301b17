"""The offline first run: Fashion-MNIST, the shipped small CLIP and the shipped trained model.

``run_demo`` builds (or resumes) the Fashion-MNIST database D = the ``db`` half of the training file
with the default encoder, computes the training neighbours of the other half X (which also gives
p(x̃)), and samples grids in all three modes: image query, text prompt, and unconditional
pseudo-queries. With ``train=True`` it first re-creates the model from scratch with ``rdm train``'s
library call, in resumable chunks, exactly as the shipped checkpoint was made.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from rdm.errors import RdmError

ASSETS = Path(__file__).parent / "assets"
SHIPPED_RUN = ASSETS / "demo-fashion"
SOURCE = "fashion-mnist"
PROMPTS = ("Sneaker", "Trouser", "Bag", "Dress")
N_QUERIES = 4


@dataclasses.dataclass
class DemoConfig:
    out: Path = Path("runs/demo")
    encoder: str = "default"
    source: str = SOURCE
    train: bool = False  # re-create the model from scratch instead of using the shipped one
    preset: str = "small"
    channels: tuple[int, ...] | None = None  # None: the preset's
    threads: int | None = None  # torch CPU threads (None: torch's default)
    steps: int = 2400  # the shipped model's (src/rdm/assets/demo-fashion/README.md)
    batch_size: int = 64  # the shipped model's (the small preset itself now defaults to 32)
    seed: int = 0
    samples_per_prompt: int = 4
    sampler_steps: int | None = None  # None: the run's own sample config
    guidance_scale: float | None = None


def demo_train_config(
    preset_name: str,
    context_dim: int,
    steps: int,
    batch_size: int,
    seed: int,
    channels: tuple[int, ...] | None = None,
    in_channels: int = 3,
):
    """The run config of the demo model (``rdm demo --train`` and the shipped checkpoint):
    the preset's recipe, at ``in_channels`` (1 for grey training images)."""
    from rdm.config import preset

    cfg = preset(preset_name)
    cfg.model = dataclasses.replace(
        cfg.model, context_dim=context_dim, k=4, in_channels=in_channels
    )
    if channels:
        cfg.model = dataclasses.replace(cfg.model, block_out_channels=tuple(channels))
    cfg.train = dataclasses.replace(
        cfg.train,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        checkpoint_every=250,
        sample_every=1000,
        log_every=10,
    )
    return cfg


def run_demo(cfg: DemoConfig) -> dict[str, Path]:
    """Build what is missing, then write ``image.png``, ``text.png`` and ``unconditional.png``."""
    from rdm import conditioning as C
    from rdm.data import open_source
    from rdm.encoders import load_encoder
    from rdm.pipeline import RDMPipeline
    from rdm.sheets import save_png

    t0 = time.perf_counter()
    out = Path(cfg.out)
    source = open_source(cfg.source)
    encoder = load_encoder(cfg.encoder)

    db, nn_path = demo_database(out, source, encoder)

    # The model: shipped, or re-created from scratch.
    run_dir = SHIPPED_RUN
    if cfg.train:
        run_dir = train_demo_model(cfg, source, db, nn_path)
    elif not (run_dir / "config.json").is_file():
        raise RdmError(
            f"the shipped demo model is missing from {run_dir}; re-create it with 'rdm demo --train'"
        )
    pipe = RDMPipeline.from_pretrained(run_dir, db, neighbors=nn_path, encoder=encoder)

    # One grid per inference mode.
    n, k = cfg.samples_per_prompt, pipe.k
    kw = dict(steps=cfg.sampler_steps, guidance_scale=cfg.guidance_scale)
    written = {}
    queries = _query_ids(source)
    prompts = PROMPTS if cfg.source.startswith("fashion-mnist") else _prompts(source, queries)
    for name, conds in {
        "image": [C.image_context(db, encoder, k, source.load(int(i)), n) for i in queries],
        "text": [C.text_context(db, encoder, k, p, n) for p in prompts],
        "unconditional": [
            C.pseudo_query_context(
                db, k, n * len(PROMPTS), prob=pipe.pseudo_query_prob, top_m=0.01, seed=cfg.seed
            )
        ],
    }.items():
        cond = C.concat(conds)
        samples = pipe(cond, list(range(cfg.seed, cfg.seed + len(cond))), **kw)
        grid = C.grid(cond, samples, db, source=source)
        written[name] = save_png(grid, out / f"{name}.png")
        print(f"rdm demo: wrote {written[name]}")
    print(f"rdm demo: done in {time.perf_counter() - t0:.0f} s (model: {run_dir})")
    return written


def demo_database(out: Path, source, encoder):
    """Database D = the ``db`` half of ``source`` in ``out/db`` and the training neighbours of X
    (which give p(x̃)), both built on first use and resumed or reused after: (Database, path)."""
    from rdm.database import Database, build_database
    from rdm.neighbors import compute_neighbors

    db = Database.open(build_database(source, "db", encoder, Path(out) / "db"))
    nn_path = db.root / "neighbors-train.safetensors"
    if not nn_path.is_file():
        compute_neighbors(db, source, "train", encoder, k=min(20, len(db)), out=nn_path)
    return db, nn_path


def train_demo_model(cfg: DemoConfig, source, db, nn_path: Path) -> Path:
    """Train the demo model into ``out/run``; rerunning resumes from the last checkpoint."""
    import torch

    from rdm.neighbors import load_neighbors
    from rdm.train import default_image_channels, retrieval_dataset, train

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    neighbors = load_neighbors(nn_path)
    run_cfg = demo_train_config(
        cfg.preset,
        db.dim,
        cfg.steps,
        cfg.batch_size,
        cfg.seed,
        cfg.channels,
        in_channels=default_image_channels(neighbors, source),
    )
    run_cfg.data = dataclasses.replace(
        run_cfg.data, source=source.spec, split="train", db=str(db.root), neighbors=str(nn_path)
    )
    dataset, run_cfg = retrieval_dataset(run_cfg, source, db, neighbors)
    run_dir = Path(cfg.out) / "run"
    resume = (run_dir / "config.json").is_file()
    train(run_cfg, run_dir, dataset, resume=resume)
    return run_dir


def _query_ids(source) -> list[int]:
    """Query images the model never saw: the test split, else the database half."""
    ids = source.split_ids("test")
    if len(ids) == 0:
        ids = source.split_ids("db")
    step = max(1, len(ids) // N_QUERIES)
    return [int(i) for i in ids[::step][:N_QUERIES]]


def _prompts(source, ids: list[int]) -> list[str]:
    """Captions of the query images as prompts, for sources other than Fashion-MNIST."""
    captions = [source.caption(i) for i in ids]
    return [c for c in captions if c.strip()] or ["an image"]
