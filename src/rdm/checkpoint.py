"""Checkpoints and run directories, without pickle.

A checkpoint is a directory ``RUN/checkpoints/step-XXXXXXX/``::

    model.safetensors       the trained network (RetrievalUNet state dict, fp32)
    ema.safetensors         its exponential moving average
    optimizer.safetensors   every tensor of the optimizer state ("state.<param>.<name>")
    optimizer.json          the rest: param_groups (lr, betas, ...) and non-tensor state
    rng.safetensors         torch CPU (and CUDA) generator states as uint8 tensors
    rng.json                numpy and python RNG states
    state.json              step, data-order position, last loss, the sha256 of each
                            .safetensors file (written last)
    config.json             the RunConfig

It is written into ``.tmp-step-XXXXXXX`` and renamed into place only when complete, so an
interrupted save leaves the previous checkpoints untouched; only the newest ``keep_last`` are kept.

A finished run also holds ``model.safetensors``, ``ema.safetensors`` and ``config.json`` at its
top level; :func:`load_run` loads those (or the newest checkpoint of an unfinished run).

Weights are checked before they are loaded: :func:`save_weights` records each file's sha256 in
the run's ``config.json`` (``weights_sha256``), a checkpoint records them in its ``state.json``.
A file with flipped or missing bytes would otherwise load as valid weights and sample noise.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rdm.config import RunConfig
from rdm.ema import extra_names
from rdm.errors import RdmError
from rdm.io import atomic_write, replace_dir, sha256_file, write_json

FORMAT = "rdm-checkpoint/1"
_STEP_DIR = re.compile(r"^step-(\d{7,})$")
_RESTORE = "restore it from a copy, or retrain the run"


class CheckpointError(RdmError):
    """A run directory or checkpoint that cannot be read; the message names the path."""


# --- weights ------------------------------------------------------------------------------------


def save_weights(module: nn.Module, path: str | Path) -> str:
    """State dict -> safetensors, atomically; returns the file's sha256.

    When ``path``'s directory holds a run's ``config.json``, the checksum is recorded there too
    (``weights_sha256``), which is what :func:`load_run` verifies the file against."""
    from safetensors.torch import save_file

    path = Path(path)
    state = _state_dict(module)
    atomic_write(path, lambda tmp: save_file(state, str(tmp)))
    digest = sha256_file(path)
    config_path = path.parent / "config.json"
    if config_path.is_file():
        cfg = RunConfig.from_json(config_path)
        cfg.weights_sha256 = {**cfg.weights_sha256, path.name: digest}
        cfg.to_json(config_path)
    return digest


def load_weights(
    module: nn.Module, path: str | Path, sha256: str | None = None, fix: str = _RESTORE
) -> None:
    """Load a safetensors state dict into ``module`` (strict: names and shapes must match).

    ``sha256``: the checksum recorded when the file was written; a file that differs is refused
    (flipped or missing bytes would load as valid weights and sample noise). ``fix`` ends the
    message of a damaged file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    if sha256 is not None and sha256_file(path) != sha256:
        raise CheckpointError(
            f"weights file {path} does not match the sha256 recorded when it was saved "
            f"(damaged, truncated or modified); {fix}"
        )
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"weights file {path} cannot be read ({exc}); {fix}") from None
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path} does not fit this model ({str(exc).splitlines()[0]}); "
            "was it saved with another config.json?"
        ) from None


def state_dict_mismatch(
    expected: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    unexpected_as: str = "unexpected",
    shapes_as: tuple[str, str] = ("in the file", "expected"),
    examples: int = 1,
) -> tuple[list[str], str]:
    """How ``state`` differs from a module's ``expected`` state dict, in one short line:
    ``"2 missing (e.g. a), 1 unexpected (e.g. b), 3 of another shape (e.g. c: (4,) in the file,
    (8,) expected)"``, or ``""`` where names and shapes all match. torch's own message lists every
    key: thousands of lines for a large UNet.

    Returns the unexpected keys too (in ``state``'s order), for callers that recognise a foreign
    layout by one of them. ``unexpected_as`` and ``shapes_as`` word the caller's two sides;
    ``examples`` keys are named per kind."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:examples])})")
    if unexpected:
        parts.append(f"{len(unexpected)} {unexpected_as} (e.g. {', '.join(unexpected[:examples])})")
    if reshaped:
        shapes = "; ".join(
            f"{k}: {tuple(state[k].shape)} {shapes_as[0]}, {tuple(expected[k].shape)} {shapes_as[1]}"
            for k in reshaped[:examples]
        )
        parts.append(f"{len(reshaped)} of another shape (e.g. {shapes})")
    return unexpected, ", ".join(parts)


def load_run(run_dir: str | Path, weights: str = "ema", device: str | torch.device = "cpu"):
    """(model, config) of a run directory, ready for sampling (eval mode, no grad).

    ``weights`` is "ema" (default, what the paper samples from), "model", or one of the run's
    further EMAs (``train.ema_extra``, e.g. "ema-power-0.75"; rdm.ema). A finished run's
    top-level weights are used; an unfinished run falls back to its newest checkpoint. The
    weights are checked against the sha256 that ``config.json`` (or the checkpoint's
    ``state.json``) recorded; a run saved before rdm recorded checksums loads with a note.
    """
    from rdm.model import RetrievalUNet, resolve_vae_path

    run_dir = Path(run_dir)
    cfg = RunConfig.from_json(run_dir / "config.json")
    choices = ["ema", "model", *extra_names(cfg.train.ema_extra)]
    if weights not in choices:
        raise CheckpointError(
            f"weights={weights!r}: {run_dir} has {', '.join(repr(c) for c in choices)}"
        )
    # a first stage kept inside the run (an imported official run's) is found wherever it moves
    cfg.model.vae_path = resolve_vae_path(cfg.model.vae_path, run_dir)
    path = run_dir / f"{weights}.safetensors"
    recorded = cfg.weights_sha256
    if not path.is_file():
        latest = latest_checkpoint(run_dir)
        if latest is None:
            raise CheckpointError(
                f"{run_dir} has neither {path.name} nor a checkpoint; train it first"
            )
        path = latest / f"{weights}.safetensors"
        recorded = _read_state(latest).get("weights_sha256", {})
    sha256 = recorded.get(path.name)
    if sha256 is None:
        _note(
            f"note: no checksum is recorded for {path} (saved by an older rdm); "
            "loading it unverified"
        )
    model = RetrievalUNet(cfg.model)
    load_weights(model, path, sha256, fix=_fix_for(path))
    return model.to(device).eval().requires_grad_(False), cfg


def _fix_for(path: Path) -> str:
    """How to recover from a damaged weights file at ``path``."""
    if Path(__file__).resolve().parent / "assets" in path.resolve().parents:
        return (
            "the model shipped with rdm is damaged: reinstall rdm (in a git checkout, restore "
            "src/rdm/assets from the repository)"
        )
    return _RESTORE


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
    extra_emas: dict[str, nn.Module] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep_last``.

    ``extra_emas``: the run's further EMAs by weights name (``ema-power-0.75``; rdm.ema).

    ``state.json`` is written last and records the sha256 of every tensor file."""
    from safetensors.torch import save_file

    final = checkpoint_dir(run_dir, step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):  # left by an interrupted save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{final.name}"
    tmp.mkdir()

    opt_tensors, opt_plain = _optimizer_to_files(optimizer)
    rng_tensors, rng_plain = _rng_to_files()
    tensors = {
        "model.safetensors": _state_dict(model),
        "ema.safetensors": _state_dict(ema),
        "optimizer.safetensors": opt_tensors,
        "rng.safetensors": rng_tensors,
        **{f"{name}.safetensors": _state_dict(m) for name, m in (extra_emas or {}).items()},
    }
    for name, value in tensors.items():
        save_file(value, str(tmp / name))
    write_json(tmp / "optimizer.json", opt_plain)
    write_json(tmp / "rng.json", rng_plain)
    config.to_json(tmp / "config.json")
    checksums = {name: sha256_file(tmp / name) for name in tensors}
    state = {"format": FORMAT, "step": step, **state, "weights_sha256": checksums}
    write_json(tmp / "state.json", state)  # last: the checkpoint is complete

    replace_dir(tmp, final)  # re-saving a step (after a resume) swaps, never leaves a gap
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra_emas: dict[str, nn.Module] | None = None,
) -> dict:
    """Restore weights, optimizer and RNG states from a checkpoint; returns its state.json.

    Every tensor file is checked against the sha256 in ``state.json`` (a checkpoint saved before
    rdm recorded them loads with a note)."""
    path = Path(path)
    fix = "delete it to resume from the one before"
    state = _read_state(path)
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {state.get('format')!r}, expected {FORMAT}")
    recorded = state.get("weights_sha256")
    if recorded is None:
        _note(f"note: checkpoint {path} records no checksums (saved by an older rdm)")
        recorded = {}
    load_weights(model, path / "model.safetensors", recorded.get("model.safetensors"), fix)
    load_weights(ema, path / "ema.safetensors", recorded.get("ema.safetensors"), fix)
    for name, extra in (extra_emas or {}).items():
        file = f"{name}.safetensors"
        load_weights(extra, path / file, recorded.get(file), fix)
    try:
        opt = _optimizer_from_files(
            _load_tensors(path / "optimizer.safetensors", recorded),
            json.loads((path / "optimizer.json").read_text()),
        )
        optimizer.load_state_dict(opt)
        _rng_from_files(
            _load_tensors(path / "rng.safetensors", recorded),
            json.loads((path / "rng.json").read_text()),
        )
    except (OSError, json.JSONDecodeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is damaged ({exc}); {fix}") from None
    return state


def _read_state(checkpoint: Path) -> dict:
    try:
        return json.loads((checkpoint / "state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint {checkpoint} is damaged ({exc}); delete it to use the one before"
        ) from None


def _load_tensors(path: Path, recorded: dict) -> dict:
    """A checkpoint's tensor file, checked against its recorded sha256 when there is one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    sha256 = recorded.get(path.name)
    if sha256 is not None and (not path.is_file() or sha256_file(path) != sha256):
        raise ValueError(f"{path.name} does not match the sha256 in state.json")
    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise ValueError(f"{path.name} cannot be read: {exc}") from None


def _state_dict(module: nn.Module) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def _note(message: str) -> None:
    print(message, file=sys.stderr)
