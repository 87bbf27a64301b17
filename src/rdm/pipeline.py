"""The one inference module that joins encoder, database and model.

A sampling request has two halves: a *conditioning* — the (k', d) context set of every sample and
the database rows it came from — and the *sampling* itself, which only sees that context through
:func:`rdm.sampling.guided`. The conditioning builders follow the paper's inference modes:

- :meth:`RDMPipeline.image_context`     ξ_k(x, D) of a query image (optionally φ(x) as first token)
- :meth:`RDMPipeline.text_context`      the text embedding retrieves from D; or is a token itself
- :meth:`RDMPipeline.pseudo_query_context`  x̃ ~ p_D(x̃) (optionally top-m truncated), then ξ_k(x̃, D)
- :meth:`RDMPipeline.class_pool_context`    k drawn at random per sample from the prompt's top-L

Swapping the database means passing another ``db``; one of another encoder identity is refused.
"""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rdm.config import RunConfig
from rdm.database import Database
from rdm.encoders import Encoder, load_encoder, require_same_identity
from rdm.errors import RdmError

TEXT_MODES = ("neighbors", "text+neighbors", "text")


@dataclass
class Conditioning:
    """What conditions each of B samples."""

    context: np.ndarray  # (B, k', d) float32: database vectors and/or query/text embeddings
    rows: list[list[int]]  # per sample: the database rows in its context (shown in grids)
    labels: list[str]  # per sample: a short description of the condition
    query_images: list[Image.Image | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.query_images:
            self.query_images = [None] * len(self.context)

    def __len__(self) -> int:
        return len(self.context)


class RDMPipeline:
    """A trained model with the database (and encoder) it retrieves from at inference."""

    def __init__(
        self,
        model,  # rdm.model.RetrievalUNet, eval mode
        config: RunConfig,
        db: Database,
        *,
        encoder: Encoder | None = None,
        pseudo_query_prob: np.ndarray | None = None,
        vae=None,
        device: str | torch.device = "cpu",
        run_dir: Path | None = None,
    ):
        if config.encoder:
            require_same_identity(
                config.encoder,
                f"the model {run_dir or ''}".strip(),
                db.identity,
                f"database {db.root}",
            )
        if db.dim != config.model.context_dim:
            raise RdmError(
                f"database {db.root} has d={db.dim} but the model reads d={config.model.context_dim}"
            )
        if pseudo_query_prob is not None and len(pseudo_query_prob) != len(db):
            raise RdmError(
                f"p(x̃) has {len(pseudo_query_prob)} entries but database {db.root} has {len(db)} rows"
            )
        self.model, self.config, self.db, self.vae = model, config, db, vae
        self.device, self.run_dir = torch.device(device), run_dir
        self._encoder = encoder
        self.pseudo_query_prob = pseudo_query_prob

    # --- loading and saving ----------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        run_dir: str | Path,
        db: str | Path | Database | None = None,
        *,
        neighbors: str | Path | None = None,
        encoder: str | Encoder | None = None,
        weights: str = "ema",
        device: str | torch.device = "cpu",
    ) -> RDMPipeline:
        """Load a run (or a ``save_pretrained`` directory) with a database.

        ``db`` defaults to the database the run was trained with; ``neighbors`` (a neighbours file
        of that database) supplies p(x̃) for unconditional sampling and defaults to
        ``DB/neighbors-train.safetensors`` when it exists and matches.
        """
        from rdm.checkpoint import load_run
        from rdm.model import load_vae
        from rdm.neighbors import load_neighbors

        model, cfg = load_run(run_dir, weights=weights, device=device)
        if db is None:
            if not cfg.data.db:
                raise RdmError(f"{run_dir} records no database: pass db=DIR (--db DIR)")
            db = cfg.data.db
        db = db if isinstance(db, Database) else Database.open(db)
        if isinstance(encoder, str):
            encoder = load_encoder(encoder)
        if encoder is not None:
            db.require_encoder(encoder)
        prob = None
        default_nn = db.root / "neighbors-train.safetensors"
        if neighbors is not None or default_nn.is_file():
            nn = load_neighbors(neighbors or default_nn)
            if neighbors is not None:
                nn.require_database(db)  # an explicit file must fit; a default one may be stale
            if nn.meta.get("db_fingerprint") == db.fingerprint:
                prob = nn.pq_prob
        vae = load_vae(cfg.model, device) if cfg.model.latent else None
        return cls(
            model,
            cfg,
            db,
            encoder=encoder,
            pseudo_query_prob=prob,
            vae=vae,
            device=device,
            run_dir=Path(run_dir),
        )

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write ``config.json`` + ``ema.safetensors`` (the weights sampled from) into ``out_dir``."""
        from rdm.checkpoint import save_weights

        out = Path(out_dir)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.config.to_json(tmp / "config.json")
        save_weights(self.model, tmp / "ema.safetensors")
        (tmp / "README.txt").write_text(
            "rdm pipeline: load with rdm.pipeline.RDMPipeline.from_pretrained(this_dir, db=DIR)\n"
            f"trained against database fingerprint {self.config.db_fingerprint}\n"
            f"encoder: {json.dumps(self.config.encoder)}\n"
        )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        return out

    # --- the encoder, loaded only when a mode needs it --------------------------------------------

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            spec = self.db.identity.get("spec")
            if not spec:
                raise RdmError(
                    f"database {self.db.root} records no encoder spec; pass --encoder SPEC"
                )
            try:
                self._encoder = load_encoder(spec)
            except RdmError as exc:
                raise RdmError(
                    f"image and text queries need the encoder of database {self.db.root} "
                    f"({spec}), which cannot be loaded: {exc}. Pass --encoder SPEC pointing at "
                    "a local copy of the same weights."
                ) from None
            self.db.require_encoder(self._encoder)
        return self._encoder

    @property
    def k(self) -> int:
        return self.config.model.k

    # --- conditioning for each inference mode ------------------------------------------------------

    def image_context(
        self, image: Image.Image, n: int, *, include_query: bool = False
    ) -> Conditioning:
        """ξ_k(x, D) of a query image; with ``include_query`` φ(x) is the first of the k tokens."""
        q = self.encoder.encode_images([image.convert("RGB")])  # (1, d)
        k = self.k - 1 if include_query else self.k
        _, rows = self._search(q, k)
        context = self.db.vectors(rows[0])  # (k, d)
        if include_query:
            context = np.concatenate([q, context])
        label = "query image" + (" + its embedding" if include_query else "")
        return self._repeat(context, list(rows[0]), label, n, query=image)

    def text_context(self, text: str, n: int, *, mode: str = "neighbors") -> Conditioning:
        """The text embedding retrieves from D (``neighbors``), joins k−1 retrieved neighbours
        (``text+neighbors``), or is the whole context (``text``) — the paper's three text modes."""
        if mode not in TEXT_MODES:
            raise RdmError(f"text mode {mode!r}: choose one of {', '.join(TEXT_MODES)}")
        if not text.strip():
            raise RdmError("the text prompt is empty")
        q = self.encoder.encode_texts([text])  # (1, d)
        if mode == "text":
            return self._repeat(q, [], f"text: {text}", n)
        k = self.k - 1 if mode == "text+neighbors" else self.k
        _, rows = self._search(q, k) if k else (None, np.zeros((1, 0), dtype=np.int64))
        context = self.db.vectors(rows[0])
        if mode == "text+neighbors":
            context = np.concatenate([q, context])
        return self._repeat(context, list(rows[0]), f"text ({mode}): {text}", n)

    def pseudo_query_context(
        self,
        n: int,
        *,
        top_m: float | None = None,
        weighted: bool = False,
        uniform: bool = False,
        seed: int = 0,
    ) -> Conditioning:
        """x̃ ~ p_D(x̃) = |{x ∈ X : x̃ ∈ ξ_k(x, D)}| / (k·|X|), then ξ_k(x̃, D) (x̃ itself first).

        ``top_m`` keeps the most probable fraction of the items with p > 0 (the paper's best FID
        is at m = 0.01); within it x̃ is drawn uniformly (the official default) or ∝ p with
        ``weighted``. ``uniform`` draws x̃ uniformly from all of D when no p(x̃) is available.
        """
        candidates, weights = self._pseudo_query_candidates(top_m, weighted, uniform)
        rng = np.random.default_rng(seed)
        picks = rng.choice(candidates, size=n, replace=True, p=weights)  # (n,) database rows
        _, rows = self._search(self.db.vectors(picks), self.k)  # (n, k), x̃ itself first
        context = self.db.vectors(rows)  # (n, k, d)
        labels = [f"pseudo-query id {self.db.ids[p]}" for p in picks]
        return Conditioning(context, [list(r) for r in rows], labels)

    def class_pool_context(
        self, prompt: str, n: int, *, pool_size: int, seed: int = 0
    ) -> Conditioning:
        """Retrieve a pool of L ≥ k neighbours of the prompt and draw k at random per sample."""
        if pool_size < self.k:
            raise RdmError(f"--pool-size {pool_size} must be at least k = {self.k}")
        q = self.encoder.encode_texts([prompt])
        _, pool = self._search(q, pool_size)  # (1, L)
        rng = np.random.default_rng(seed)
        rows = np.stack([rng.choice(pool[0], self.k, replace=False) for _ in range(n)])
        labels = [f"class pool ({pool_size}): {prompt}"] * n
        return Conditioning(self.db.vectors(rows), [list(r) for r in rows], labels)

    def _pseudo_query_candidates(self, top_m, weighted, uniform):
        if uniform:
            return np.arange(len(self.db)), None
        p = self.pseudo_query_prob
        if p is None:
            raise RdmError(
                f"unconditional sampling draws pseudo-queries from p(x̃), which needs a neighbours "
                f"file of database {self.db.root}: run 'rdm db neighbors {self.db.root} --queries "
                "SOURCE --split train' or pass --neighbors FILE (or --uniform to draw from all of D)"
            )
        support = np.flatnonzero(p > 0)
        order = support[np.argsort(-p[support], kind="stable")]  # most probable first
        if top_m is not None:
            if not 0 < top_m <= 1:
                raise RdmError(f"--top-m {top_m} must be a fraction in (0, 1]")
            order = order[: max(1, int(np.ceil(top_m * len(order))))]
        elif not weighted:
            weighted = True  # without truncation, draw from p_D itself
        w = p[order] / p[order].sum() if weighted else None
        return order, w

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k > len(self.db):
            raise RdmError(f"k = {k} but database {self.db.root} holds only {len(self.db)} items")
        return self.db.search(np.ascontiguousarray(q, dtype=np.float32), k)

    @staticmethod
    def _repeat(context, rows, label, n, query=None) -> Conditioning:
        ctx = np.repeat(np.asarray(context, dtype=np.float32)[None], n, axis=0)
        return Conditioning(ctx, [list(rows)] * n, [label] * n, [query] * n)

    # --- sampling ----------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        cond: Conditioning,
        seeds: list[int] | None = None,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        eta: float | None = None,
        guidance_scale: float | None = None,
        batch_size: int = 16,
        progress: bool = True,
    ) -> list[Image.Image]:
        """One image per context; image i depends only on its context and ``seeds[i]``."""
        from tqdm.auto import tqdm

        from rdm.model import decode, unet_input_shape
        from rdm.sampling import get_sampler, guided, initial_noise, to_uint8

        s = self.config.sample
        sampler, steps = sampler or s.sampler, steps or s.steps
        eta = s.eta if eta is None else eta
        scale = s.guidance_scale if guidance_scale is None else guidance_scale
        seeds = list(range(s.seed, s.seed + len(cond))) if seeds is None else list(seeds)
        if len(seeds) != len(cond):
            raise RdmError(f"{len(seeds)} seeds for {len(cond)} conditionings")
        run = get_sampler(sampler)
        images: list[Image.Image] = []
        starts = range(0, len(cond), batch_size)
        for i in tqdm(starts, desc=f"{sampler}-{steps}", disable=not progress or len(starts) < 2):
            batch_seeds = seeds[i : i + batch_size]
            x_T, gens = initial_noise(batch_seeds, unet_input_shape(self.config.model), self.device)
            ctx = torch.from_numpy(cond.context[i : i + batch_size]).to(self.device)
            denoise = guided(self.model, ctx, None, scale)
            x0 = run(denoise, x_T, self.config.diffusion, steps, eta=eta, generators=gens)
            pixels = to_uint8(decode(self.vae, x0, self.config.model))
            images += [Image.fromarray(p) for p in pixels]
        return images

    # --- looking at results ------------------------------------------------------------------------

    def neighbor_images(self, rows: list[int]) -> list[Image.Image | None]:
        """Database images of ``rows``, or None where the database's source is not at hand."""
        from rdm.data import BadImage

        source = self._db_source
        out: list[Image.Image | None] = []
        for r in rows:
            try:
                out.append(source.load(int(self.db.ids[r])) if source else None)
            except BadImage:
                out.append(None)
        return out

    @functools.cached_property
    def _db_source(self):
        """The source the database was built from, if it is on this machine (grids only)."""
        from rdm.data import SourceError, open_source

        try:
            return open_source(self.db.source_spec)
        except SourceError:
            return None

    def grid(self, cond: Conditioning, samples: list[Image.Image], cell: int = 64) -> Image.Image:
        """One row per sample: [query image] + the neighbours that conditioned it + the sample.

        Rows are padded so that every sample sits in the last column.
        """
        from rdm.sheets import image_grid

        rows = []
        for i in range(len(samples)):
            query = cond.query_images[i]
            rows.append(([query] if query is not None else []) + self.neighbor_images(cond.rows[i]))
        width = max(len(r) for r in rows)
        rows = [r + [None] * (width - len(r)) + [s] for r, s in zip(rows, samples, strict=True)]
        return image_grid(rows, row_labels=cond.labels, cell=cell)
