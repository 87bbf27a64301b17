"""A small domain classifier whose penultimate features give the domain FD, and whose predictions
measure conditioning faithfulness.

The network reads grey images in the model view (32 x 32 for the shipped one: Fashion-MNIST
centre-cropped and bicubic-resized exactly as the diffusion model was trained on it). It is
trained once by ``rdm eval train-classifier`` on the ``db`` split, so that neither the training
split X nor the test split the metrics use were seen by it, and shipped in
``rdm/assets/fm-classifier/``: ``model.safetensors`` + ``config.json`` (architecture, classes,
training record, test accuracy, weights checksum).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rdm.errors import RdmError

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "assets" / "fm-classifier"
FORMAT = "rdm-classifier/1"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class ClassifierConfig:
    classes: list[str]
    resolution: int = 32
    channels: tuple[int, ...] = (16, 32, 64)  # conv widths; each stage halves the side
    feature_dim: int = 128  # the penultimate layer: the features FD is computed on
    mean: float = 0.29  # grey input normalisation, (x / 255 - mean) / std
    std: float = 0.35

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)
        if self.resolution % 2 ** len(self.channels):
            raise RdmError(
                f"classifier resolution {self.resolution} must be divisible by "
                f"2^{len(self.channels)} (one halving per stage)"
            )


class DomainCNN(nn.Module):
    """[conv3x3-BN-ReLU x2, max-pool] per stage -> linear (features) -> linear (class logits)."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for c in cfg.channels:
            for _ in range(2):
                layers += [
                    nn.Conv2d(c_in, c, 3, padding=1, bias=False),
                    nn.BatchNorm2d(c),
                    nn.ReLU(),
                ]
                c_in = c
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        side = cfg.resolution // 2 ** len(cfg.channels)
        self.features = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(c_in * side * side, cfg.feature_dim), nn.ReLU()
        )
        self.head = nn.Linear(cfg.feature_dim, len(cfg.classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, R, R) normalised grey -> features (B, feature_dim), logits (B, classes)."""
        f = self.features(self.body(x))
        return f, self.head(f)


def normalise(grey: np.ndarray, cfg: ClassifierConfig) -> torch.Tensor:
    """float32 grey (B, R, R) in [0, 255] -> (B, 1, R, R) network input."""
    return ((torch.from_numpy(np.ascontiguousarray(grey)) / 255.0 - cfg.mean) / cfg.std)[:, None]


# --- saving and loading ----------------------------------------------------------------------------


def save(model: DomainCNN, cfg: ClassifierConfig, record: dict, out: Path) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``out`` (a fresh directory, renamed in)."""
    from safetensors.torch import save_file

    from rdm.io import replace_dir, sha256_file, write_json

    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp / WEIGHTS_NAME)
    meta = {
        "format": FORMAT,
        "config": asdict(cfg),
        "weights_sha256": sha256_file(tmp / WEIGHTS_NAME),
        **record,
    }
    write_json(tmp / CONFIG_NAME, meta)
    return replace_dir(tmp, out)


def load(path: str | Path | None = None) -> tuple[DomainCNN, ClassifierConfig, dict]:
    """Load a classifier directory (default: the shipped one); checks format and checksum."""
    from safetensors.torch import load_file

    from rdm.io import sha256_file

    root = Path(path) if path else SHIPPED_DIR
    cfg_path, weights = root / CONFIG_NAME, root / WEIGHTS_NAME
    if not cfg_path.is_file() or not weights.is_file():
        raise RdmError(
            f"{root} is not a classifier directory (needs {CONFIG_NAME} and {WEIGHTS_NAME}); "
            "train one with 'rdm eval train-classifier --out DIR'"
        )
    meta = json.loads(cfg_path.read_text())
    if meta.get("format") != FORMAT:
        raise RdmError(f"{cfg_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if sha256_file(weights) != meta.get("weights_sha256"):
        raise RdmError(
            f"{weights} does not match the checksum in {cfg_path}: retrain or restore it"
        )
    cfg = ClassifierConfig(**meta["config"])
    model = DomainCNN(cfg)
    model.load_state_dict(load_file(weights))
    return model.eval(), cfg, meta


# --- training ---------------------------------------------------------------------------------------


@dataclass
class TrainSettings:
    epochs: int = 6
    batch_size: int = 128
    lr: float = 3e-3  # peak of a one-cycle schedule (AdamW)
    weight_decay: float = 5e-4
    shift: int = 2  # random translation of up to this many pixels (zero padding)
    seed: int = 0
    extra: dict = field(default_factory=dict)


def train(
    images: np.ndarray,
    labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    cfg: ClassifierConfig,
    settings: TrainSettings,
    progress: bool = True,
) -> tuple[DomainCNN, dict]:
    """Train on grey float32 (N, R, R) images; returns the model and its training record."""
    from tqdm.auto import tqdm

    torch.manual_seed(settings.seed)
    model = DomainCNN(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = -(-len(images) // settings.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=settings.lr, total_steps=settings.epochs * steps_per_epoch
    )
    x_all, y_all = normalise(images, cfg), torch.from_numpy(labels.astype(np.int64))
    gen = torch.Generator().manual_seed(settings.seed)
    history, start = [], time.time()
    for epoch in range(settings.epochs):
        # One epoch over a fresh permutation, with random shifts and horizontal flips.
        model.train()
        order = torch.randperm(len(x_all), generator=gen)
        losses = []
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}", disable=not progress)
        for s in bar:
            idx = order[s * settings.batch_size : (s + 1) * settings.batch_size]
            x = _augment(x_all[idx], settings.shift, -cfg.mean / cfg.std, gen)
            loss = nn.functional.cross_entropy(model(x)[1], y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        acc = accuracy(model, test_images, test_labels, cfg)
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "test_accuracy": acc})
    record = {
        "training": {
            **asdict(settings),
            "history": history,
            "seconds": round(time.time() - start, 1),
        },
        "test_accuracy": history[-1]["test_accuracy"] if history else None,
    }
    return model.eval(), record


def _augment(x: torch.Tensor, shift: int, fill: float, gen: torch.Generator) -> torch.Tensor:
    """Per-image random translation by up to ``shift`` pixels (background fill) and h-flip."""
    b, _, h, w = x.shape
    if shift:
        pad = nn.functional.pad(x[:, 0], (shift,) * 4, value=fill)  # (B, h + 2s, w + 2s)
        dy, dx = torch.randint(0, 2 * shift + 1, (2, b, 1), generator=gen)
        rows, cols = dy + torch.arange(h), dx + torch.arange(w)  # (B, h), (B, w)
        x = pad[torch.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]][:, None]
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


@torch.no_grad()
def predict(model: DomainCNN, grey: np.ndarray, cfg: ClassifierConfig, batch: int = 512):
    """Grey float32 (N, R, R) -> features float32 (N, feature_dim), predicted class ids (N,)."""
    feats, preds = [], []
    for s in range(0, len(grey), batch):
        f, logits = model(normalise(grey[s : s + batch], cfg))
        feats.append(f.numpy())
        preds.append(logits.argmax(1).numpy())
    if not feats:
        return np.zeros((0, cfg.feature_dim), np.float32), np.zeros(0, np.int64)
    return np.concatenate(feats), np.concatenate(preds)


def accuracy(
    model: DomainCNN, grey: np.ndarray, labels: np.ndarray, cfg: ClassifierConfig
) -> float:
    model.eval()
    return float((predict(model, grey, cfg)[1] == labels).mean())


def train_on_source(
    spec: str,
    *,
    train_split: str = "db",
    test_split: str = "test",
    resolution: int = 32,
    settings: TrainSettings | None = None,
    progress: bool = True,
) -> tuple[DomainCNN, ClassifierConfig, dict]:
    """Train on a captioned source (captions are the classes), images in the model view."""
    from rdm.data import open_source
    from rdm.evaluation.images import View, load_view, to_grey

    settings = settings or TrainSettings()
    source = open_source(spec)
    view = View(resolution, 1)
    data = {}
    for split in (train_split, test_split):
        ids = source.split_ids(split)
        if len(ids) == 0:
            raise RdmError(f"{spec} has no items in split {split!r}: choose another split")
        captions = [source.caption(int(i)) for i in ids]
        data[split] = (to_grey(load_view(source, ids, view, f"{split} images", progress)), captions)
    classes = list(getattr(source, "CLASSES", None) or sorted(set(data[train_split][1])))
    index = {c: i for i, c in enumerate(classes)}
    if "" in index or len(classes) < 2:
        raise RdmError(f"{spec}: a classifier needs captions naming at least two classes")
    unknown = sorted(set(data[test_split][1]) - set(index))
    if unknown:
        raise RdmError(f"{spec} split {test_split} has classes not in {train_split}: {unknown[:5]}")
    labels = {s: np.array([index[c] for c in data[s][1]]) for s in data}
    grey = data[train_split][0]
    cfg = ClassifierConfig(
        classes=classes,
        resolution=resolution,
        mean=float(grey.mean() / 255),
        std=float(grey.std() / 255),
    )
    model, record = train(
        grey, labels[train_split], data[test_split][0], labels[test_split], cfg, settings, progress
    )
    record["data"] = {
        "source": source.spec,
        "train_split": train_split,
        "train_count": len(grey),
        "test_split": test_split,
        "test_count": len(labels[test_split]),
        "view": view.identity(),
    }
    return model, cfg, record
