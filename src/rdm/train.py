"""Training: the retrieval dataset, one training-loop function and its small helpers.

Exact resume: everything random in a step is a function of (seed, step, process) — which images
(:class:`StepBatches`), which k of the top-n neighbours, t, ε and the guidance-dropout mask
(:func:`step_generator`) — and the learning rate and EMA decay are functions of the step. So a run
killed at step s and resumed from its checkpoint at step c ≤ s repeats steps c+1 … s exactly and
reaches the same losses and weights as an unbroken run (bit for bit in fp32 on one CPU).
"""

from __future__ import annotations

import copy
import csv
import math
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from rdm.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_weights
from rdm.config import RunConfig, TrainConfig
from rdm.cpuinfo import cpuinfo_field
from rdm.diffusion import diffusion_loss, make_scheduler
from rdm.ema import EmaSpec, ema_decay_at, ema_update
from rdm.errors import IdentityMismatch, RdmError
from rdm.io import atomic_write, require_writable
from rdm.model import RetrievalUNet, count_parameters, decode, encode, load_vae

# TrainConfig fields that may change when a run is resumed (they do not alter the trajectory)
RESUMABLE_CHANGES = (
    "steps",
    "log_every",
    "checkpoint_every",
    "keep_last",
    "sample_every",
    "num_workers",
)


class TrainingDiverged(RdmError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # last step trained
    loss: float  # loss of the last step
    images_per_s: float  # throughput after the first step (which includes warm-up)
    train_seconds: float = 0.0  # the training loop's wall time, summed over resumed chunks
    train_seconds_from: int = 0  # the step it counts from (> 0: resumed from an older checkpoint)


# --- data ---------------------------------------------------------------------------------------


class RetrievalDataset(Dataset):
    """Training images with their stored neighbours: items (image, context, index).

    ``image`` (3, H, W) float32 in [-1, 1]; ``context`` (k, d) float32, the database vectors of the
    first k stored neighbours, or of k drawn at random from the top ``k_random_from_top_n``.
    Items are addressed by ``(index, draw)``: ``draw`` numbers the draw (a position in the
    training stream), so the random choice of neighbours is reproducible; a plain int means draw 0.
    """

    def __init__(
        self,
        source,  # rdm.data.Source
        split: str,
        db,  # rdm.database.Database
        neighbors,  # rdm.neighbors.Neighbors (load_neighbors(path))
        k: int,
        resolution: int,
        k_random_from_top_n: int | None = None,
        seed: int = 0,
    ):
        neighbors.require_database(db)  # rows index this database (fingerprints named)
        neighbors.require_encoder(db.identity, f"database {db.root}")
        meta = dict(neighbors.meta)
        stored = int(neighbors.nn_rows.shape[1])
        n = k_random_from_top_n or k
        if not 1 <= k <= n <= stored:
            raise RdmError(
                f"k={k} (top n={n}) but the neighbours file stores {stored} neighbours per image; "
                f"use k <= n <= {stored}, or recompute the neighbours with a larger k"
            )
        queries = meta.get("queries", {})
        if queries.get("split", split) != split or queries.get("spec", source.spec) != source.spec:
            raise RdmError(
                f"the neighbours file is for source {queries.get('spec')!r} split "
                f"{queries.get('split')!r}, not {source.spec!r} split {split!r}; pass the matching "
                "--data/--split or recompute the neighbours"
            )
        self.source, self.db, self.k, self.n = source, db, k, n
        self.resolution, self.seed, self.random = resolution, seed, k_random_from_top_n is not None
        self.ids = np.asarray(neighbors.query_ids, dtype=np.int64)  # (N,) source ids
        self.nn_rows = np.asarray(neighbors.nn_rows[:, :n], dtype=np.int64)  # (N, n) db rows
        self.meta = meta

    def __len__(self) -> int:
        return len(self.ids)

    def provenance(self) -> dict:
        """The RunConfig fields that tie a model to this database, encoder and neighbours."""
        return {
            "db_fingerprint": self.db.fingerprint,
            "encoder": dict(self.db.identity),
            "neighbors_meta": self.meta,
        }

    def __getitem__(self, key):
        index, draw = key if isinstance(key, tuple) else (key, 0)
        rows = self.nn_rows[index, : self.k]
        if self.random:
            rng = np.random.default_rng([self.seed, draw, index])
            rows = self.nn_rows[index, rng.choice(self.n, self.k, replace=False)]
        context = torch.from_numpy(np.ascontiguousarray(self.db.vectors(rows), dtype=np.float32))
        image = image_tensor(self.source.load(int(self.ids[index])), self.resolution)
        return image, context, index


def default_image_channels(neighbors, source=None) -> int:
    """1 when every training image is grey, as ``rdm db neighbors`` recorded it (or, in files
    written before that record, as the source declares), else 3."""
    recorded = neighbors.meta.get("queries", {}).get("grayscale")
    if recorded is None:
        recorded = getattr(source, "grayscale", False)
    return 1 if recorded else 3


class InMemoryDataset(Dataset):
    """(image, context, index) items from tensors; for tests, benchmarks and cached data."""

    def __init__(self, images: torch.Tensor, contexts: torch.Tensor):
        # images (N, 3, H, W) in [-1, 1]; contexts (N, k, d)
        if len(images) != len(contexts):
            raise RdmError(f"{len(images)} images but {len(contexts)} contexts")
        self.images, self.contexts = images, contexts

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        return self.images[index], self.contexts[index], index


def retrieval_dataset(cfg: RunConfig, source, db, neighbors) -> tuple[RetrievalDataset, RunConfig]:
    """The training set ``cfg`` asks for (``cfg.data.split`` of ``source`` with its stored
    neighbours in ``db``), and ``cfg`` with the provenance that ties the run to them."""
    dataset = RetrievalDataset(
        source,
        cfg.data.split,
        db,
        neighbors,
        k=cfg.model.k,
        resolution=cfg.model.resolution,
        k_random_from_top_n=cfg.train.k_random_from_top_n,
        seed=cfg.train.seed,
    )
    return dataset, replace(cfg, **dataset.provenance())


def image_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """RGB PIL image -> centre square crop -> resolution² -> (3, H, W) float32 in [-1, 1]."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    a = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3) in [0, 255]
    return torch.from_numpy(a).permute(2, 0, 1) / 127.5 - 1.0


class StepBatches:
    """Batch sampler: step s gets the items at stream positions [(s-1)·W + r]·B … + B − 1.

    The stream is the concatenation of per-epoch permutations, permutation e drawn from
    (seed, e); so the batch of a step depends only on (seed, step, process), never on history.
    Yields lists of ``(index, draw)`` keys with ``draw`` = stream position.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        first_step: int,
        last_step: int,
        rank: int = 0,
        world: int = 1,
    ):
        if n < 1:
            raise RdmError("the training dataset is empty")
        self.n, self.batch, self.seed = n, batch_size, seed
        self.first, self.last, self.rank, self.world = first_step, last_step, rank, world
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return max(0, self.last - self.first + 1)

    def position(self, step: int) -> dict:
        """Where the stream stands after ``step`` (saved in checkpoints, for the record)."""
        done = step * self.world * self.batch
        return {
            "epoch": done // self.n,
            "offset": done % self.n,
            "items": self.n,
            "batch_size": self.batch,
            "world_size": self.world,
        }

    def __iter__(self):
        for step in range(self.first, self.last + 1):
            start = ((step - 1) * self.world + self.rank) * self.batch
            yield [(self._item(p), p) for p in range(start, start + self.batch)]

    def _item(self, position: int) -> int:
        epoch = position // self.n
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return int(self._perm[position % self.n])


# --- schedules ----------------------------------------------------------------------------------


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The CPU generator for all of a step's noise: t, ε, dropout mask, VAE posterior sample."""
    state = np.random.SeedSequence([seed, step, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps`` (LDM's LambdaLinear), then constant or cosine.

    The cosine decays to 0 at ``cfg.steps``, as diffusers' ``get_cosine_schedule_with_warmup``
    (whose multiplier at ``step`` this equals for every step)."""
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


# --- the training loop --------------------------------------------------------------------------


def train(
    cfg: RunConfig,
    run_dir: str | Path,
    dataset: Dataset,
    *,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train ``cfg.model`` on ``dataset`` items (image, context, index) into ``run_dir``."""
    from tqdm.auto import tqdm

    tc = cfg.train
    run_dir = Path(run_dir)
    accelerator = _accelerator()
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process

    # Prepare the run directory.
    if main:
        _prepare_run_dir(run_dir, cfg, resume)
    accelerator.wait_for_everyone()
    checkpoint = latest_checkpoint(run_dir) if resume else None

    # Load data (the loader starts where the run resumes, below).
    _check_dataset(dataset, cfg)
    vae = load_vae(cfg.model, device)

    # Build model (its initialisation is a function of the seed, too).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tc.seed)
        model = RetrievalUNet(cfg.model)
    ema = copy.deepcopy(model).requires_grad_(False)
    # further EMAs of the same trajectory, to compare schedules (rdm.ema), by weights name
    ema_specs = [EmaSpec.parse(spec) for spec in tc.ema_extra]
    extra_emas = {spec.name: copy.deepcopy(ema) for spec in ema_specs}
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=tc.lr, betas=tc.adam_betas, weight_decay=tc.weight_decay
    )
    scheduler = make_scheduler(cfg.diffusion)

    # Resume: weights, optimizer and RNG states, and the data stream at the checkpoint's step.
    start, loss_value, state = 0, float("nan"), None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, ema, optimizer, extra_emas)
        start, loss_value = int(state["step"]), float(state.get("loss", "nan"))
        if start > tc.steps:
            raise RdmError(f"{checkpoint} is already past --steps {tc.steps}; ask for more steps")
    clock = _TrainClock.resumed(state, start)
    batches = StepBatches(len(dataset), tc.batch_size, tc.seed, start + 1, tc.steps, rank, world)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=tc.num_workers)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema.to(device)
    for extra in extra_emas.values():
        extra.to(device)
    precision = resolve_precision(tc.mixed_precision, device)
    if main:
        _truncate_loss_csv(run_dir / "loss.csv", start)
        what = f"resuming from {checkpoint}" if checkpoint else "starting"
        print(
            f"rdm train: {what}; {count_parameters(ema) / 1e6:.2f}M parameters, "
            f"{len(dataset)} training images, {world} process(es) on {device}, "
            f"{'bf16 autocast' if precision == 'bf16' else 'fp32'}"
        )

    bar = tqdm(total=tc.steps, initial=start, disable=not (progress and main), unit="step")
    rows: list[tuple[int, float, float]] = []
    step, t_first, images = start, None, 0
    clock.start()
    for images_batch, context, _ in loader:
        step += 1

        # Training step.
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        g = step_generator(tc.seed, step, rank)
        x0 = encode(vae, images_batch.to(device), cfg.model, g)
        with _autocast(device, precision):
            loss = diffusion_loss(
                model, x0, context.to(device), scheduler, g, tc.p_uncond, tc.snr_gamma
            )
        loss_value = accelerator.reduce(loss.detach(), "mean").item()
        if not math.isfinite(loss_value):
            last = latest_checkpoint(run_dir)
            raise TrainingDiverged(
                f"loss is {loss_value} at step {step}; the last good checkpoint is "
                f"{last or 'none (no checkpoint was written yet)'}. Lower --lr or use "
                "--mixed-precision no, then resume"
            )
        accelerator.backward(loss)
        if tc.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # Update EMA.
        ema_update(ema, accelerator.unwrap_model(model), ema_decay_at(step, tc.ema_decay))
        for spec in ema_specs:
            decay = spec.decay(step, tc.batch_size * world)
            ema_update(extra_emas[spec.name], accelerator.unwrap_model(model), decay)

        # Log.
        rows.append((step, loss_value, lr))
        if t_first is None:
            t_first = time.perf_counter()  # throughput excludes the first (warm-up) step
        else:
            images += tc.batch_size * world
        ips = images / max(time.perf_counter() - t_first, 1e-9)
        bar.update(1)
        if step % tc.log_every == 0 or step == tc.steps:
            bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{ips:.1f}")
            if main:
                _append_loss_csv(run_dir / "loss.csv", rows)
            rows = []

        # Save checkpoint.
        if step % tc.checkpoint_every == 0 or step == tc.steps:
            if main:
                _append_loss_csv(run_dir / "loss.csv", rows)
                rows = []
                state = {"data": batches.position(step), "loss": loss_value, "seed": tc.seed,
                         **clock.record()}  # fmt: skip
                save_checkpoint(
                    run_dir,
                    step,
                    accelerator.unwrap_model(model),
                    ema,
                    optimizer,
                    state,
                    cfg,
                    tc.keep_last,
                    extra_emas,
                )
                _plot_loss(
                    run_dir / "loss.csv", run_dir / "loss.png", cfg.diffusion.prediction_type
                )
            accelerator.wait_for_everyone()

        # Sample grid.
        if tc.sample_every and step % tc.sample_every == 0 and main:
            save_sample_grid(ema, cfg, dataset, vae, run_dir / "samples" / f"step-{step:07d}.png")
    bar.close()

    # Save the final weights beside config.json.
    if main:
        cfg.to_json(run_dir / "config.json")  # first: save_weights records checksums in it
        save_weights(accelerator.unwrap_model(model), run_dir / "model.safetensors")
        save_weights(ema, run_dir / "ema.safetensors")
        for name, extra in extra_emas.items():
            save_weights(extra, run_dir / f"{name}.safetensors")
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - t_first if t_first else 0.0
    ips = images / seconds if seconds else float("nan")
    t = clock.record()
    return TrainResult(run_dir, step, loss_value, ips, t["train_seconds"], t["train_seconds_from"])


# --- helpers of the loop ------------------------------------------------------------------------


class _TrainClock:
    """The training loop's wall time, carried through checkpoints so that a run trained in
    killed and resumed chunks still knows its total. A checkpoint records the seconds up to its
    step; time spent after the last checkpoint of a killed chunk is not counted (those steps are
    trained again, and counted then). A checkpoint written before rdm kept the time has none:
    the count then starts at its step (``train_seconds_from``)."""

    _now = staticmethod(time.perf_counter)

    def __init__(self, before: float = 0.0, counted_from: int = 0):
        self.before, self.counted_from, self.t0 = before, counted_from, self._now()

    @classmethod
    def resumed(cls, state: dict | None, step: int) -> _TrainClock:
        if state is None:
            return cls()
        if "train_seconds" not in state:
            return cls(0.0, step)
        return cls(float(state["train_seconds"]), int(state.get("train_seconds_from", 0)))

    def start(self) -> None:
        self.t0 = self._now()

    def record(self) -> dict:
        seconds = self.before + self._now() - self.t0
        return {"train_seconds": round(seconds, 2), "train_seconds_from": self.counted_from}


def _accelerator():
    """An fp32 Accelerator (devices, processes, gradient sync); precision is :func:`_autocast`'s.

    accelerate keeps one process-wide state whose precision is fixed by the first Accelerator, so
    a second run in the same process could not change it; every run asks for the same "no" and
    sets its own precision (``--mixed-precision`` wins over ``accelerate launch``'s flag).
    """
    from accelerate import Accelerator

    return Accelerator(mixed_precision="no")


def resolve_precision(mixed_precision: str, device: torch.device) -> str:
    """ "bf16" or "no" for ``mixed_precision`` "auto" on ``device``; other values unchanged.

    bf16 pays only where it is computed natively: a CUDA device that supports it, or a CPU with
    AVX512-BF16 or AMX-BF16. Elsewhere (AVX-512 without BF16, AVX2) torch emulates it and a step
    of the demo UNet took about 1.8x as long as in fp32 (docs/training.md).
    """
    if mixed_precision != "auto":
        return mixed_precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    if device.type == "cpu":
        return "bf16" if _cpu_flags() & {"avx512_bf16", "amx_bf16"} else "no"
    return "no"


def _cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where it does not exist)."""
    return set((cpuinfo_field("flags") or "").split())


def _autocast(device: torch.device, mixed_precision: str):
    """bf16 autocast for the forward pass and loss when ``mixed_precision == "bf16"``: what
    accelerate's bf16 mode does (no gradient scaling is needed for bf16); weights stay fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16")


def _prepare_run_dir(run_dir: Path, cfg: RunConfig, resume: bool) -> None:
    """Create ``run_dir`` or check that ``cfg`` may resume the run in it; write config.json."""
    require_writable(run_dir, is_dir=True, what="run directory")
    config_path = run_dir / "config.json"
    if not config_path.exists():
        cfg.to_json(config_path)
        return
    if not resume:
        raise RdmError(
            f"{run_dir} already holds a run (config.json); pass --resume to continue it, "
            "or choose a new --out"
        )
    check_resume_config(RunConfig.from_json(config_path), cfg, run_dir)
    cfg.to_json(config_path)


def check_resume_config(old: RunConfig, new: RunConfig, run_dir: Path) -> None:
    """Refuse to resume a run with a different model, encoder, database or trajectory."""
    if old.preset != new.preset or old.model != new.model:
        raise RdmError(
            f"{run_dir} was trained with preset {old.preset!r} and model {old.model}; the "
            f"requested preset {new.preset!r} / model {new.model} differs. Resume with the same "
            "settings or choose a new --out"
        )
    from rdm.encoders import require_same_identity

    if old.encoder and new.encoder:
        require_same_identity(old.encoder, f"run {run_dir}", new.encoder, "the given database")
    if old.db_fingerprint != new.db_fingerprint:
        raise IdentityMismatch(
            f"{run_dir} was trained with database fingerprint {old.db_fingerprint!r} but the "
            f"given database has {new.db_fingerprint!r}; resume with the original --db"
        )
    changed = [
        f"{f.name}: {getattr(old.train, f.name)!r} -> {getattr(new.train, f.name)!r}"
        for f in fields(TrainConfig)
        if f.name not in RESUMABLE_CHANGES
        and getattr(old.train, f.name) != getattr(new.train, f.name)
    ]
    if old.train.lr_schedule == "cosine" and old.train.steps != new.train.steps:
        changed.append(
            f"steps: {old.train.steps} -> {new.train.steps} (the cosine learning rate is a "
            "function of the total steps)"
        )
    # clipping is a sampling setting (it never reaches the loss): it may change
    old_diffusion = replace(old.diffusion, clip_sample=new.diffusion.clip_sample)
    if changed or old_diffusion != new.diffusion:
        raise RdmError(
            f"cannot resume {run_dir} exactly with changed settings ({'; '.join(changed) or 'diffusion'}); "
            f"only {', '.join(RESUMABLE_CHANGES)} may change on resume"
        )


def _check_dataset(dataset: Dataset, cfg: RunConfig) -> None:
    image, context, _ = dataset[(0, 0)]
    want_ctx = (cfg.model.k, cfg.model.context_dim)
    want_img = (3, cfg.model.resolution, cfg.model.resolution)
    if tuple(context.shape) != want_ctx or tuple(image.shape) != want_img:
        raise RdmError(
            f"dataset items have image {tuple(image.shape)} and context {tuple(context.shape)}, "
            f"but the model config expects {want_img} and (k, d) = {want_ctx}"
        )


def _truncate_loss_csv(path: Path, step: int) -> None:
    """Keep the rows of steps <= ``step`` (a resumed run rewrites the rest)."""
    kept = [r for r in _step_rows(path) if int(r[0]) <= step] if step > 0 else []

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "loss", "lr"])
            w.writerows(kept)

    atomic_write(path, write)


def _step_rows(path: Path) -> list[list[str]]:
    """The whole (step, loss, lr) rows of a loss.csv: no header, no row torn by a kill."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.reader(f) if len(r) == 3 and r[0].isdigit()]


def last_logged_step(run_dir: str | Path) -> int:
    """The last step a run's loss.csv records (0 before its first log)."""
    rows = _step_rows(Path(run_dir) / "loss.csv")
    return int(rows[-1][0]) if rows else 0


def _append_loss_csv(path: Path, rows: list[tuple[int, float, float]]) -> None:
    if rows:
        with open(path, "a", newline="") as f:
            csv.writer(f).writerows((s, repr(loss), repr(lr)) for s, loss, lr in rows)


def read_loss_csv(path: str | Path) -> list[tuple[int, float]]:
    with open(path, newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


_LOSS_NAMES = {"epsilon": "ε-MSE", "v_prediction": "v-MSE", "sample": "x₀-MSE"}


def _plot_loss(csv_path: Path, png_path: Path, prediction: str = "epsilon") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = np.array(read_loss_csv(csv_path), dtype=np.float64).reshape(-1, 2)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(data[:, 0], data[:, 1], lw=0.5, alpha=0.4, label="loss")
    if len(data) >= 20:
        w = max(len(data) // 50, 10)
        smooth = np.convolve(data[:, 1], np.ones(w) / w, mode="valid")
        ax.plot(data[w - 1 :, 0], smooth, lw=1.5, label=f"mean of {w}")
    ax.set_xlabel("step")
    ax.set_ylabel(f"{_LOSS_NAMES.get(prediction, prediction)} loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    try:
        atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


@torch.no_grad()
def save_sample_grid(model, cfg: RunConfig, dataset: Dataset, vae, path: Path) -> None:
    """Rows: training images, samples from their neighbours (guided), samples from ∅."""
    from rdm.sampling import guided, initial_noise, sample, to_uint8
    from rdm.sheets import image_grid, save_png

    sc = cfg.sample
    n = min(sc.grid_size, len(dataset))
    items = [dataset[(i, 0)] for i in range(n)]
    device = next(model.parameters()).device
    context = torch.stack([c for _, c, _ in items]).to(device)
    seeds = [sc.seed + i for i in range(n)]
    shape = (cfg.model.in_channels, cfg.model.sample_size, cfg.model.sample_size)
    rows = [[Image.fromarray(a) for a in to_uint8(torch.stack([im for im, _, _ in items]))]]
    was_training = model.training
    model.eval()
    for ctx, scale in ((context, sc.guidance_scale), (None, 1.0)):
        x_T, gens = initial_noise(seeds, shape, device)
        x0 = sample(
            sc.sampler,
            guided(model, ctx, None, scale),
            x_T,
            cfg.diffusion,
            sc.steps,
            eta=sc.eta,
            generators=gens,
        )
        rows.append([Image.fromarray(a) for a in to_uint8(decode(vae, x0, cfg.model))])
    model.train(was_training)
    labels = ["data", f"neighbours s={sc.guidance_scale:g}", "null context"]
    save_png(image_grid(rows, labels, cell=max(cfg.model.resolution, 32)), path)
