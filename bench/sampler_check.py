"""Check the samplers against a known answer and against each other on a trained model.

Known answer (``--gaussian-only``, seconds): for Gaussian data N(μ, σ²) the exact ε is known in
closed form and the probability-flow ODE solution from x_T is too; each sampler's output is
compared with the exact solution from the top of the schedule, for rdm's default timesteps and for
the timesteps rdm used before they started at the top ("old": DDIM's "leading" 1, 1 + T/steps, …
and log-SNR steps from there).

Trained model: either ``--run DIR`` (an existing run or pretrained folder, e.g. the shipped demo
model ``src/rdm/assets/demo-fashion``, sampled with its null context) or, without it, a small
unconditional model (the no-retrieval baseline) trained here on Fashion-MNIST for each noise
schedule. The same seeds are sampled with DDIM-250 η = 0 from the top (the reference: the
probability-flow ODE solved with small steps) and each sampler below, old and new timesteps side
by side, and for each the script prints its RMSE to the reference (pixels in [0, 1]; meaningful for
η = 0), its high-frequency energy relative to the data's (mean |Laplacian|; noise shows as a ratio
well above 1, over-smoothing as one below 1), its colour (Fashion-MNIST is grey: 0) and its mean
and std next to the data's. A grid per model is written to --out. Training runs found in --out
are continued to --steps (exact resume), so a longer check reuses a shorter one.

    python bench/sampler_check.py --gaussian-only
    python bench/sampler_check.py --run src/rdm/assets/demo-fashion --images 16
    python bench/sampler_check.py --run src/rdm/assets/demo-fashion --pairs ddim-600-0 --no-extras
    python bench/sampler_check.py --steps 3000     # trains: 16 px, batch 64
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rdm.checkpoint import load_run
from rdm.config import ModelConfig, RunConfig, SampleConfig, TrainConfig
from rdm.diffusion import make_scheduler, scheduler_config, top_timestep
from rdm.sampling import (
    default_timesteps,
    dpm_solver_pp,
    get_sampler,
    guided,
    initial_noise,
    to_unit,
)
from rdm.train import InMemoryDataset, image_tensor, train


def fashion_mnist(n: int, resolution: int) -> InMemoryDataset:
    from rdm.data import open_source

    source = open_source("fashion-mnist")
    ids = source.split_ids("train")[:n]
    images = torch.stack([image_tensor(source.load(int(i)), resolution) for i in ids])
    return InMemoryDataset(images, torch.zeros(n, 1, 8))  # baseline: the context is never read


def run_config(schedule: str, steps: int, batch: int, resolution: int) -> RunConfig:
    cfg = RunConfig(
        preset="sampler-check",
        model=ModelConfig(
            resolution=resolution,
            block_out_channels=(32, 64, 64),
            attention_levels=(False, True, True),
            context_dim=8,
            k=1,
            baseline=True,
        ),
        train=TrainConfig(
            steps=steps,
            batch_size=batch,
            lr=3e-4,
            ema_decay=0.999,
            mixed_precision="bf16",
            checkpoint_every=500,
            sample_every=0,
            log_every=50,
        ),
        sample=SampleConfig(steps=50, eta=0.0),
    )
    return replace(cfg, diffusion=replace(cfg.diffusion, schedule=schedule))


def old_timesteps(sampler: str, cfg, steps: int) -> list[int]:
    """The timesteps rdm sampled with before they started at the top of the schedule.

    DDIM: diffusers' "leading" spacing with LDM's offset 1 (offset 0 when T // steps == 1):
    1, 1 + T/steps, …, so 600 steps started at t = 599. DPM++: log-SNR-uniform from DDIM's first
    timestep, duplicates dropped (50 steps ran 49).
    """
    from diffusers import DDIMScheduler

    T = cfg.num_train_timesteps
    if sampler == "ddim":
        scheduler = DDIMScheduler(
            **scheduler_config(cfg),
            steps_offset=1 if T // steps > 1 else 0,
            timestep_spacing="leading",
        )
        scheduler.set_timesteps(steps)
        return scheduler.timesteps.tolist()
    ac = make_scheduler(cfg).alphas_cumprod.double()
    t_max = min((steps - 1) * (T // steps) + 1, T - 1)
    lam = 0.5 * torch.log(ac / (1 - ac))
    grid = torch.linspace(float(lam[t_max]), float(lam[0]), steps + 1)[:-1]
    nearest = (lam[None, :] - grid[:, None]).abs().argmin(dim=1)
    return sorted({int(t) for t in nearest}, reverse=True)


def dpm_diffusers_spacing(spacing: str):
    """DPM-Solver++(2M) with one of diffusers' built-in timestep spacings (the alternatives)."""
    from diffusers import DPMSolverMultistepScheduler

    def timesteps(cfg, steps: int) -> list[int]:
        extra = {"steps_offset": 1} if spacing == "leading" else {}
        scheduler = DPMSolverMultistepScheduler(
            **scheduler_config(cfg), timestep_spacing=spacing, **extra
        )
        scheduler.set_timesteps(steps)
        return scheduler.timesteps.tolist()

    return timesteps


def gaussian_table(n: int = 4096) -> None:
    """Error to the exact probability-flow ODE solution from the top, for Gaussian data N(μ, σ²)."""
    from rdm.config import DiffusionConfig

    print(
        "Gaussian data, exact ε, 4096 values: max |x_0 − exact ODE solution from the top| "
        "(std of x_0; the data's is σ)"
    )
    x_T, _ = initial_noise(range(n // 16), (1, 4, 4))
    for mu, sigma in ((0.3, 0.5), (0.1, 0.05)):
        for schedule in ("scaled_linear", "cosine"):
            cfg = DiffusionConfig(schedule=schedule, clip_sample=False)
            ac = make_scheduler(cfg).alphas_cumprod.double()

            def eps(x, t, ac=ac, mu=mu, sigma=sigma):
                a = ac[int(t)]
                return (
                    (1 - a).sqrt() * (x.double() - a.sqrt() * mu) / (a * sigma**2 + 1 - a)
                ).float()

            a = ac[top_timestep(cfg)]
            exact = mu + sigma * (x_T.double() - a.sqrt() * mu) / (a * sigma**2 + 1 - a).sqrt()
            print(f"  μ={mu} σ={sigma} {schedule} (top t = {top_timestep(cfg)})")
            for name, steps in (("ddim", 50), ("ddim", 100), ("ddim", 600), ("dpm++", 20)):
                cells = []
                for label, ts in (
                    ("old", old_timesteps(name, cfg, steps)),
                    ("new", default_timesteps(name, cfg, steps)),
                ):
                    x0 = get_sampler(name)(eps, x_T, cfg, ts).double()
                    err = (x0 - exact).abs().max().item()
                    cells.append(
                        f"{label} from t={ts[0]:3d}, {len(ts):3d} evals: {err:.4f} "
                        f"({x0.std().item():.3f})"
                    )
                print(f"    {name}-{steps:<4d} " + "   ".join(cells))
            ts = dpm_diffusers_spacing("leading")(cfg, 20)
            x0 = dpm_solver_pp(eps, x_T, cfg, ts).double()
            print(
                f"    dpm++-20 diffusers 'leading' from t={ts[0]}: "
                f"{(x0 - exact).abs().max().item():.4f} ({x0.std().item():.3f})"
            )


def noclip(cfg):
    return replace(cfg, clip_sample=False)


def colour(x: torch.Tensor) -> float:
    """Mean |pixel − its channel mean|: 0 for grey images (Fashion-MNIST is grey)."""
    return (x - x.mean(1, keepdim=True)).abs().mean().item()


def high_freq(x: torch.Tensor) -> float:
    """Mean |discrete Laplacian| of images in [0, 1]."""
    lap = (
        4 * x[..., 1:-1, 1:-1]
        - x[..., :-2, 1:-1]
        - x[..., 2:, 1:-1]
        - x[..., 1:-1, :-2]
        - x[..., 1:-1, 2:]
    )
    return lap.abs().mean().item()


def sampler_rows(
    cfg, pairs: list[str], extras: bool
) -> list[tuple[str, str, list[int], float, bool]]:
    """(label, sampler, timesteps, η, clip x_0) per row; the first row is the reference.

    ``pairs`` are "sampler-steps-η" (e.g. "ddim-50-1"), each sampled with the old and the new
    timesteps; ``extras`` adds DDIM-50 without x_0 clipping and diffusers' DPM++ spacings.
    """
    clip = cfg.clip_sample
    rows = [("DDIM-250 η=0 (reference)", "ddim", default_timesteps("ddim", cfg, 250), 0.0, clip)]
    for pair in pairs:
        name, steps, eta = pair.rsplit("-", 2)
        steps, eta = int(steps), float(eta)
        for label, ts in (
            ("old", old_timesteps(name, cfg, steps)),
            ("new", default_timesteps(name, cfg, steps)),
        ):
            rows.append((f"{name}-{steps} η={eta:g} {label} (t={ts[0]})", name, ts, eta, clip))
    if extras and clip:
        ts = default_timesteps("ddim", cfg, 50)
        rows.append(("ddim-50 η=0 new, no x_0 clipping", "ddim", ts, 0.0, False))
    for spacing in ("leading", "linspace") if extras else ():
        ts = dpm_diffusers_spacing(spacing)(cfg, 20)
        rows.append((f"dpm++-20 diffusers {spacing} (t={ts[0]})", "dpm++", ts, 0.0, clip))
    return rows


def compare(model, cfg, data: torch.Tensor, args, title: str, png: Path) -> None:
    """Sample the same seeds with every row of :func:`sampler_rows`; print the figures."""
    denoise = guided(model, None)  # the null context ∅: unconditional
    shape = (cfg.model.in_channels, cfg.model.sample_size, cfg.model.sample_size)
    outputs = {}
    for label, name, ts, eta, clip in sampler_rows(cfg.diffusion, args.pairs, args.extras):
        x_T, gens = initial_noise(range(args.images), shape)
        dcfg = replace(cfg.diffusion, clip_sample=clip)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            x0 = get_sampler(name)(denoise, x_T, dcfg, ts, eta=eta, generators=gens)
        outputs[label] = to_unit(x0)
        print(f"  sampled {label} in {time.perf_counter() - start:.0f} s", flush=True)
    ref = next(iter(outputs.values()))
    data = to_unit(data)
    print(f"\n{title} ({args.images} images, the same seeds in every row)")
    print(
        f"  {'sampler':36s} RMSE to ref   high-freq / data   colour   mean    std"
        f"\n  {'data (Fashion-MNIST)':36s} {'':11s}   {1:16.2f}   {colour(data):6.3f}"
        f"   {data.mean():.3f}   {data.std():.3f}"
    )
    for label, x in outputs.items():
        rmse = (x - ref).square().mean().sqrt().item()
        hf = high_freq(x) / high_freq(data)
        print(
            f"  {label:36s} {rmse:11.4f}   {hf:16.2f}   {colour(x):6.3f}"
            f"   {x.mean():.3f}   {x.std():.3f}"
        )
    rows = [
        np.concatenate([(img.permute(1, 2, 0).numpy() * 255).astype(np.uint8) for img in x[:8]], 1)
        for x in outputs.values()
    ]
    size = 64 if cfg.model.resolution <= 32 else cfg.model.resolution
    grid = Image.fromarray(np.concatenate(rows, 0)).resize(
        (8 * size, len(rows) * size), Image.NEAREST
    )
    png.parent.mkdir(parents=True, exist_ok=True)
    grid.save(png)
    print(f"  grid (rows in the order above): {png}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="sample this run / pretrained folder; no training")
    p.add_argument("--steps", type=int, default=3000, help="training steps per schedule")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--images", type=int, default=16, help="samples per sampler")
    p.add_argument("--schedules", nargs="+", default=["scaled_linear", "cosine"])
    p.add_argument("--out", type=Path, default=Path("results/sampler-check"))
    p.add_argument(
        "--pairs",
        nargs="+",
        default=["ddim-50-1", "ddim-50-0", "ddim-100-0", "dpm++-20-0"],
        help="sampler-steps-η sampled with the old and the new timesteps (e.g. ddim-600-0)",
    )
    p.add_argument(
        "--extras",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="DDIM-50 without clipping, DPM++-20 with diffusers' spacings",
    )
    p.add_argument("--bf16", action="store_true", help="sample under bf16 autocast")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--gaussian-only", action="store_true", help="only the known-answer table")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    gaussian_table()
    if args.gaussian_only:
        return

    if args.run is not None:
        model, cfg = load_run(args.run)
        if cfg.model.latent:
            raise SystemExit(f"{args.run}: a latent model; this check samples pixel models")
        data = fashion_mnist(1000, cfg.model.resolution).images
        title = f"{args.run} ({cfg.diffusion.schedule}, {cfg.train.steps} training steps)"
        compare(model, cfg, data, args, title, args.out / f"grid-{args.run.name}.png")
        return
    data = fashion_mnist(8000, args.resolution)
    for schedule in args.schedules:
        run_dir = args.out / f"run-{schedule}"
        cfg = run_config(schedule, args.steps, args.batch_size, args.resolution)
        start = time.perf_counter()
        train(cfg, run_dir, data, resume=(run_dir / "config.json").exists())  # or continue it
        print(f"trained {schedule} to step {args.steps} in {time.perf_counter() - start:.0f} s")
        model, cfg = load_run(run_dir)
        title = f"schedule {schedule} ({args.steps} training steps)"
        compare(model, cfg, data.images[:1000], args, title, args.out / f"grid-{schedule}.png")


if __name__ == "__main__":
    main()
