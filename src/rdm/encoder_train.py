"""Contrastive image–caption training of the small default CLIP (open_clip model + ``ClipLoss``).

The paper's φ is CLIP ViT-B/32; its weights cannot be downloaded here, so rdm ships a small CLIP
trained on the offline data: the Fashion-MNIST training file (never its test file) and both emoji
styles. The model is ``open_clip.create_model`` from a custom config and the loss is open_clip's
``ClipLoss``; the result is an ordinary open_clip local dir that :func:`rdm.encoders.load_encoder`
(and open_clip itself) loads.

Batches and the one-positive assumption. ``ClipLoss`` treats pair i as the only match of image i
and caption i, which is false when two items of a batch share a caption: Fashion-MNIST has 60k
images but only 10 captions. Captions shared by many images are *classes*; every other caption is
*unique* (an emoji name: one caption, two styles). A step draws

- C class captions and G images of each, laid out as G groups of C images (one per class),
- E unique captions and one image of each (a random style for an emoji),

encodes all G·C + E images and C + E captions once, and averages G ``ClipLoss`` terms, group g
scoring ``[class images of group g; unique images]`` against ``[class captions; unique captions]``.
Every term sees distinct captions, so its targets are right, and the G groups let a step learn
from G times more Fashion images than one-image-per-class batches for the price of the image
forward pass only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rdm.cpuinfo import cpuinfo_field
from rdm.data import BadImage, Source, open_source
from rdm.encoders import Encoder, load_encoder, normalize, resize_crop, save_local_dir
from rdm.errors import RdmError
from rdm.io import require_writable, write_json

ARCH = "rdm-clip-small"
RECORD_NAME = "train_config.json"
# open_clip's default (OpenAI) normalisation; the towers start with a LayerNorm, so exact
# statistics of our data would change little
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


class TrainDataError(RdmError):
    """Training data or settings that cannot make contrastive batches; names the source or flag."""


@dataclass
class ClipTrainConfig:
    out: Path = Path("clip-small")
    sources: tuple[str, ...] = ("fashion-mnist", "emoji-color", "emoji-mono")
    steps: int = 1500
    seed: int = 0
    batch_size: int = 128  # captions per contrastive batch: C class + E unique captions
    class_groups: int = 8  # G: images drawn per class caption and step
    class_min_images: int = 20  # a caption shared by at least this many images is a class
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    shift: int = 2  # random translation augmentation, pixels at model resolution
    autocast: bool = True  # bf16 autocast (CPUs with AMX/AVX-512-bf16, CUDA)
    device: str = "cpu"
    evaluate: bool = True  # Fashion-MNIST test-set retrieval precision after training
    # model (open_clip CLIP config); sized so that 1500 steps take ~10 min on 2 CPU cores (bf16)
    embed_dim: int = 256
    image_size: int = 32
    patch_size: int = 8
    vision_width: int = 192
    vision_layers: int = 4
    text_width: int = 128
    text_layers: int = 4
    context_length: int = 32

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise TrainDataError(
                f"--image-size {self.image_size} is not a multiple of --patch-size {self.patch_size}"
            )
        if self.vision_width % min(64, self.vision_width) or self.text_width % max(
            1, self.text_width // 64
        ):
            raise TrainDataError(
                f"--vision-width {self.vision_width} and --text-width {self.text_width} must split into "
                "64-channel attention heads (or be below 64: one head)"
            )
        if self.steps < 1 or self.batch_size < 2 or self.class_groups < 1:
            raise TrainDataError("--steps and --class-groups must be >= 1 and --batch-size >= 2")

    def model_cfg(self) -> dict:
        """The open_clip model config (``model_cfg`` of ``open_clip_config.json``)."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {
                "image_size": self.image_size,
                "layers": self.vision_layers,
                "width": self.vision_width,
                "head_width": min(64, self.vision_width),
                "patch_size": self.patch_size,
            },
            "text_cfg": {
                "context_length": self.context_length,
                "vocab_size": 49408,  # open_clip's SimpleTokenizer BPE vocabulary
                "width": self.text_width,
                "heads": max(1, self.text_width // 64),
                "layers": self.text_layers,
            },
        }

    def preprocess_cfg(self) -> dict:
        return {
            "size": self.image_size,
            "mean": list(MEAN),
            "std": list(STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        }


# --- data ---------------------------------------------------------------------------------------


@dataclass
class CaptionedImages:
    """Training images at model resolution with caption indices."""

    pixels: np.ndarray  # (N, 3, S, S) uint8, resized + center-cropped like the encoder does
    caption_ids: np.ndarray  # (N,) int64 into captions
    captions: list[str]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count


def load_captioned_images(specs: tuple[str, ...], preprocess_cfg: dict) -> CaptionedImages:
    """Every non-test item with a caption from each source, preprocessed to the model's size."""
    caption_index: dict[str, int] = {}
    pixels, caption_ids, skipped = [], [], {}
    for spec in specs:
        source = open_source(spec)
        ids = training_ids(source)
        images, captions = _source_pixels(source, ids, preprocess_cfg, skipped)
        pixels.append(images)
        caption_ids += [caption_index.setdefault(c, len(caption_index)) for c in captions]
    if not caption_ids:
        raise TrainDataError(f"the sources {', '.join(specs)} hold no captioned training images")
    return CaptionedImages(
        pixels=np.concatenate(pixels),
        caption_ids=np.asarray(caption_ids, dtype=np.int64),
        captions=list(caption_index),
        skipped=skipped,
    )


def training_ids(source: Source) -> np.ndarray:
    """All ids except the test split: the encoder never sees what it is evaluated on."""
    return np.setdiff1d(source.split_ids("all"), source.split_ids("test"))


def _source_pixels(
    source: Source, ids: np.ndarray, cfg: dict, skipped: dict[str, int]
) -> tuple[np.ndarray, list[str]]:
    """(n, 3, S, S) uint8 and n captions of the usable items among ``ids``."""
    import torch
    from tqdm import tqdm

    from rdm.data.fashion_mnist import FashionMNIST

    if isinstance(source, FashionMNIST):  # fast path: 60k greyscale arrays, no PIL round trip
        grey = source.pixels(ids)  # (n, 28, 28)
        arrays = [np.repeat(grey[..., None], 3, axis=-1)]
        captions = [source.CLASSES[label] for label in source.labels[ids]]
    else:
        arrays, captions = [], []
        for i in tqdm(ids, desc=f"load {source.spec}", unit="image", leave=False):
            caption = source.caption(int(i)).strip()
            if not caption:
                skipped["no caption"] = skipped.get("no caption", 0) + 1
                continue
            try:
                image = source.load(int(i))
            except BadImage:
                skipped["unreadable"] = skipped.get("unreadable", 0) + 1
                continue
            arrays.append(np.array(image)[None])  # writable copy for torch
            captions.append(caption)
    chunks = []
    for array in arrays:  # one (1, H, W, 3) array per image, or one for all of Fashion-MNIST
        for start in range(0, len(array), 4096):
            chunks.append(resize_crop(torch.from_numpy(array[start : start + 4096]), cfg).numpy())
    pixels = (
        np.concatenate(chunks) if chunks else np.zeros((0, 3, cfg["size"], cfg["size"]), np.uint8)
    )
    return pixels, captions


# --- batches ------------------------------------------------------------------------------------


@dataclass
class Batch:
    class_captions: np.ndarray  # (C,) caption ids
    class_images: np.ndarray  # (G, C) image rows, group g holds one image of each class caption
    unique_captions: np.ndarray  # (E,) caption ids
    unique_images: np.ndarray  # (E,) image rows


class BatchSampler:
    """Draws batches whose contrastive terms never hold two items with the same caption."""

    def __init__(self, data: CaptionedImages, cfg: ClipTrainConfig, rng: np.random.Generator):
        self.rng = rng
        order = np.argsort(data.caption_ids, kind="stable")
        bounds = np.searchsorted(data.caption_ids[order], np.arange(len(data.captions) + 1))
        self.members = [
            order[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]  # rows per caption
        counts = np.array([len(m) for m in self.members])
        self.classes = np.flatnonzero(counts >= cfg.class_min_images)
        self.uniques = np.flatnonzero((counts > 0) & (counts < cfg.class_min_images))
        self.n_classes = min(len(self.classes), cfg.batch_size // 2)
        self.n_unique = min(len(self.uniques), cfg.batch_size - self.n_classes)
        self.groups = cfg.class_groups if self.n_classes else 1
        if self.n_classes + self.n_unique < 2:
            raise TrainDataError(
                f"contrastive training needs at least 2 distinct captions, found {len(data.captions)}"
            )
        self._queue = np.zeros(0, dtype=np.int64)

    def sample(self) -> Batch:
        classes = self.rng.choice(self.classes, self.n_classes, replace=False)
        class_images = np.stack(
            [self.rng.choice(self.members[c], self.groups) for c in classes], axis=1
        ).reshape(self.groups, self.n_classes)
        uniques = self._next_uniques()
        unique_images = np.array(
            [self.rng.choice(self.members[c]) for c in uniques], dtype=np.int64
        )
        return Batch(classes, class_images, uniques, unique_images)

    def _next_uniques(self) -> np.ndarray:
        """Unique captions in shuffled epochs, so each is seen equally often.

        At an epoch boundary the batch is completed from the next epoch's order, skipping the
        captions it already holds (they stay in that epoch, drawn later).
        """
        head = self._queue[: self.n_unique]
        self._queue = self._queue[self.n_unique :]
        if len(head) < self.n_unique:
            fresh = self.rng.permutation(self.uniques)
            fill = fresh[~np.isin(fresh, head)][: self.n_unique - len(head)]
            self._queue = fresh[~np.isin(fresh, fill)]
            head = np.concatenate([head, fill])
        return head


# --- training -----------------------------------------------------------------------------------


def train_clip(cfg: ClipTrainConfig, command: str | None = None) -> Path:
    """Train a small CLIP on ``cfg.sources``; write an open_clip local dir to ``cfg.out``.

    The directory holds ``open_clip_config.json``, ``open_clip_model.safetensors`` (float16) and
    ``train_config.json`` (command, config, seed, time, machine, loss history, metrics).
    """
    import torch
    from open_clip.loss import ClipLoss
    from tqdm import tqdm

    started = time.time()
    # the output is written after training: check now that it can be (minutes, not hours, lost)
    require_writable(Path(cfg.out).parent, is_dir=True, what="folder of encoder directory")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    preprocess_cfg = cfg.preprocess_cfg()

    # Load every training image once, at model resolution.
    data = load_captioned_images(tuple(cfg.sources), preprocess_cfg)
    sampler = BatchSampler(data, cfg, rng)
    model_cfg = cfg.model_cfg()
    model = _create_model(model_cfg, cfg.device)
    tokens = _tokenize(data.captions)  # (n_captions, context_length) int64
    zero_unused_tokens(model, tokens)
    optimizer = _optimizer(model, cfg)
    loss_fn = ClipLoss()
    pixels = torch.from_numpy(data.pixels)

    history: list[tuple[int, float]] = []
    window: list[float] = []
    log_every = max(1, min(50, cfg.steps // 10))
    progress = tqdm(range(cfg.steps), desc="train clip", unit="step", dynamic_ncols=True)
    for step in progress:
        # Set the learning rate: linear warm-up, then cosine decay to zero.
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup_steps)

        # Encode the batch's images and captions once.
        batch = sampler.sample()
        rows = np.concatenate([batch.class_images.reshape(-1), batch.unique_images])
        captions = np.concatenate([batch.class_captions, batch.unique_captions])
        x = normalize(augment(pixels[rows], cfg.shift, rng), preprocess_cfg).to(cfg.device)
        with _autocast(cfg):
            image_features = model.encode_image(x, normalize=True).float()  # (G·C + E, d)
            text_features = model.encode_text(tokens[captions].to(cfg.device), normalize=True)
            text_features = text_features.float()  # (C + E, d)

        # One ClipLoss per group of distinct captions (module docstring), averaged.
        n_class = batch.class_images.size
        class_features = image_features[:n_class].view(*batch.class_images.shape, -1)
        unique_features = image_features[n_class:]
        scale = model.logit_scale.exp()
        loss = torch.stack(
            [
                loss_fn(torch.cat([class_features[g], unique_features]), text_features, scale)
                for g in range(sampler.groups)
            ]
        ).mean()

        # Update the weights; clamp the temperature as CLIP does (scale <= 100).
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

        window.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            history.append((step + 1, float(np.mean(window))))
            progress.set_postfix(loss=f"{history[-1][1]:.3f}", scale=f"{scale.item():.1f}")
            window = []
    train_seconds = time.time() - started

    # Save the open_clip local dir, then evaluate what was saved (float16 weights, real loader).
    record = {
        "command": command or shlex.join(["rdm", *sys.argv[1:]]),
        "config": _jsonable(dataclasses.asdict(cfg)),
        "seed": cfg.seed,
        "steps": cfg.steps,
        "train_seconds": round(train_seconds, 1),
        "machine": machine_info(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "data": {
            "images": len(data.caption_ids),
            "captions": len(data.captions),
            "class_captions": len(sampler.classes),
            "unique_captions": len(sampler.uniques),
            "skipped": data.skipped,
        },
        "loss_history": history,
    }
    out = save_local_dir(
        model, model_cfg, preprocess_cfg, cfg.out, arch=ARCH, extra_files={RECORD_NAME: record}
    )
    if cfg.evaluate:
        record["metrics"] = evaluate_encoder(load_encoder(str(out), device=cfg.device))
        write_json(out / RECORD_NAME, record, indent=2)
    return out


def cosine_lr(step: int, steps: int, base_lr: float, warmup: int) -> float:
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * base_lr * (1 + math.cos(math.pi * progress))


def augment(pixels, shift: int, rng: np.random.Generator):
    """uint8 (B, 3, S, S) -> float (B, 3, S, S) in [0, 1], each image translated by up to ``shift``.

    Edges are replicated, so Fashion-MNIST stays on black and emoji on white.
    """
    import torch
    import torch.nn.functional as F

    x = pixels.float() / 255.0
    if shift <= 0:
        return x
    size = x.shape[-1]
    padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")  # (B, 3, S+2s, S+2s)
    offsets = rng.integers(0, 2 * shift + 1, size=(len(x), 2))
    # a Python loop over B small slices costs well under a millisecond per batch
    return torch.stack(
        [padded[i, :, dy : dy + size, dx : dx + size] for i, (dy, dx) in enumerate(offsets)]
    )


def _tokenize(captions: list[str]):
    import open_clip

    return open_clip.get_tokenizer(ARCH)(captions)  # (n, context_length) int64


def _create_model(model_cfg: dict, device: str):
    """A random-initialised open_clip CLIP from ``model_cfg``, registered under ``ARCH``."""
    import open_clip

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{ARCH}.json"
        path.write_text(json.dumps(model_cfg))
        open_clip.add_model_config(path)  # the registry keeps the config after the file is gone
    return open_clip.create_model(ARCH, device=device).train()


def zero_unused_tokens(model, tokens) -> None:
    """Zero the embedding rows of BPE tokens no training caption uses.

    They never get a gradient, so AdamW leaves them at exactly zero (decoupled decay of 0 is 0):
    an unseen word then adds nothing instead of a random vector, and the 49408-row table, most of
    the text tower's weights, compresses to the rows that were trained.
    """
    import torch

    unused = torch.ones(model.token_embedding.num_embeddings, dtype=torch.bool)
    unused[tokens.unique()] = False
    with torch.no_grad():
        model.token_embedding.weight[unused] = 0.0


def _optimizer(model, cfg: ClipTrainConfig):
    """AdamW as in open_clip's trainer: no weight decay on gains, biases and the temperature."""
    import torch

    def no_decay(name: str, p) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if no_decay(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in params if not no_decay(n, p)], "weight_decay": cfg.weight_decay},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


def _autocast(cfg: ClipTrainConfig):
    import torch

    device_type = torch.device(cfg.device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.autocast)


# --- evaluation ---------------------------------------------------------------------------------


def fashion_test_embeddings(
    encoder: Encoder, spec: str = "fashion-mnist"
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings (10000, d) and labels (10000,) of the Fashion-MNIST *test* file."""
    from rdm.data.fashion_mnist import FashionMNIST

    source = open_source(spec)
    if not isinstance(source, FashionMNIST):
        raise TrainDataError(f"{spec!r} is not a Fashion-MNIST source")
    ids = source.split_ids("test")
    return encoder.encode_images(source.pixels(ids)), source.labels[ids]


def text_retrieval_precision(
    encoder: Encoder, k: int = 4, spec: str = "fashion-mnist", test_set=None
) -> float:
    """Each class name retrieves its top-k test images by cosine; precision@k over the 10 classes."""
    from rdm.data.fashion_mnist import CLASSES

    z, labels = test_set if test_set is not None else fashion_test_embeddings(encoder, spec)
    queries = encoder.encode_texts(list(CLASSES))  # (10, d)
    top = _top_k(queries @ z.T, k)  # (10, k)
    return float((labels[top] == np.arange(len(CLASSES))[:, None]).mean())


def image_retrieval_precision(z: np.ndarray, labels: np.ndarray, k: int = 4) -> float:
    """Fraction of each image's k nearest other images (cosine) that share its class."""
    hits = 0
    for start in range(0, len(z), 1024):
        scores = z[start : start + 1024] @ z.T  # (b, n)
        rows = np.arange(len(scores))
        scores[rows, start + rows] = -np.inf  # an image is not its own neighbour
        hits += (labels[_top_k(scores, k)] == labels[start : start + 1024, None]).sum()
    return float(hits / (len(z) * k))


def evaluate_encoder(encoder: Encoder, k: int = 4, spec: str = "fashion-mnist") -> dict:
    """Text→image and image→image precision@k on the Fashion-MNIST test file."""
    test_set = fashion_test_embeddings(encoder, spec)
    return {
        f"text_to_image_precision@{k}": text_retrieval_precision(encoder, k, spec, test_set),
        f"image_to_image_precision@{k}": image_retrieval_precision(*test_set, k=k),
        "test_images": len(test_set[1]),
    }


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of each row, best first."""
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


# --- records ------------------------------------------------------------------------------------


def machine_info() -> dict:
    import open_clip
    import torch

    cpu = cpuinfo_field("model name") or platform.processor()
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
    }


def _jsonable(d: dict) -> dict:
    return {
        k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
        for k, v in d.items()
    }
