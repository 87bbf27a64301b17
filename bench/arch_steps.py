"""Training step time of UNet widths and depths against the recipe's 1.86M UNet, side by side,
and the steps each gets at the recipe arm's wall time (600 steps of R1 in docs/training.md).

The bare forward + backward + AdamW step (bench/train_sample.py's ``bare_steps``) on one fixed
batch, fp32, one grey channel, the architectures interleaved over the repetitions and the median
taken, so load from other jobs hits every arm alike. The figures are ratios: equal wall time on
another machine gives about the same steps.

    python bench/arch_steps.py                       # R1, R7 (wide), R8 (deep); batch 64
    python bench/arch_steps.py --steps 1 --repeats 1 --batch-size 8   # smoke test
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace

import torch
from train_sample import bare_steps

from rdm.config import preset
from rdm.model import RetrievalUNet, count_parameters

ARCHS = {  # arm of bench/recipe.sh: (block_out_channels, layers_per_block)
    "R1 (32,64,64) x1": ((32, 64, 64), 1),
    "R7 (64,128,128) x1": ((64, 128, 128), 1),
    "R8 (32,64,64) x2": ((32, 64, 64), 2),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=4, help="timed steps per repetition")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--reference-steps", type=int, default=600, help="the reference arm's steps")
    p.add_argument("--context-dim", type=int, default=256, help="d of the database (clip-small)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    base = preset("small")
    cfgs = {}
    for name, (channels, layers) in ARCHS.items():
        model = replace(base.model, block_out_channels=channels, layers_per_block=layers,
                        in_channels=1, context_dim=args.context_dim)  # fmt: skip
        cfgs[name] = replace(base, model=model)
    g = torch.Generator().manual_seed(0)
    res = base.model.resolution
    x0 = torch.rand(args.batch_size, 1, res, res, generator=g) * 2 - 1
    ctx = torch.randn(args.batch_size, base.model.k, args.context_dim, generator=g)
    batch = (x0, torch.nn.functional.normalize(ctx, dim=-1))

    rates: dict[str, list[float]] = {name: [] for name in ARCHS}
    for _ in range(args.repeats):
        for name, cfg in cfgs.items():
            rates[name].append(bare_steps(cfg, batch, args.steps, bf16=False))
    ref = statistics.median(rates[next(iter(ARCHS))])
    print(f"batch {args.batch_size}, fp32, {args.threads} thread(s), {args.repeats} repetitions "
          f"of {args.steps} steps, medians")  # fmt: skip
    print("| UNet | parameters | images/s | step time vs R1 | steps at R1's wall time |")
    print("|---|---|---|---|---|")
    for name, cfg in cfgs.items():
        rate = statistics.median(rates[name])
        params = count_parameters(RetrievalUNet(cfg.model)) / 1e6
        steps = round(args.reference_steps * rate / ref)
        print(f"| {name} | {params:.2f}M | {rate:.1f} | {ref / rate:.2f}x | {steps} |")


if __name__ == "__main__":
    main()
