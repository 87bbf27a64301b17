"""Typed configuration for the model, the diffusion process, training and sampling, with presets.

Every run directory holds a ``config.json`` written by :meth:`RunConfig.to_json`; loading it back
(:meth:`RunConfig.from_json`) refuses unknown keys, so a typo or a config from another version is
reported instead of silently ignored.

Presets (:func:`preset`):

- ``tiny``   8 px, channels (8, 16), ~65k parameters: for tests, a step takes milliseconds.
- ``small``  32 px, channels (32, 64, 64), ~2M parameters: trainable on a 2-core CPU; the
  recipe measured on one (v-prediction, lr 5e-4, batch 32, DPM-Solver++ 20 steps, this width;
  docs/training.md).
- ``base``   64 px, channels (128, 256, 384, 512), ~140M parameters: for a GPU; the paper's
  recipe (ε-prediction, lr 1e-4, DDIM 100 steps η = 1).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rdm.errors import RdmError
from rdm.io import write_json

PRESETS = ("tiny", "small", "base")
SCHEDULES = ("scaled_linear", "linear", "cosine")
SAMPLERS = ("ddim", "dpm++")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class ConfigError(RdmError):
    """A config file or value that cannot be used; the message names the key or file."""


@dataclass
class ModelConfig:
    """The conditional UNet ε_θ(x_t, t, {φ(y)}) and, optionally, the autoencoder it runs inside."""

    resolution: int = 32  # image side in pixels
    # 3 (RGB) or 1 (grey: the luma of the images, rdm.model.encode) in pixel space; the
    # autoencoder's latent channels in latent space
    in_channels: int = 3
    block_out_channels: tuple[int, ...] = (64, 128, 128)
    # one flag per resolution level (highest resolution first): cross-attention there or not
    attention_levels: tuple[bool, ...] = (False, True, True)
    layers_per_block: int = 1
    head_dim: int = 32  # channels per attention head (the paper's num_head_channels = 32)
    norm_num_groups: int = 32
    context_dim: int = 512  # d of the database embeddings, read through to_k / to_v
    k: int = 4  # neighbours per image (the length of the context set)
    null_context: str = "learned"  # "learned" (k, d) parameter or "zeros" (the released code's ∅)
    baseline: bool = False  # no retrieval: the same UNet, always given the null context
    latent: bool = False  # train in the latent space of a frozen AutoencoderKL
    vae_path: str | None = None  # local directory readable by AutoencoderKL.from_pretrained
    vae_scale_factor: float | None = None  # latents are multiplied by this before diffusion
    latent_downsample: int = 1  # image side / latent side (1 in pixel space)
    # the autoencoder's kind: "kl" (diffusers AutoencoderKL) or "vq" (VQModel, decoded through its
    # quantiser, as the official RDMs' VQ-f4 first stage; rdm.model.load_vae)
    first_stage: str = "kl"

    def __post_init__(self) -> None:
        levels = len(self.block_out_channels)
        if len(self.attention_levels) != levels:
            raise ConfigError(
                f"model.attention_levels has {len(self.attention_levels)} entries but "
                f"model.block_out_channels has {levels}; give one flag per level"
            )
        for c in self.block_out_channels:
            if c % self.head_dim or c % self.norm_num_groups:
                raise ConfigError(
                    f"model.block_out_channels entry {c} must be divisible by head_dim "
                    f"{self.head_dim} and norm_num_groups {self.norm_num_groups}"
                )
        if self.null_context not in ("learned", "zeros"):
            raise ConfigError(f"model.null_context={self.null_context!r}: use 'learned' or 'zeros'")
        if self.first_stage not in ("kl", "vq"):
            raise ConfigError(f"model.first_stage={self.first_stage!r}: use 'kl' or 'vq'")
        if self.latent and not self.vae_path:
            raise ConfigError("model.latent is true but model.vae_path is empty: give --vae DIR")
        if self.resolution % (self.latent_downsample * 2 ** (levels - 1)):
            raise ConfigError(
                f"model.resolution {self.resolution} must be divisible by latent_downsample "
                f"{self.latent_downsample} x 2^{levels - 1} (one halving per extra level)"
            )
        if not self.latent and self.in_channels not in (1, 3):
            raise ConfigError(
                f"model.in_channels={self.in_channels}: a pixel-space model has 3 (RGB) or 1 "
                "(grey) channels"
            )
        if self.k < 1 or self.context_dim < 1:
            raise ConfigError(
                f"model.k={self.k} and model.context_dim={self.context_dim} must be >= 1"
            )

    @property
    def sample_size(self) -> int:
        """Side of the tensors the UNet sees: the image side, or the latent side."""
        return self.resolution // self.latent_downsample

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per level. diffusers' ``attention_head_dim`` actually sets this count."""
        return tuple(c // self.head_dim for c in self.block_out_channels)

    @property
    def down_block_types(self) -> tuple[str, ...]:
        return tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.attention_levels)

    @property
    def up_block_types(self) -> tuple[str, ...]:
        return tuple(
            "CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.attention_levels)
        )


@dataclass
class DiffusionConfig:
    """The forward process q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) and what the network predicts."""

    num_train_timesteps: int = 1000
    # The paper's "linear" 0.0015 -> 0.0195 is LDM's make_beta_schedule("linear"), which is linear
    # in √β; diffusers calls that "scaled_linear". "linear" here is linear in β itself.
    # "cosine" is Nichol & Dhariwal's schedule (diffusers "squaredcos_cap_v2").
    schedule: str = "scaled_linear"
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    # What the network predicts (diffusers' names): "epsilon" the noise ε (Ho et al. 2020, the
    # paper's), "v_prediction" v = √ᾱ ε − √(1 − ᾱ) x_0 (Salimans & Ho 2022), "sample" x_0 itself.
    prediction_type: str = "epsilon"
    # Rescale the betas so that ᾱ_{T−1} = 0 exactly (Lin et al. 2024, diffusers'
    # rescale_betas_zero_snr): x_{T−1} is then pure noise, the x_T the samplers start from, so
    # training and sampling agree at the top. ε cannot be predicted from pure noise (x_0 =
    # (x_t − √(1 − ᾱ) ε)/√ᾱ divides by 0), so it needs prediction_type v_prediction or sample.
    zero_terminal_snr: bool = False
    # Clip the predicted x_0 to [-1, 1] at every sampling step (pixel space only: latents are not
    # in [-1, 1]); every sampler then continues from the clipped x_0 and the noise consistent with
    # it, (x_t − √ᾱ_t x̂_0)/√(1 − ᾱ_t). Short-trained pixel ε-models predict ε poorly at high t,
    # where x_0 = (x_t − √(1−ᾱ) ε) / √ᾱ amplifies the error ~100x; without clipping their samples
    # saturate. v- and x_0-models predict x_0 directly and are measured without it (docs/training.md).
    clip_sample: bool = True

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"diffusion.schedule={self.schedule!r}: choose one of {', '.join(SCHEDULES)}"
            )
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"diffusion.prediction_type={self.prediction_type!r}: choose one of "
                f"{', '.join(PREDICTION_TYPES)}"
            )
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise ConfigError(
                "diffusion.zero_terminal_snr makes x_{T-1} pure noise, from which ε cannot be "
                "predicted; use prediction_type v_prediction (or sample) with it"
            )


@dataclass
class TrainConfig:
    steps: int = 20_000
    batch_size: int = 64  # per process
    lr: float = 1e-4
    warmup_steps: int = 100  # linear warm-up from 0, then constant (LDM's LambdaLinear)
    # after the warm-up: "constant" (LDM), or "cosine" decay to 0 at the last step (diffusers'
    # get_cosine_schedule_with_warmup)
    lr_schedule: str = "constant"
    weight_decay: float = 0.01  # torch AdamW's default, as LDM uses it
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    ema_decay: float = 0.9999
    # further EMAs of the same run, each saved as ema-<name>.safetensors (rdm.train.EmaSpec):
    # "ldm:DECAY", "power:P" (diffusers' EMAModel warm-up) or "halflife:IMAGES" (EDM)
    ema_extra: list[str] = field(default_factory=list)
    # min-SNR-γ loss weighting (Hang et al. 2023): weight min(SNR_t, γ) on the x_0 error, i.e.
    # min(SNR, γ)/SNR on ε's and min(SNR, γ)/(SNR + 1) on v's; None: the plain loss
    snr_gamma: float | None = None
    p_uncond: float = 0.1  # probability of replacing the whole neighbour set by the null context
    k_random_from_top_n: int | None = None  # draw the k neighbours from the top n, else first k
    # "bf16" autocast, "no" (fp32), or "auto": bf16 where the hardware computes it natively (a
    # GPU with bf16, a CPU with AVX512-BF16 or AMX), else fp32 — emulated bf16 is slower than fp32
    # (rdm.train.resolve_precision; docs/training.md)
    mixed_precision: str = "auto"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_last: int = 3
    sample_every: int = 1000  # 0 disables the sample grid
    num_workers: int = 0  # DataLoader worker processes

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise ConfigError(
                f"train.mixed_precision={self.mixed_precision!r}: use 'auto', 'bf16' or 'no'"
            )
        if not 0.0 <= self.p_uncond <= 1.0:
            raise ConfigError(f"train.p_uncond={self.p_uncond} must lie in [0, 1]")
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError(
                f"train.steps={self.steps} and train.batch_size={self.batch_size} must be >= 1"
            )
        if self.keep_last < 1:
            raise ConfigError(f"train.keep_last={self.keep_last} must be >= 1")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"train.lr_schedule={self.lr_schedule!r}: use 'constant' or 'cosine'")
        from rdm.ema import EmaSpecError, extra_names

        try:
            extra_names(self.ema_extra)
        except EmaSpecError as exc:
            raise ConfigError(f"train.ema_extra: {exc}") from None
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise ConfigError(f"train.snr_gamma={self.snr_gamma} must be > 0 (5 is usual) or null")


@dataclass
class SampleConfig:
    # The paper samples with DDIM, 100 steps, η = 1; the released scripts with η = 0, scale 2.0.
    sampler: str = "ddim"
    steps: int = 100
    eta: float = 1.0
    guidance_scale: float = 2.0
    guidance_rescale: float = 0.0  # CFG rescale φ (Lin et al. 2024); 0 = plain guidance
    seed: int = 0
    grid_size: int = 8  # images in the training-time sample grid

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ConfigError(
                f"sample.sampler={self.sampler!r}: choose one of {', '.join(SAMPLERS)}"
            )
        if self.steps < 1:
            raise ConfigError(f"sample.steps={self.steps} must be >= 1")


@dataclass
class DataConfig:
    """Where the training images and their neighbours come from (recorded for provenance)."""

    source: str = ""  # source spec, see rdm.data.open_source
    split: str = "train"
    db: str = ""  # database directory
    neighbors: str = ""  # neighbours file


@dataclass
class RunConfig:
    """Everything a run directory needs to be resumed, sampled from and checked against a database."""

    preset: str = "small"
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # provenance, filled from the artifacts at training time so that sampling can refuse mismatches
    db_fingerprint: str = ""
    encoder: dict = field(default_factory=dict)  # encoder identity (see rdm.encoders)
    neighbors_meta: dict = field(default_factory=dict)
    # {"ema.safetensors": sha256 hex, ...} of the weights beside this config.json, recorded by
    # rdm.checkpoint.save_weights and verified by load_run (empty for runs saved before); a
    # record of files, not a setting, so two configs compare equal without it
    weights_sha256: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.model.latent and self.diffusion.clip_sample:
            raise ConfigError(
                "diffusion.clip_sample clips to the pixel range [-1, 1], which latents do not "
                "have; set it to false for a latent model (rdm train --vae does)"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path) -> None:
        """Write atomically (:func:`rdm.io.write_json`)."""
        write_json(path, self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> RunConfig:
        return _from_dict(cls, d, where)

    @classmethod
    def from_json(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist: is this a run directory?") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}); delete or repair it") from None
        except OSError as exc:
            raise ConfigError(f"{path} cannot be read ({exc.strerror or exc})") from None
        return cls.from_dict(d, where=str(path))


def _from_dict(cls: type, d: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a JSON dict, refusing unknown keys and converting lists."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected an object for {cls.__name__}, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)} in {cls.__name__}; "
            f"known keys: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(hints[name], value, f"{where}.{name}") for name, value in d.items()}
    return cls(**kwargs)


def _convert(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _from_dict(hint, value, where)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _convert(inner[0], value, where)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


def preset(name: str) -> RunConfig:
    """The named preset: model size, batch size and schedule suited to a machine."""
    if name == "tiny":
        return RunConfig(
            preset="tiny",
            model=ModelConfig(
                resolution=8,
                block_out_channels=(8, 16),
                attention_levels=(False, True),
                layers_per_block=1,
                head_dim=4,
                norm_num_groups=4,
                context_dim=16,
            ),
            train=TrainConfig(
                steps=20,
                batch_size=4,
                warmup_steps=2,
                ema_decay=0.9,
                mixed_precision="no",
                log_every=1,
                checkpoint_every=10,
                sample_every=0,
            ),
            sample=SampleConfig(steps=10, grid_size=4),
        )
    if name == "small":
        # The CPU recipe measured in docs/training.md ("A recipe that converges on a CPU"):
        # v-prediction at lr 5e-4, sampled with SDE-DPM-Solver++ at 20 steps, x_0 not clipped,
        # at half the default width and batch 32: in the same wall time the half width beat the
        # (64, 128, 128) UNet and two layers per level, and batch 32 for twice the steps beat
        # batch 64 (the same images seen).
        return RunConfig(
            preset="small",
            model=ModelConfig(block_out_channels=(32, 64, 64)),
            diffusion=DiffusionConfig(prediction_type="v_prediction", clip_sample=False),
            train=TrainConfig(steps=40_000, batch_size=32, lr=5e-4, ema_decay=0.999),
            sample=SampleConfig(sampler="dpm++", steps=20, eta=1.0),
        )
    if name == "base":
        return RunConfig(
            preset="base",
            model=ModelConfig(
                resolution=64,
                block_out_channels=(128, 256, 384, 512),
                attention_levels=(False, True, True, True),
                layers_per_block=2,
            ),
            train=TrainConfig(steps=200_000, batch_size=64, ema_decay=0.9999),
        )
    raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
