"""``rdm train --data SOURCE --db DIR --out RUN [--preset small] [--resume] ...``"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from rdm.errors import RdmError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a retrieval-augmented diffusion model (resumable)",
        description="Train the conditional UNet on a source's training split, each image "
        "conditioned on its k stored database neighbours. Checkpoints go to RUN/checkpoints; "
        "--resume continues exactly where the last checkpoint left off.",
    )
    p.add_argument("--data", help="training source spec (default on --resume: the run's)")
    p.add_argument("--split", help="split of --data to train on (default train)")
    p.add_argument("--db", type=Path, help="database directory (default on --resume: the run's)")
    p.add_argument(
        "--neighbors", type=Path, help="neighbours file (default DB/neighbors-SPLIT.safetensors)"
    )
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--preset", choices=("tiny", "small", "base"), help="model size (default small)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--baseline", action="store_true", help="no retrieval: always the null context")
    p.add_argument("--vae", type=Path, help="train in the latent space of this AutoencoderKL dir")
    model = p.add_argument_group("model (fixed once a run has started)")
    model.add_argument("--resolution", type=int, help="image side in pixels")
    model.add_argument("--k", type=int, help="neighbours per image (default 4)")
    model.add_argument("--null-context", choices=("learned", "zeros"))
    model.add_argument(
        "--channels",
        type=parse_channels,
        dest="block_out_channels",
        help="UNet widths, e.g. 32,64,64",
    )
    model.add_argument(
        "--layers-per-block", type=int, help="ResNet layers per UNet level (the depth; default 1)"
    )
    model.add_argument(
        "--image-channels",
        type=int,
        choices=(1, 3),
        help="pixel channels the model generates (default: 1 when every training image is grey, "
        "as the neighbours file records, else 3)",
    )
    diffusion = p.add_argument_group("diffusion (fixed once a run has started)")
    diffusion.add_argument(
        "--prediction",
        choices=("epsilon", "v_prediction", "sample"),
        dest="prediction_type",
        help="what the network predicts: ε, v or x_0 (default: the preset's)",
    )
    diffusion.add_argument(
        "--zero-snr",
        action=argparse.BooleanOptionalAction,
        dest="zero_terminal_snr",
        help="rescale the betas to zero terminal SNR (needs --prediction v_prediction or sample)",
    )
    diffusion.add_argument("--schedule", choices=("scaled_linear", "linear", "cosine"))
    diffusion.add_argument(
        "--clip-sample",
        action=argparse.BooleanOptionalAction,
        help="clip the predicted x_0 to [-1, 1] while sampling (pixel space)",
    )
    train = p.add_argument_group("training")
    train.add_argument("--steps", type=int, help="total steps (may be raised on --resume)")
    train.add_argument("--batch-size", type=int, help="images per step and process")
    train.add_argument("--lr", type=float)
    train.add_argument("--warmup", type=int, dest="warmup_steps", help="linear warm-up steps")
    train.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        help="after the warm-up: constant (default) or cosine decay to 0 at --steps",
    )
    train.add_argument("--ema-decay", type=float)
    train.add_argument(
        "--ema-extra",
        action="append",
        metavar="SPEC",
        help="keep a further EMA, saved as ema-<kind>-<value>.safetensors (repeatable): "
        "ldm:DECAY, power:P (diffusers' warm-up) or halflife:IMAGES (EDM); sample it with "
        "--weights ema-<kind>-<value>",
    )
    train.add_argument(
        "--snr-gamma", type=float, help="min-SNR-γ loss weighting (Hang et al. 2023; 5 is usual)"
    )
    train.add_argument("--p-uncond", type=float, help="guidance dropout of the neighbour set")
    train.add_argument(
        "--k-top-n",
        type=int,
        dest="k_random_from_top_n",
        help="draw the k neighbours at random from the top n stored",
    )
    train.add_argument(
        "--mixed-precision",
        choices=("auto", "bf16", "no"),
        help="auto (default): bf16 where the hardware has it natively, else fp32",
    )
    train.add_argument("--seed", type=int)
    train.add_argument("--checkpoint-every", type=int)
    train.add_argument("--sample-every", type=int, help="sample grid every N steps (0: never)")
    train.add_argument("--log-every", type=int)
    train.add_argument("--num-workers", type=int, help="DataLoader worker processes")
    train.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's choice; 1 can be several times faster on a "
        "CPU shared with other jobs, see docs/training.md)",
    )
    p.set_defaults(func=run)


TRAIN_FLAGS = (
    "steps",
    "batch_size",
    "lr",
    "warmup_steps",
    "lr_schedule",
    "ema_decay",
    "ema_extra",
    "snr_gamma",
    "p_uncond",
    "k_random_from_top_n",
    "mixed_precision",
    "seed",
    "checkpoint_every",
    "sample_every",
    "log_every",
    "num_workers",
)


def run(args: argparse.Namespace) -> int:
    from rdm.config import DataConfig, RunConfig, preset
    from rdm.data import open_source
    from rdm.database import Database
    from rdm.model import vae_settings
    from rdm.neighbors import load_neighbors
    from rdm.train import default_image_channels, retrieval_dataset, train

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)

    # Start from the run's own config on --resume, else from the preset.
    saved = args.out / "config.json"
    if args.resume and saved.is_file():
        cfg = RunConfig.from_json(saved)
        if args.preset and args.preset != cfg.preset:
            raise RdmError(
                f"--out {args.out} was trained with preset {cfg.preset!r}, not {args.preset!r}; "
                "drop --preset to resume it, or choose a new --out"
            )
    else:
        cfg = preset(args.preset or "small")
    data = DataConfig(
        source=args.data or cfg.data.source,
        split=args.split or cfg.data.split,
        db=str(args.db or cfg.data.db),
        neighbors=str(args.neighbors or cfg.data.neighbors or ""),
    )
    if not data.source or not data.db:
        raise RdmError("give --data SOURCE and --db DIR (they are only optional with --resume)")
    if not data.neighbors:
        data.neighbors = str(Path(data.db) / f"neighbors-{data.split}.safetensors")

    # Apply the command-line overrides.
    model_changes = {
        name: getattr(args, name)
        for name in ("resolution", "k", "null_context", "block_out_channels", "layers_per_block")
        if getattr(args, name) is not None
    }
    if args.image_channels is not None:
        model_changes["in_channels"] = args.image_channels
    diffusion_changes = {
        name: getattr(args, name)
        for name in ("prediction_type", "zero_terminal_snr", "schedule", "clip_sample")
        if getattr(args, name) is not None
    }
    if args.prediction_type and args.clip_sample is None:
        # the measured default (docs/training.md): an ε-model in pixel space needs x̂_0 clipped,
        # a v- or x_0-model samples better without
        diffusion_changes["clip_sample"] = args.prediction_type == "epsilon"
    if args.baseline:
        model_changes["baseline"] = True
    if args.vae is not None:
        model_changes.update(vae_settings(args.vae))
    train_changes = {n: getattr(args, n) for n in TRAIN_FLAGS if getattr(args, n) is not None}

    # Open the source, database and neighbours; the model reads d from the database.
    source = open_source(data.source)
    db = Database.open(data.db)
    neighbors = load_neighbors(data.neighbors)
    if not (args.resume and saved.is_file()) and args.vae is None and args.image_channels is None:
        model_changes["in_channels"] = default_image_channels(neighbors, source)
    diffusion = replace(cfg.diffusion, **diffusion_changes)
    cfg = replace(
        cfg,
        model=replace(cfg.model, context_dim=db.dim, **model_changes),
        diffusion=replace(diffusion, clip_sample=diffusion.clip_sample and not args.vae),
        train=replace(cfg.train, **train_changes),
        data=data,
    )
    dataset, cfg = retrieval_dataset(cfg, source, db, neighbors)

    result = train(cfg, args.out, dataset, resume=args.resume)
    since = f" since step {result.train_seconds_from}" if result.train_seconds_from else ""
    print(
        f"trained {result.step} steps into {result.run_dir} (last loss {result.loss:.4f}, "
        f"{result.images_per_s:.1f} images/s, {result.train_seconds / 60:.1f} min of training"
        f"{since}); sample with 'rdm sample {result.run_dir} ...'"
    )
    return 0


def parse_channels(text: str) -> tuple[int, ...]:
    """argparse type of ``--channels``: UNet widths like ``32,64,64``."""
    try:
        widths = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers like 32,64,64") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers like 32,64,64")
    return widths
