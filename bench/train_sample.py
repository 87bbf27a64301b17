"""Training and sampling throughput, measured side by side in one run.

1. Training: images/s of the full loop (``rdm.train.train``: data loading, guidance dropout,
   EMA, logging, a checkpoint at the end) against the bare UNet forward + backward + AdamW step on
   one fixed batch, in bf16 autocast and in fp32. Reports the loop's overhead and the bf16 speed-up.
2. Threads: the bare bf16 step with 1 torch thread and with torch's default.
3. Sampling: images/s of DDIM-100, DDIM-50 and DPM-Solver++-20, with guidance (s = 2, one batched
   forward of 2B) and without (s = 1).

Repetitions are interleaved (bare, loop, bare, loop, ...) and the median is reported, so load from
other processes on a shared machine hits both sides alike.

    python bench/train_sample.py                  # small preset, 32 px, batch 64
    python bench/train_sample.py --preset tiny --steps 3 --sample-images 4   # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import Dataset

from rdm.cli.train import parse_channels
from rdm.config import preset
from rdm.diffusion import make_scheduler
from rdm.model import RetrievalUNet, count_parameters
from rdm.sampling import guided, initial_noise, sample
from rdm.train import image_tensor, train


class SourceDataset(Dataset):
    """Real decoded images (like RetrievalDataset) with random unit-norm contexts."""

    def __init__(self, source, ids, k, d, resolution):
        self.source, self.ids, self.resolution = source, ids, resolution
        v = np.random.default_rng(0).standard_normal((len(ids), k, d)).astype(np.float32)
        self.contexts = torch.from_numpy(v / np.linalg.norm(v, axis=-1, keepdims=True))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, key):
        i = key[0] if isinstance(key, tuple) else key
        image = image_tensor(self.source.load(int(self.ids[i])), self.resolution)
        return image, self.contexts[i], i


def make_dataset(cfg, data_spec: str, n: int):
    from rdm.data import open_source

    source = open_source(data_spec)
    ids = source.split_ids("train")[:n]
    return SourceDataset(source, ids, cfg.model.k, cfg.model.context_dim, cfg.model.resolution)


def bare_steps(cfg, batch, steps: int, bf16: bool) -> float:
    """images/s of the UNet forward + backward + AdamW step alone, on one fixed batch."""
    torch.manual_seed(0)
    model = RetrievalUNet(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0, ctx = batch
    ac = make_scheduler(cfg.diffusion).alphas_cumprod
    t = torch.randint(0, 1000, (len(x0),))
    eps = torch.randn_like(x0)
    a = ac[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x_t, t, ctx)
        loss = (out.float() - eps).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up (oneDNN primitive creation)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(x0) / (time.perf_counter() - start)


def loop_steps(cfg, dataset, steps: int, bf16: bool) -> float:
    """images/s of rdm.train.train over ``steps`` steps after its first (warm-up) step."""
    tc = replace(
        cfg.train,
        steps=steps + 1,
        mixed_precision="bf16" if bf16 else "no",
        checkpoint_every=10**9,
        sample_every=0,
        log_every=1,
    )
    with tempfile.TemporaryDirectory() as run_dir:
        result = train(replace(cfg, train=tc), run_dir, dataset, progress=False)
    return result.images_per_s


def sampling(cfg, model, n: int, name: str, steps: int, scale: float, bf16: bool) -> float:
    context = torch.nn.functional.normalize(
        torch.randn(n, cfg.model.k, cfg.model.context_dim), dim=-1
    )
    shape = (cfg.model.in_channels, cfg.model.sample_size, cfg.model.sample_size)
    x_T, gens = initial_noise(range(n), shape)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        sample(
            name, guided(model, context, None, scale), x_T, cfg.diffusion, steps, generators=gens
        )
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument(
        "--channels",
        type=parse_channels,
        help="UNet channels per level, e.g. 64,128,128 (default: the preset's)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=6, help="timed training steps per repetition")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sample-images", type=int, default=16)
    p.add_argument("--data", default="fashion-mnist", help="source spec for the loop's images")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--skip-sampling", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = preset(args.preset)
    cfg = replace(cfg, train=replace(cfg.train, batch_size=args.batch_size, seed=0))
    if args.channels:
        cfg = replace(cfg, model=replace(cfg.model, block_out_channels=args.channels))
    dataset = make_dataset(cfg, args.data, 50 * args.batch_size)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=args.batch_size)))[:2]
    print(
        f"preset {args.preset}: {count_parameters(RetrievalUNet(cfg.model)) / 1e6:.2f}M parameters, "
        f"{cfg.model.resolution} px, batch {args.batch_size}, {torch.get_num_threads()} torch "
        f"threads, data {args.data}, seed 0"
    )

    # 1. Training: bare step vs full loop, bf16 vs fp32, interleaved repetitions.
    results: dict[tuple[str, bool], list[float]] = {}
    for _ in range(args.repeats):
        for bf16 in (True, False):
            results.setdefault(("bare", bf16), []).append(bare_steps(cfg, batch, args.steps, bf16))
            results.setdefault(("loop", bf16), []).append(
                loop_steps(cfg, dataset, args.steps, bf16)
            )
    med = {key: statistics.median(v) for key, v in results.items()}
    print("\ntraining images/s (median of repeats)   bare step   full loop   loop overhead")
    for bf16 in (True, False):
        bare, loop = med[("bare", bf16)], med[("loop", bf16)]
        label = "bf16 autocast" if bf16 else "fp32"
        print(f"  {label:38s} {bare:9.1f}   {loop:9.1f}   {100 * (1 - loop / bare):+12.1f}%")
    print(
        f"  bf16 / fp32 speed-up: bare {med[('bare', True)] / med[('bare', False)]:.2f}x, "
        f"loop {med[('loop', True)] / med[('loop', False)]:.2f}x"
    )

    # 2. Threads: on a CPU shared with other jobs, fewer OpenMP threads can be faster.
    default_threads = torch.get_num_threads()
    if default_threads > 1:
        by_threads: dict[int, list[float]] = {}
        for _ in range(args.repeats):
            for n in (1, default_threads):
                torch.set_num_threads(n)
                by_threads.setdefault(n, []).append(bare_steps(cfg, batch, args.steps, True))
        torch.set_num_threads(default_threads)
        one, many = (statistics.median(by_threads[n]) for n in (1, default_threads))
        print(
            f"  bare bf16 step with 1 thread: {one:.1f} images/s, with {default_threads}: "
            f"{many:.1f} images/s ({many / one:.2f}x)"
        )
    if args.skip_sampling:
        return

    # 3. Sampling throughput, bf16 autocast, the EMA-sized model (random weights: same cost).
    torch.manual_seed(0)
    model = RetrievalUNet(cfg.model).eval()
    print(f"\nsampling images/s ({args.sample_images} images per call, bf16 autocast)")
    print("  sampler          no guidance (s=1)   guidance (s=2)")
    for name, steps in (("ddim", 100), ("ddim", 50), ("dpm++", 20)):
        row = [sampling(cfg, model, args.sample_images, name, steps, s, True) for s in (1.0, 2.0)]
        print(f"  {name}-{steps:<10d} {row[0]:17.2f}   {row[1]:14.2f}")


if __name__ == "__main__":
    main()
