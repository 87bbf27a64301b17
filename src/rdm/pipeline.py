"""The one inference module that joins encoder, database and model: load, save, call.

A sampling request has two halves: a *conditioning* (:mod:`rdm.conditioning`: the (k', d)
context set of every sample, built by plain functions of the database, the encoder and k) and
the *sampling* itself, here, which sees that context only through :func:`rdm.sampling.guided`::

    pipe = RDMPipeline.from_pretrained(run_dir, db)
    cond = conditioning.text_context(pipe.db, pipe.encoder, pipe.k, "Sneaker", n=8)
    images = pipe(cond, seeds=range(8), guidance_scale=2.0)

Swapping the database means passing another ``db``; one of another encoder identity is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rdm.conditioning import Conditioning
from rdm.config import RunConfig
from rdm.database import Database
from rdm.encoders import Encoder, load_encoder, require_same_identity
from rdm.errors import RdmError

#: callback(info) once per sampler step; info = {"i", "n", "t", "x", "denoised"} from
#: :func:`rdm.sampling.sample` plus "batch" and "batches"; raising rdm.sampling.Cancelled stops.
Callback = Callable[[dict], None]


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
        vae = load_vae(cfg.model, device) if cfg.model.latent else None
        return cls(
            model,
            cfg,
            db,
            encoder=encoder,
            pseudo_query_prob=pseudo_query_prob(db, neighbors),
            vae=vae,
            device=device,
            run_dir=Path(run_dir),
        )

    def with_database(
        self, db: str | Path | Database, *, neighbors: str | Path | None = None
    ) -> RDMPipeline:
        """The same model (shared, not copied) retrieving from another database ``db``; one of
        another encoder identity is refused. p(x̃) comes from ``neighbors`` or ``db``'s own
        neighbours file, as in :meth:`from_pretrained`."""
        db = db if isinstance(db, Database) else Database.open(db)
        if self._encoder is not None:
            db.require_encoder(self._encoder)
        return RDMPipeline(
            self.model,
            self.config,
            db,
            encoder=self._encoder,
            pseudo_query_prob=pseudo_query_prob(db, neighbors),
            vae=self.vae,
            device=self.device,
            run_dir=self.run_dir,
        )

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write ``config.json`` + ``ema.safetensors`` (the weights sampled from) into ``out_dir``.

        Everything is written into a temporary directory beside ``out_dir`` first and then moved
        onto it with renames (:func:`rdm.io.replace_dir`): a failure part-way leaves an existing
        ``out_dir`` untouched and loadable.
        """
        from rdm.checkpoint import save_weights
        from rdm.io import OutputError, replace_dir, require_writable, write_text

        out = Path(out_dir)
        # checksums of the weights written here are recorded afresh by save_weights
        config = dataclasses.replace(self.config, weights_sha256={})
        tmp = require_writable(out.with_name(f".{out.name}.tmp-{os.getpid()}"), is_dir=True)
        try:
            config.to_json(tmp / "config.json")  # first: save_weights records its sha256 in it
            save_weights(self.model, tmp / "ema.safetensors")
            write_text(
                tmp / "README.txt",
                "rdm pipeline: load with rdm.pipeline.RDMPipeline.from_pretrained(this_dir, db=DIR)\n"
                f"trained against database fingerprint {self.config.db_fingerprint}\n"
                f"encoder: {json.dumps(self.config.encoder)}\n",
            )
            replace_dir(tmp, out)
        except OSError as exc:
            raise OutputError(
                f"cannot save the pipeline to {out} ({exc.strerror or exc}); "
                "choose a writable directory"
            ) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone after a rename; debris after a failure
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

    # --- sampling ----------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        cond: Conditioning,
        seeds: Sequence[int] | None = None,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        eta: float | None = None,
        guidance_scale: float | None = None,
        clip_sample: bool | None = None,
        guidance_rescale: float | None = None,
        batch_size: int = 16,
        callback: Callback | None = None,
        progress: bool = True,
    ) -> list[Image.Image]:
        """One image per context; image i depends only on its context and ``seeds[i]``.

        Unset options come from the run's sample config (``clip_sample``: its diffusion config). ``callback`` is called once per sampler
        step of every batch (see :data:`Callback`); raising ``rdm.sampling.Cancelled`` from it
        stops the work, and the exception reaches the caller.
        """
        from tqdm.auto import tqdm

        from rdm.model import decode, unet_input_shape
        from rdm.sampling import guided, initial_noise, sample, to_uint8

        s = self.config.sample
        sampler, steps = sampler or s.sampler, steps or s.steps
        eta = s.eta if eta is None else eta
        scale = s.guidance_scale if guidance_scale is None else guidance_scale
        rescale = s.guidance_rescale if guidance_rescale is None else guidance_rescale
        diffusion = self.config.diffusion
        if clip_sample is not None:
            if clip_sample and self.config.model.latent:
                raise RdmError("clip_sample clips to the pixel range; a latent model cannot use it")
            diffusion = dataclasses.replace(diffusion, clip_sample=clip_sample)
        seeds = list(range(s.seed, s.seed + len(cond))) if seeds is None else list(seeds)
        if len(seeds) != len(cond):
            raise RdmError(f"{len(seeds)} seeds for {len(cond)} conditionings")
        if batch_size < 1:
            raise RdmError(f"batch size {batch_size} must be at least 1")
        starts = range(0, len(cond), batch_size)
        images: list[Image.Image] = []
        for b, i in enumerate(
            tqdm(starts, desc=f"{sampler}-{steps}", disable=not progress or len(starts) < 2)
        ):
            x_T, gens = initial_noise(
                seeds[i : i + batch_size], unet_input_shape(self.config.model), self.device
            )  # (B, C, H, W), one generator per image
            ctx = torch.from_numpy(cond.context[i : i + batch_size]).to(self.device)  # (B, k', d)
            denoise = guided(self.model, ctx, None, scale, rescale)  # ε(∅) + s·(ε(c) − ε(∅))
            x0 = sample(
                sampler,
                denoise,
                x_T,
                diffusion,
                steps,
                eta=eta,
                generators=gens,
                callback=_in_batch(callback, b, len(starts)),
                progress=progress and len(starts) == 1,  # one batch: a bar over its steps
            )
            decoded = decode(self.vae, x0, self.config.model)  # (B, C, H, W), C = 1 or 3
            grey = decoded.shape[1] == 1  # a grey pixel model, written as mode L
            pixels = to_uint8(decoded)  # (B, H, W, 3)
            images += [Image.fromarray(p[..., 0] if grey else p) for p in pixels]
        return images


def pseudo_query_prob(db: Database, neighbors: str | Path | None = None) -> np.ndarray | None:
    """p(x̃) (N_db,) of ``db`` from the neighbours file ``neighbors`` (which must fit ``db``) or,
    by default, ``DB/neighbors-train.safetensors`` when it exists and matches; else None."""
    from rdm.neighbors import load_neighbors

    default_nn = db.root / "neighbors-train.safetensors"
    if neighbors is None and not default_nn.is_file():
        return None
    nn = load_neighbors(neighbors or default_nn)
    if neighbors is not None:
        nn.require_database(db)  # an explicit file must fit; a default one may be stale
    return nn.pq_prob if nn.meta.get("db_fingerprint") == db.fingerprint else None


def _in_batch(callback: Callback | None, batch: int, batches: int) -> Callback | None:
    """``callback`` with the batch position added to each step's info."""
    if callback is None:
        return None
    return lambda info: callback({**info, "batch": batch, "batches": batches})
