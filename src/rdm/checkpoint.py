"""Checkpoints and run directories, without pickle.

A checkpoint is a directory ``RUN/checkpoints/step-XXXXXXX/``::

    model.safetensors       the trained network (RetrievalUNet state dict, fp32)
    ema.safetensors         its exponential moving average
    optimizer.safetensors   every tensor of the optimizer state ("state.<param>.<name>")
    optimizer.json          the rest: param_groups (lr, betas, ...) and non-tensor state
    rng.safetensors         torch CPU (and CUDA) generator states as uint8 tensors
    rng.json                numpy and python RNG states
    state.json              step, data-order position, last loss (written last)
    config.json             the RunConfig

It is written into ``.tmp-step-XXXXXXX`` and renamed into place only when complete, so an
interrupted save leaves the previous checkpoints untouched; only the newest ``keep_last`` are kept.

A finished run also holds ``model.safetensors``, ``ema.safetensors`` and ``config.json`` at its
top level; :func:`load_run` loads those (or the newest checkpoint of an unfinished run).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rdm.config import RunConfig
from rdm.errors import RdmError

FORMAT = "rdm-checkpoint/1"
_STEP_DIR = re.compile(r"^step-(\d{7,})$")


class CheckpointError(RdmError):
    """A run directory or checkpoint that cannot be read; the message names the path."""


# --- weights ------------------------------------------------------------------------------------


def save_weights(module: nn.Module, path: str | Path) -> None:
    """State dict -> safetensors, atomically."""
    from safetensors.torch import save_file

    state = _state_dict(module)
    _atomic(Path(path), lambda tmp: save_file(state, str(tmp)))


def load_weights(module: nn.Module, path: str | Path) -> None:
    """Load a safetensors state dict into ``module`` (strict: names and shapes must match)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    state = load_file(str(path))
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path} does not fit this model ({str(exc).splitlines()[0]}); "
            "was it saved with another config.json?"
        ) from None


def load_run(run_dir: str | Path, weights: str = "ema", device: str | torch.device = "cpu"):
    """(model, config) of a run directory, ready for sampling (eval mode, no grad).

    ``weights`` is "ema" (default, what the paper samples from) or "model". A finished run's
    top-level weights are used; an unfinished run falls back to its newest checkpoint.
    """
    from rdm.model import RetrievalUNet

    if weights not in ("ema", "model"):
        raise CheckpointError(f"weights={weights!r}: use 'ema' or 'model'")
    run_dir = Path(run_dir)
    cfg = RunConfig.from_json(run_dir / "config.json")
    path = run_dir / f"{weights}.safetensors"
    if not path.is_file():
        latest = latest_checkpoint(run_dir)
        if latest is None:
            raise CheckpointError(
                f"{run_dir} has neither {path.name} nor a checkpoint; train it first"
            )
        path = latest / f"{weights}.safetensors"
    model = RetrievalUNet(cfg.model)
    load_weights(model, path)
    return model.to(device).eval().requires_grad_(False), cfg


# --- optimizer and RNG state --------------------------------------------------------------------


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able values."""
    sd = optimizer.state_dict()
    tensors, plain_state = {}, {}
    for pid, entries in sd["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{name}"] = value.detach().contiguous().cpu()
            else:
                plain_state.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "state": plain_state}


def _optimizer_from_files(tensors: dict, plain: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, entries in plain["state"].items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": plain["param_groups"]}


def _rng_to_files() -> tuple[dict, dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    plain = {
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(mt), gauss_next],
    }
    return tensors, plain


def _rng_from_files(tensors: dict, plain: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, mt, gauss_next = plain["python"]
    random.setstate((version, tuple(mt), gauss_next))


# --- checkpoints --------------------------------------------------------------------------------


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:07d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary and foreign directories ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name)[1]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    config: RunConfig,
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep_last``."""
    from safetensors.torch import save_file

    final = checkpoint_dir(run_dir, step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):  # left by an interrupted save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{final.name}"
    tmp.mkdir()

    save_file(_state_dict(model), str(tmp / "model.safetensors"))
    save_file(_state_dict(ema), str(tmp / "ema.safetensors"))
    opt_tensors, opt_plain = _optimizer_to_files(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    _write_json(tmp / "optimizer.json", opt_plain)
    rng_tensors, rng_plain = _rng_to_files()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    _write_json(tmp / "rng.json", rng_plain)
    config.to_json(tmp / "config.json")
    _write_json(tmp / "state.json", {"format": FORMAT, "step": step, **state})  # last: complete

    if final.exists():  # re-saving a step (after a resume): swap, never leave a gap
        old = root / f".old-{final.name}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: str | Path, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer
) -> dict:
    """Restore weights, optimizer and RNG states from a checkpoint; returns its state.json."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        if state.get("format") != FORMAT:
            raise CheckpointError(f"{path} has format {state.get('format')!r}, expected {FORMAT}")
        load_weights(model, path / "model.safetensors")
        load_weights(ema, path / "ema.safetensors")
        opt = _optimizer_from_files(
            load_file(str(path / "optimizer.safetensors")),
            json.loads((path / "optimizer.json").read_text()),
        )
        optimizer.load_state_dict(opt)
        _rng_from_files(
            load_file(str(path / "rng.safetensors")), json.loads((path / "rng.json").read_text())
        )
    except (OSError, json.JSONDecodeError, KeyError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is damaged ({exc}); delete it to resume from the one before"
        ) from None
    return state


def _state_dict(module: nn.Module) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def _write_json(path: Path, obj: dict) -> None:
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1) + "\n"))


def _atomic(path: Path, write) -> None:
    """Call ``write(tmp)`` then rename ``tmp`` to ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
