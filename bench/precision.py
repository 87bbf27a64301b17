"""bf16 autocast against fp32 for one training step of the demo UNet, side by side.

    python bench/precision.py [--threads 2] [--repeats 4]

Prints seconds per step (fwd + bwd + AdamW, batch 64, 32 px) for each precision and channel count,
the median of the repeats after one warm-up step, and the bf16 / fp32 ratio; and what
``--mixed-precision auto`` resolves to on this machine (rdm.train.resolve_precision).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rdm.demo import demo_train_config
from rdm.model import RetrievalUNet
from rdm.train import _cpu_flags, resolve_precision


def step_seconds(in_channels: int, precision: str, repeats: int) -> float:
    cfg = demo_train_config("small", 256, 10, 64, 0, in_channels=in_channels)
    torch.manual_seed(0)
    model = RetrievalUNet(cfg.model)
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(64, in_channels, 32, 32)
    c, t = torch.randn(64, 4, 256), torch.randint(0, 1000, (64,))
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = (model(x, t, c).float() - x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    flags = sorted(_cpu_flags() & {"avx512f", "avx512_bf16", "amx_bf16", "avx2"})
    auto = resolve_precision("auto", torch.device("cpu"))
    print(f"CPU flags {flags}; --mixed-precision auto -> {auto}; {args.threads} thread(s)")
    for ch in (3, 1):
        bf16 = step_seconds(ch, "bf16", args.repeats)
        fp32 = step_seconds(ch, "no", args.repeats)
        print(
            f"{ch} channel(s): bf16 {bf16:.2f} s/step, fp32 {fp32:.2f} s/step, "
            f"bf16/fp32 {bf16 / fp32:.2f}"
        )


if __name__ == "__main__":
    main()
