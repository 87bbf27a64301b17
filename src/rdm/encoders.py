"""Frozen encoders φ behind one interface: images / texts -> float32 (B, d), unit norm.

Every encoder carries an *identity* (architecture, weights checksum, d, preprocessing) that is
written into every artifact built with it; :func:`require_same_identity` is the one guard that
refuses to pair artifacts of different identities.

Specs understood by :func:`load_encoder` (open_clip underneath):

- ``default``                 the small CLIP shipped in ``rdm/assets/clip-small/``
- ``DIR``                     an open_clip local dir: ``open_clip_config.json`` (``model_cfg`` +
                              ``preprocess_cfg``) and ``open_clip_model.safetensors``
- ``ARCH:/path/to/file``      an open_clip architecture (``ViT-B-32``) and a local checkpoint
                              (``.safetensors``; ``.pt``/``.bin``/``.pth`` loaded with ``weights_only``)
- ``ARCH:TAG``                an open_clip pretrained tag (``ViT-B-32-quickgelu:openai``); downloads, so
                              it only works offline when the weights are already in the Hugging Face cache
- ``SPEC#preprocess=release`` any of the above with the CompVis RDM release's query preprocessing
                              (:func:`release_resize`) instead of open_clip's

OpenAI's CLIP weights were trained with QuickGELU; open_clip's plain ``ViT-B-32`` uses GELU and,
given those weights, silently computes different features. OpenAI weights are recognised (the
``openai`` tag, or a file converted once by :func:`convert_openai_checkpoint` from OpenAI's
TorchScript ``.pt``, which ``torch.load(weights_only=True)`` refuses) and refused under an
architecture without QuickGELU, naming the ``-quickgelu`` one. Recognised OpenAI weights are
recorded as ``"weights": "openai"`` in the identity, which then pairs by name, not by the
checksum of one copy (:func:`identity_fingerprint`): the release's databases record OpenAI's
ViT-B/32 (:func:`release_identity`) without the weights at hand.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from rdm.errors import IdentityMismatch, RdmError
from rdm.io import OutputError, replace_dir, require_writable, write_json

if TYPE_CHECKING:
    import torch

# keys of an identity that describe where it was loaded from, not what it computes
_LOCATION_KEYS = ("spec",)

DEFAULT_DIR = Path(__file__).parent / "assets" / "clip-small"
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# rows per forward pass; bounds memory, not results (each row is encoded independently)
BATCH_SIZE = 256
# image towers at least this big run under bf16 autocast where bf16 is native (AMX / AVX-512-bf16
# CPUs, CUDA): 3.6x faster for the default encoder, 1.45x for ViT-B-32, cosine >= 0.9999 to fp32;
# smaller (test) models stay in exact, batch-independent fp32
AUTOCAST_MIN_VISION_PARAMS = 1_000_000

#: OpenAI CLIP's normalisation, also the CompVis RDM release's (``ClipImageRetriever``)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
#: weights recognised by name: their identities pair by this name (see identity_fingerprint)
NAMED_WEIGHTS = ("openai",)
#: ``SPEC#preprocess=release``: the CompVis RDM release's query preprocessing
PREPROCESS_OPTIONS = ("release",)
RELEASE_RESIZE = (
    "squash to image_size, bicubic align_corners=True, no antialias, no crop (CompVis RDM release)"
)
#: the release's encoder: OpenAI CLIP ViT-B/32 (QuickGELU) with the release's preprocessing
RELEASE_ARCH = "ViT-B-32-quickgelu"
RELEASE_SPEC = f"{RELEASE_ARCH}:openai#preprocess=release"
#: safetensors metadata written by convert_openai_checkpoint
META_WEIGHTS, META_TENSORS = "rdm_weights", "rdm_tensors_sha256"


class EncoderSpecError(RdmError, ValueError):
    """An encoder spec that cannot be loaded; the message names the spec and the fix."""


class Encoder(ABC):
    """A frozen image/text encoder. Outputs are float32 numpy arrays of shape (B, d), unit L2 norm."""

    #: {"arch", "weights_sha256", "dim", "image_size", "mean", "std", "resize", "spec"}
    identity: dict

    @property
    def dim(self) -> int:
        return int(self.identity["dim"])

    @abstractmethod
    def encode_images(self, images: Sequence[Image.Image] | np.ndarray) -> np.ndarray:
        """RGB PIL images or uint8 array (B, H, W, 3) -> float32 (B, d), unit norm."""

    @abstractmethod
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Strings -> float32 (B, d), unit norm."""


def identity_fingerprint(identity: dict) -> str:
    """Short stable hash of what an encoder computes (ignores where it was loaded from).

    Named weights (``"weights": "openai"``) are identified by that name: the checksum of the
    copy that was loaded is kept for the record but not hashed, so an identity written without
    the weights at hand (:func:`release_identity`) pairs with every copy of them."""
    skip = _LOCATION_KEYS + (
        ("weights_sha256",) if identity.get("weights") in NAMED_WEIGHTS else ()
    )
    core = {k: v for k, v in identity.items() if k not in skip}
    blob = json.dumps(core, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def describe_identity(identity: dict) -> str:
    weights = identity.get("weights")
    weights = (
        f"{weights} weights"
        if weights
        else f"weights {str(identity.get('weights_sha256', '?'))[:12]}"
    )
    return (
        f"{identity.get('arch', '?')} d={identity.get('dim', '?')} {weights} "
        f"({identity.get('spec', 'unknown location')})"
    )


def release_identity(dim: int = 512) -> dict:
    """The encoder identity of the CompVis RDM release's databases and models, without weights.

    OpenAI CLIP ViT-B/32 (open_clip ``ViT-B-32-quickgelu`` with the ``openai`` weights), the
    release's query preprocessing (``#preprocess=release``), d = ``dim``: 512 for the release,
    the test fixture's tiny d for the fixture. An encoder loaded from OpenAI's weights with that
    spec has the same fingerprint (see :func:`identity_fingerprint`), so queries pair with it."""
    return {
        "arch": RELEASE_ARCH,
        "weights": "openai",
        "weights_sha256": None,  # not known without the weights; named weights pair by name
        "dim": int(dim),
        "image_size": 224,
        "mean": [float(v) for v in OPENAI_MEAN],
        "std": [float(v) for v in OPENAI_STD],
        "resize": RELEASE_RESIZE,
        "spec": RELEASE_SPEC,
    }


def require_same_identity(a: dict, a_name: str, b: dict, b_name: str) -> None:
    """Refuse to pair two artifacts whose encoder identities differ, naming both."""
    if identity_fingerprint(a) != identity_fingerprint(b):
        raise IdentityMismatch(
            f"{a_name} was made with encoder {describe_identity(a)}, but {b_name} with "
            f"{describe_identity(b)}; they cannot be combined. Rebuild one of them with the "
            "other's encoder."
        )


# --- spec parsing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderSpec:
    """A parsed spec: exactly one of ``local_dir`` / ``checkpoint`` / ``tag`` is set."""

    spec: str  # as written into identities; loads the encoder again
    arch: str | None = None  # open_clip architecture name (None for a local dir)
    local_dir: Path | None = None
    checkpoint: Path | None = None
    tag: str | None = None
    preprocess: str | None = None  # "release" (``#preprocess=release``) or open_clip's own
    weights: str | None = None  # named weights ("openai") claimed by the tag or the file


def parse_spec(spec: str) -> EncoderSpec:
    """Resolve a spec string (see module docstring) without loading any weights.

    Refuses OpenAI weights (the ``openai`` tag, an rdm-converted OpenAI file) under an
    architecture without QuickGELU, and OpenAI's TorchScript files (convert them once)."""
    base, sep, option = spec.rpartition("#")
    if not sep or not option.startswith("preprocess="):
        return _check_quick_gelu(_parse_location(spec))
    preprocess = option.removeprefix("preprocess=")
    if preprocess not in PREPROCESS_OPTIONS:
        raise EncoderSpecError(
            f"unknown preprocessing {preprocess!r} in encoder spec {spec!r}; valid: "
            f"{', '.join(f'#preprocess={o}' for o in PREPROCESS_OPTIONS)} (or none: open_clip's)"
        )
    parsed = _check_quick_gelu(_parse_location(base))
    return replace(parsed, spec=f"{parsed.spec}#preprocess={preprocess}", preprocess=preprocess)


def _parse_location(spec: str) -> EncoderSpec:
    """Where the weights are: 'default', a local dir, ARCH:TAG or ARCH:/path/to/checkpoint."""
    if spec == "default":
        if not (DEFAULT_DIR / CONFIG_NAME).is_file():
            raise EncoderSpecError(
                f"the default encoder is missing from {DEFAULT_DIR}: reinstall rdm, train one with "
                "'rdm encoder train --out DIR' and pass DIR, or pass ARCH:/path/to/checkpoint"
            )
        return EncoderSpec(spec="default", local_dir=DEFAULT_DIR)
    path = Path(spec.removeprefix("local-dir:")).expanduser()
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise EncoderSpecError(
                f"encoder directory {path} has no {CONFIG_NAME}: give an open_clip local dir "
                f"({CONFIG_NAME} + {WEIGHTS_NAME}) or ARCH:/path/to/checkpoint"
            )
        return EncoderSpec(spec=str(path.resolve()), local_dir=path.resolve())
    arch, sep, rest = spec.partition(":")
    if not sep or not arch or not rest:
        raise EncoderSpecError(
            f"encoder spec {spec!r} is neither 'default', an existing directory, ARCH:TAG nor "
            "ARCH:/path/to/checkpoint (e.g. 'ViT-B-32:openai' or 'ViT-B-32:/models/vitb32.pt')"
        )
    _check_arch(arch, spec)
    from open_clip.pretrained import list_pretrained_tags_by_model

    tags = list_pretrained_tags_by_model(arch)
    if rest.lower().replace("-", "_") in tags:
        weights = "openai" if rest.lower() == "openai" else None
        return EncoderSpec(spec=f"{arch}:{rest}", arch=arch, tag=rest, weights=weights)
    file = Path(rest).expanduser()
    if file.is_file():
        file = file.resolve()
        if _is_torchscript(file):
            raise EncoderSpecError(
                f"{file} is a TorchScript archive (OpenAI's CLIP release format), which "
                "torch.load(weights_only=True) refuses and rdm never loads implicitly: convert it "
                f"once with 'rdm encoder convert-openai {file} --out "
                f"{file.with_suffix('.safetensors')}', then pass "
                f"'{_quick_gelu_arch(arch)}:{file.with_suffix('.safetensors')}'"
            )
        weights = checkpoint_metadata(file).get(META_WEIGHTS)
        return EncoderSpec(spec=f"{arch}:{file}", arch=arch, checkpoint=file, weights=weights)
    if file.suffix in CHECKPOINT_SUFFIXES or "/" in rest or os.sep in rest:
        raise EncoderSpecError(f"checkpoint file {rest} for encoder {arch} does not exist")
    raise EncoderSpecError(
        f"{rest!r} in encoder spec {spec!r} is neither a checkpoint file nor a pretrained tag of "
        f"{arch} (tags: {', '.join(tags) or 'none'}); pass {arch}:/path/to/checkpoint"
    )


def _check_arch(arch: str, spec: str) -> None:
    import open_clip

    if arch not in open_clip.list_models():
        examples = ", ".join(m for m in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "RN50", "ViT-S-16"))
        raise EncoderSpecError(
            f"unknown open_clip architecture {arch!r} in encoder spec {spec!r}; valid ones include "
            f"{examples} (open_clip.list_models() lists all), or pass an open_clip local directory"
        )


def _check_quick_gelu(parsed: EncoderSpec) -> EncoderSpec:
    """Refuse weights trained with QuickGELU (OpenAI's; some of open_clip's tags) under an
    architecture that uses GELU: open_clip would load them and silently compute other features."""
    if parsed.arch is None:  # a local dir's config says which activation its weights need
        return parsed
    import open_clip

    trained_quick = parsed.weights == "openai"
    if parsed.tag is not None:
        trained_quick = bool(
            open_clip.get_pretrained_cfg(parsed.arch, parsed.tag).get("quick_gelu")
        )
    if trained_quick and not open_clip.get_model_config(parsed.arch).get("quick_gelu", False):
        where = parsed.tag or parsed.checkpoint
        fixed = f"{_quick_gelu_arch(parsed.arch)}:{where}"
        raise EncoderSpecError(
            f"encoder spec {parsed.spec!r}: the {parsed.weights or parsed.tag} weights were trained "
            f"with QuickGELU, but open_clip's {parsed.arch} uses GELU and would silently compute "
            f"different features; use '{fixed}'"
        )
    return parsed


def _quick_gelu_arch(arch: str) -> str:
    """The QuickGELU variant of an open_clip architecture (``ViT-B-32`` -> ``ViT-B-32-quickgelu``)."""
    import open_clip

    if arch.endswith("-quickgelu") or open_clip.get_model_config(arch or "").get("quick_gelu"):
        return arch
    if f"{arch}-quickgelu" in open_clip.list_models():
        return f"{arch}-quickgelu"
    return f"<an architecture like {arch} with quick_gelu: true>"


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive (``torch.jit.save``: a zip with ``constants.pkl`` and ``code/``), the
    format of OpenAI's CLIP files, as opposed to a ``torch.save`` state dict."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def checkpoint_metadata(path: Path) -> dict:
    """The string metadata of a ``.safetensors`` file (empty for other formats or none)."""
    if path.suffix != ".safetensors":
        return {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError):
        return {}  # not readable as safetensors: loading it reports the problem


# --- OpenAI's TorchScript files -----------------------------------------------------------------


def openai_checkpoints() -> dict[str, str]:
    """sha256 of OpenAI's released CLIP files -> open_clip architecture, e.g. ``40d36571…`` ->
    ``ViT-B-32``. The hash is the one in OpenAI's download URL (open_clip's ``openai`` tags),
    which OpenAI's and open_clip's downloaders check the file against."""
    import open_clip

    known = {}
    for arch, tag in open_clip.list_pretrained():
        url = open_clip.get_pretrained_cfg(arch, tag).get("url", "") if tag == "openai" else ""
        if "openaipublic" in url:
            known[url.split("/")[-2]] = arch
    return known


def convert_openai_checkpoint(src: str | Path, out: str | Path) -> Path:
    """Convert OpenAI's TorchScript CLIP file (e.g. ``ViT-B-32.pt``) once into ``out``, a
    ``.safetensors`` state dict that :func:`load_encoder` reads without pickle.

    ``torch.load(weights_only=True)`` refuses TorchScript archives (torch >= 2.6), so this
    explicit, one-time step is the only place rdm calls ``torch.jit.load`` on a file: it
    deserialises TorchScript (compiled by torch's own interpreter, not Python pickle globals) but
    runs no forward. When the file's sha256 is that of one of OpenAI's releases
    (:func:`openai_checkpoints`), ``out`` records ``rdm_weights = "openai"`` and the sha256 of
    its tensors, so its identity pairs with the release (:func:`release_identity`)."""
    import torch
    from safetensors.torch import save_file

    from rdm.io import atomic_write, sha256_file

    src, out = Path(src), Path(out)
    if not src.is_file():
        raise EncoderSpecError(f"OpenAI checkpoint {src} does not exist")
    if out.suffix != ".safetensors":
        raise EncoderSpecError(f"--out {out} must end in .safetensors")
    if not _is_torchscript(src):
        raise EncoderSpecError(
            f"{src} is not a TorchScript archive (OpenAI's format); if it holds a state dict, pass "
            "it directly as ARCH:FILE (it is read with torch.load(weights_only=True))"
        )
    require_writable(out, what="converted checkpoint")
    sha = sha256_file(src)
    arch = openai_checkpoints().get(sha)
    try:
        module = torch.jit.load(str(src), map_location="cpu")
    except RuntimeError as exc:  # a damaged or truncated archive
        raise EncoderSpecError(f"{src} cannot be read as TorchScript ({exc})") from None
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    for key in ("input_resolution", "context_length", "vocab_size"):  # as open_clip drops them
        state.pop(key, None)
    metadata = {"rdm_converted_from": src.name, "rdm_source_sha256": sha}
    if arch is not None:
        metadata |= {
            META_WEIGHTS: "openai",
            "rdm_arch": _quick_gelu_arch(arch),
            META_TENSORS: tensors_sha256(state),
        }
    atomic_write(out, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    return out


def tensors_sha256(state: dict) -> str:
    """sha256 over (name, shape, dtype, bytes) of a state dict's tensors in sorted key order: the
    tensors of a converted file, unchanged since conversion."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes, any dtype
    return h.hexdigest()


def _verified_weights(parsed: EncoderSpec) -> str | None:
    """The named weights of ``parsed``: a tag's claim as is; a converted file's only while its
    tensors are those it was converted with (a file edited since is other weights)."""
    if parsed.weights is None or parsed.checkpoint is None:
        return parsed.weights
    from safetensors.torch import load_file

    expected = checkpoint_metadata(parsed.checkpoint).get(META_TENSORS)
    if expected and tensors_sha256(load_file(str(parsed.checkpoint))) == expected:
        return parsed.weights
    print(
        f"note: {parsed.checkpoint} says it holds {parsed.weights} weights, but its tensors "
        "changed since it was converted: its identity records its own checksum",
        file=sys.stderr,
    )
    return None


# --- loading ------------------------------------------------------------------------------------


def load_encoder(
    spec: str = "default", device: str = "cpu", autocast: bool | None = None
) -> Encoder:
    """Load a frozen encoder from ``spec`` (see module docstring) onto ``device``.

    ``autocast`` runs the towers under bf16 autocast; ``None`` picks it where bf16 is native and
    the image tower has at least ``AUTOCAST_MIN_VISION_PARAMS`` parameters. Outputs are float32
    and unit norm either way; under bf16 a row may change by ~1e-3 with the batch it is in.
    """
    parsed = parse_spec(spec)
    model = _create_model(parsed)
    model.eval().requires_grad_(False).to(device)
    return OpenClipEncoder(model, parsed, device=device, autocast=autocast)


def _create_model(parsed: EncoderSpec) -> torch.nn.Module:
    import open_clip

    try:
        if parsed.local_dir is not None:
            return open_clip.create_model(f"local-dir:{parsed.local_dir}", require_pretrained=True)
        pretrained = str(parsed.checkpoint) if parsed.checkpoint else parsed.tag
        return open_clip.create_model(parsed.arch, pretrained=pretrained, require_pretrained=True)
    # a file that is not a checkpoint, or one that does not fit the architecture, surfaces as
    # whatever torch.load / safetensors / open_clip's converters raise (UnpicklingError,
    # SafetensorError, RuntimeError, AssertionError, KeyError ...): report it, chained, as bad input
    except Exception as exc:
        raise EncoderSpecError(_load_failure(parsed, exc)) from exc


def _load_failure(parsed: EncoderSpec, exc: Exception) -> str:
    if parsed.tag is not None:
        option = f"#preprocess={parsed.preprocess}" if parsed.preprocess else ""
        openai = (
            " (OpenAI's TorchScript file, e.g. ViT-B-32.pt, converted once with 'rdm encoder "
            "convert-openai FILE.pt --out FILE.safetensors')"
            if parsed.weights == "openai"
            else ""
        )
        return (
            f"weights for encoder {parsed.spec} are not available offline ({exc}); download the "
            f"checkpoint on a connected machine and pass "
            f"{parsed.arch}:/path/to/checkpoint{option}{openai}, or an open_clip local directory"
        )
    where = parsed.local_dir or parsed.checkpoint
    return f"could not load encoder weights from {where}: {exc}"


class OpenClipEncoder(Encoder):
    """An open_clip CLIP model, frozen, with batched torch preprocessing."""

    def __init__(
        self, model, parsed: EncoderSpec, device: str = "cpu", autocast: bool | None = None
    ):
        import open_clip

        self.model = model
        self.device = device
        self.autocast = _default_autocast(model, device) if autocast is None else autocast
        self.preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
        if parsed.preprocess == "release":  # the CompVis RDM release's (release_resize)
            self.preprocess_cfg = {
                **self.preprocess_cfg,
                "resize_mode": "release",
                "mean": OPENAI_MEAN,
                "std": OPENAI_STD,
            }
        self.tokenizer = open_clip.get_tokenizer(
            f"local-dir:{parsed.local_dir}" if parsed.local_dir else parsed.arch
        )
        self.identity = _identity(model, parsed, self.preprocess_cfg, _verified_weights(parsed))

    # -- images --

    def encode_images(
        self, images: Sequence[Image.Image] | np.ndarray, *, unit: bool = True
    ) -> np.ndarray:
        """``unit=False``: the raw features, not normalised (the CompVis release feeds a query's
        raw CLIP feature to its model as the first context vector)."""
        chunks = _pixel_chunks(images, BATCH_SIZE)
        return _concat([self._encode_pixels(chunk, unit) for chunk in chunks], self.dim)

    def _encode_pixels(self, pixels: np.ndarray, unit: bool = True) -> np.ndarray:
        """uint8 (B, H, W, 3) -> float32 (B, d), unit norm (or raw)."""
        import torch

        x = torch.from_numpy(pixels).to(self.device)
        x = preprocess(x, self.preprocess_cfg)  # (B, 3, S, S) normalised
        with torch.inference_mode(), self._autocast():
            z = self.model.encode_image(x)
        return _unit_rows(z) if unit else z.float().cpu().numpy()

    # -- texts --

    def encode_texts(self, texts: Sequence[str], *, unit: bool = True) -> np.ndarray:
        """``unit=False``: the raw features, not normalised (see :meth:`encode_images`)."""
        if isinstance(texts, str):
            raise EncoderSpecError("encode_texts takes a list of strings, not one string")
        texts = list(texts)
        batches = [
            self._encode_tokens(texts[i : i + BATCH_SIZE], unit)
            for i in range(0, len(texts), BATCH_SIZE)
        ]
        return _concat(batches, self.dim)

    def _encode_tokens(self, texts: list[str], unit: bool = True) -> np.ndarray:
        import torch

        tokens = self.tokenizer(texts).to(self.device)  # (B, context_length) int64
        with torch.inference_mode(), self._autocast():
            z = self.model.encode_text(tokens)
        return _unit_rows(z) if unit else z.float().cpu().numpy()

    def _autocast(self):
        import torch

        device_type = torch.device(self.device).type
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.autocast)


def _default_autocast(model, device: str) -> bool:
    import torch

    if sum(p.numel() for p in model.visual.parameters()) < AUTOCAST_MIN_VISION_PARAMS:
        return False
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    # private probes, absent from some builds: then assume bf16 is emulated (slow)
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def _unit_rows(z: torch.Tensor) -> np.ndarray:
    import torch.nn.functional as F

    return F.normalize(z.float(), dim=-1).cpu().numpy()


def _concat(batches: list[np.ndarray], dim: int) -> np.ndarray:
    if not batches:
        return np.zeros((0, dim), dtype=np.float32)
    return np.concatenate(batches).astype(np.float32, copy=False)


# --- preprocessing ------------------------------------------------------------------------------


def _pixel_chunks(images: Sequence[Image.Image] | np.ndarray, size: int):
    """Yield uint8 (b, H, W, 3) arrays of at most ``size`` equally sized images, in input order."""
    if isinstance(images, np.ndarray):
        pixels = _check_pixels(images)
        for i in range(0, len(pixels), size):
            yield pixels[i : i + size]
        return
    run: list[np.ndarray] = []
    for image in images:
        if not isinstance(image, Image.Image):
            raise EncoderSpecError(
                f"encode_images takes PIL images or a uint8 array (B, H, W, 3), got {type(image).__name__}"
            )
        array = np.asarray(image.convert("RGB"))
        if run and (array.shape != run[0].shape or len(run) == size):
            yield np.stack(run)
            run = []
        run.append(array)
    if run:
        yield np.stack(run)


def _check_pixels(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype != np.uint8:
        raise EncoderSpecError(f"image array must be uint8 (B, H, W, 3), got dtype {pixels.dtype}")
    if pixels.ndim == 3:  # (B, H, W) grayscale, e.g. Fashion-MNIST pixels
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise EncoderSpecError(f"image array must have shape (B, H, W, 3), got {pixels.shape}")
    return pixels


def preprocess(pixels: torch.Tensor, cfg: dict) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, S, S): resize, crop/pad and normalise like open_clip
    (or like the CompVis RDM release, ``resize_mode`` "release": :func:`release_resize`)."""
    from torchvision.transforms.v2 import functional as TF

    if cfg.get("resize_mode") == "release":
        return normalize(release_resize(pixels, cfg), cfg)
    x = TF.to_dtype(resize_crop(pixels, cfg), scale=True)  # (B, 3, S, S) float32 in [0, 1]
    return normalize(x, cfg)


def release_resize(pixels: torch.Tensor, cfg: dict) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, S, S), about [0, 1]: the release's query resize.

    ``ClipImageRetriever.preprocess`` of the CompVis RDM release: the image in [-1, 1] is
    squashed to S × S (no aspect-preserving resize, no centre crop) by kornia's ``resize``,
    i.e. bicubic ``F.interpolate`` with ``align_corners=True`` and no antialiasing, in float,
    then mapped to [0, 1]. Bicubic may overshoot [0, 1] a little; the release does not clamp."""
    import torch.nn.functional as F

    x = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
    size = _pair(cfg["size"])
    if tuple(x.shape[-2:]) != size:  # kornia returns the input unchanged at the target size
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=True)
    return (x + 1.0) / 2.0


def resize_crop(pixels: torch.Tensor, cfg: dict) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> uint8 (B, 3, S, S), resized and center-cropped (or padded).

    open_clip's eval transform (``image_transform(is_train=False)``) for its three resize modes,
    batched with torchvision's functional transforms. Resizing stays in uint8 with antialias,
    torchvision's PIL-compatible kernel, so the result is within one grey level of open_clip's PIL
    pipeline (which also rounds and clips to uint8 after each pass).
    """
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    out_h, out_w = _pair(cfg["size"])
    x = pixels.permute(0, 3, 1, 2)  # (B, 3, H, W) uint8, a view
    mode = cfg.get("resize_mode", "shortest")
    size = _resized_size(*x.shape[-2:], out_h, out_w, mode)
    # as open_clip: bilinear if asked for, else bicubic ("random" is a training-time choice);
    # its path for "shortest" into a non-square size (ResizeKeepRatio) is always bicubic
    interpolation = InterpolationMode.BICUBIC
    if cfg.get("interpolation") == "bilinear" and not (mode == "shortest" and out_h != out_w):
        interpolation = InterpolationMode.BILINEAR
    x = TF.resize(x, size, interpolation=interpolation, antialias=True)
    h, w = x.shape[-2:]
    if h < out_h or w < out_w:  # only in "longest" mode: pad evenly with the fill colour
        pad_h, pad_w = max(out_h - h, 0), max(out_w - w, 0)
        padding = [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2]  # l, t, r, b
        x = TF.pad(x, padding, fill=int(cfg.get("fill_color", 0)))
    return TF.center_crop(x, [out_h, out_w]).contiguous()


def _resized_size(h: int, w: int, out_h: int, out_w: int, mode: str) -> list[int]:
    """torchvision's ``size`` argument for open_clip's resize mode ``mode``."""
    if mode == "squash":
        return [out_h, out_w]
    if mode == "shortest" and out_h == out_w:
        return [out_h]  # torchvision Resize(int): short side -> size, long side truncated
    # open_clip's ResizeKeepRatio: the longest ("longest") or shortest side fits
    ratio = max(h / out_h, w / out_w) if mode == "longest" else min(h / out_h, w / out_w)
    return [round(h / ratio), round(w / ratio)]


def normalize(x: torch.Tensor, cfg: dict) -> torch.Tensor:
    """float (B, 3, S, S) in [0, 1] -> standardised with the model's per-channel mean and std."""
    from torchvision.transforms.v2 import functional as TF

    return TF.normalize(x, mean=list(cfg["mean"]), std=list(cfg["std"]))


def _pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


# --- identity -----------------------------------------------------------------------------------


def _identity(model, parsed: EncoderSpec, preprocess_cfg: dict, weights: str | None) -> dict:
    size = _pair(preprocess_cfg["size"])
    resize = (
        f"{preprocess_cfg.get('resize_mode', 'shortest')} {preprocess_cfg.get('interpolation', 'bicubic')}"
        " antialias, center crop"
    )
    named = {"weights": weights} if weights else {}  # recognised weights pair by name
    return {
        "arch": parsed.arch or _dir_arch(parsed.local_dir),
        **named,
        "weights_sha256": weights_sha256(model),
        "dim": _embed_dim(model),
        "image_size": size[0] if size[0] == size[1] else list(size),
        "mean": [float(v) for v in preprocess_cfg["mean"]],
        "std": [float(v) for v in preprocess_cfg["std"]],
        "resize": RELEASE_RESIZE if preprocess_cfg.get("resize_mode") == "release" else resize,
        "spec": parsed.spec,
    }


def weights_sha256(model) -> str:
    """sha256 over (name, shape, float32 bytes) of every state-dict tensor in sorted key order.

    Upcasting first makes it independent of the storage dtype (fp16 file, fp32 model) and of the
    file format the weights came from.
    """
    h = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach().cpu()
        h.update(f"{name}:{tuple(t.shape)}:".encode())
        array = t.float().contiguous().numpy() if t.is_floating_point() else t.contiguous().numpy()
        h.update(array.tobytes())
    return h.hexdigest()


def _dir_arch(local_dir: Path) -> str:
    """Name for a local dir's architecture: its ``arch`` field, a matching built-in, or a hash."""
    import open_clip

    config = json.loads((local_dir / CONFIG_NAME).read_text())
    if "arch" in config:
        return str(config["arch"])
    model_cfg = config["model_cfg"]
    for name in open_clip.list_models():
        if open_clip.get_model_config(name) == model_cfg:
            return name
    blob = json.dumps(model_cfg, sort_keys=True).encode()
    return "custom-" + hashlib.sha256(blob).hexdigest()[:12]


def _embed_dim(model) -> int:
    import torch

    proj = getattr(model, "text_projection", None)
    if isinstance(proj, torch.nn.Linear):
        return int(proj.out_features)
    if isinstance(proj, torch.Tensor):
        return int(proj.shape[1])
    return int(model.visual.output_dim)


# --- saving an open_clip local dir --------------------------------------------------------------


def save_local_dir(
    model,
    model_cfg: dict,
    preprocess_cfg: dict,
    out: Path,
    arch: str,
    extra_files: dict | None = None,
) -> Path:
    """Write ``model`` as an open_clip local dir that :func:`load_encoder` (and open_clip) loads.

    Floating tensors are stored as float16 (loading upcasts into the float32 model). The directory
    is built beside ``out`` and swapped in with renames (:func:`rdm.io.replace_dir`), so ``out`` is
    never half-written. ``extra_files`` maps file names to JSON-serialisable objects written
    alongside. Raises :class:`rdm.io.OutputError` when ``out`` cannot be written.
    """
    from safetensors.torch import save_file

    out = Path(out)
    require_writable(out.parent, is_dir=True, what="folder of encoder directory")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left behind by a killed earlier save
    state = {k: _storage_tensor(v) for k, v in model.state_dict().items()}
    config = {"arch": arch, "model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    try:
        tmp.mkdir()
        save_file(state, str(tmp / WEIGHTS_NAME))
        for name, obj in {CONFIG_NAME: config, **(extra_files or {})}.items():
            write_json(tmp / name, obj, indent=2)
        replace_dir(tmp, out)
    except OSError as exc:
        raise OutputError(
            f"cannot write encoder directory {out} ({exc.strerror or exc}); choose another --out"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _storage_tensor(t):
    import torch

    t = t.detach().cpu().contiguous()
    return t.to(torch.float16) if t.is_floating_point() else t
