"""The conditional UNet ε_θ(x_t, t, {φ(y) : y ∈ ξ_k(x, D)}) and the no-retrieval baseline.

As in the paper's released models, the k neighbour embeddings enter the network *as they are*: a
(B, k, d) context of raw unit-norm database vectors, without positional encoding (the set is
permutation invariant) and without any learned encoder in front. The only learned map from the
database space into the network is each cross-attention layer's ``to_k`` / ``to_v`` projection
(``Linear(d -> heads x head_dim)``, no bias).

Classifier-free guidance needs a null context ∅ that stands for "no neighbours": a learned (k, d)
parameter, or all zeros (what the released code feeds at sampling time). The *baseline* is the same
UNet that only ever sees ∅, so it is fully parametric with the same parameter count.

Latent-space models keep a frozen diffusers ``AutoencoderKL`` or ``VQModel`` (``model.first_stage``)
beside the UNet (never trained, never saved with the run's weights, referenced by its directory in
the config).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rdm.config import PRESETS, ModelConfig, preset
from rdm.errors import RdmError

#: ITU-R BT.601 luma weights of R, G, B (what PIL's convert("L") uses)
LUMA = (0.299, 0.587, 0.114)


def build_unet(cfg: ModelConfig):
    """A diffusers ``UNet2DConditionModel`` whose cross-attention reads a (B, k, d) context."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=cfg.sample_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,  # ε has the shape of x_t
        block_out_channels=cfg.block_out_channels,
        down_block_types=cfg.down_block_types,
        up_block_types=cfg.up_block_types,
        layers_per_block=cfg.layers_per_block,
        # diffusers' historical misnomer: this argument is the NUMBER of heads per level
        attention_head_dim=cfg.heads,
        norm_num_groups=cfg.norm_num_groups,
        cross_attention_dim=cfg.context_dim,
    )


class RetrievalUNet(nn.Module):
    """The UNet plus the null context ∅ used for guidance dropout and the baseline."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.unet = build_unet(cfg)
        if cfg.null_context == "learned":
            # about unit norm, like the database vectors it replaces
            init = torch.randn(cfg.k, cfg.context_dim) / cfg.context_dim**0.5
            self.null = nn.Parameter(init)
        else:
            self.register_buffer("null", torch.zeros(cfg.k, cfg.context_dim))

    def null_context(self, batch: int) -> torch.Tensor:
        """∅ repeated for a batch: (B, k, d)."""
        return self.null.unsqueeze(0).expand(batch, -1, -1)

    def forward(
        self,
        x_t: torch.Tensor,  # (B, C, H, W)
        t: torch.Tensor,  # (B,) or scalar integer timesteps
        context: torch.Tensor | None,  # (B, k, d) neighbour embeddings; None means ∅
        drop_mask: torch.Tensor | None = None,  # (B,) bool: replace this sample's set by ∅
    ) -> torch.Tensor:
        """Predicted noise ε, shaped like ``x_t``."""
        batch = x_t.shape[0]
        null = self.null_context(batch)
        if self.cfg.baseline or context is None:
            context = null
        elif drop_mask is not None:
            if context.shape[1:] != null.shape[1:]:
                raise RdmError(
                    f"guidance dropout needs a context of shape (B, {self.cfg.k}, "
                    f"{self.cfg.context_dim}) like the null context, got {tuple(context.shape)}"
                )
            # torch.where keeps ∅ in the graph even when nothing is dropped (DDP-friendly)
            context = torch.where(drop_mask.view(-1, 1, 1), null.to(context.dtype), context)
        return self.unet(x_t, t, encoder_hidden_states=context, return_dict=False)[0]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def preset_parameter_counts(names: tuple[str, ...] = PRESETS) -> dict[str, int]:
    """Parameters of each preset's model (d = 16 for tiny, 512 for small and base)."""
    return {name: count_parameters(RetrievalUNet(preset(name).model)) for name in names}


def print_parameter_counts(names: tuple[str, ...] = PRESETS) -> None:
    """One line per preset: parameters, resolution, channels, heads (``python -m rdm.model``)."""
    for name, n in preset_parameter_counts(names).items():
        cfg = preset(name).model
        print(
            f"{name:6s} {n / 1e6:8.3f}M parameters  {cfg.resolution}px  "
            f"channels {cfg.block_out_channels}  heads {cfg.heads}  d={cfg.context_dim}"
        )


# --- latent space -------------------------------------------------------------------------------


class VaeError(RdmError):
    """An autoencoder directory that cannot be loaded or does not match the model config."""


#: ModelConfig.first_stage -> the diffusers class saved in the autoencoder's directory
FIRST_STAGE_CLASSES = {"kl": "AutoencoderKL", "vq": "VQModel"}


def vae_settings(vae_dir: str | Path) -> dict:
    """The ModelConfig fields implied by an autoencoder directory (reads its config.json only):
    a diffusers ``AutoencoderKL`` or ``VQModel`` saved with ``save_pretrained``."""
    from diffusers import AutoencoderKL

    vae_dir = Path(vae_dir)
    try:
        conf = AutoencoderKL.load_config(vae_dir)  # ConfigMixin: reads config.json of any class
    except (OSError, ValueError) as exc:
        raise VaeError(
            f"{vae_dir} is not an AutoencoderKL directory (nor a VQModel one): config.json + "
            f"weights saved with save_pretrained: {exc}"
        ) from None
    class_name = conf.get("_class_name", "AutoencoderKL")  # hand-written configs: the old default
    kinds = {name: kind for kind, name in FIRST_STAGE_CLASSES.items()}
    if class_name not in kinds:
        raise VaeError(
            f"{vae_dir} holds a {class_name}; rdm's first stage is an AutoencoderKL or a VQModel"
        )
    kind = kinds[class_name]
    # the diffusion runs on what encode() returns: a VQModel's quant_conv output has vq_embed_dim
    # channels (its latent_channels are the encoder's z before quant_conv)
    channels = conf["latent_channels"]
    if kind == "vq" and conf.get("vq_embed_dim") is not None:
        channels = conf["vq_embed_dim"]
    return {
        "latent": True,
        "vae_path": str(vae_dir),
        "in_channels": int(channels),
        "latent_downsample": 2 ** (len(conf["block_out_channels"]) - 1),
        "vae_scale_factor": float(conf.get("scaling_factor", 1.0)),
        "first_stage": kind,
    }


def resolve_vae_path(vae_path: str | None, run_dir: str | Path) -> str | None:
    """``vae_path`` as stored in a run's config: a relative path names a directory inside the run
    (an imported official run keeps its first stage in ``RUN/first_stage``) when one is there,
    else it stays relative to the working directory (what ``rdm train --vae DIR`` records)."""
    if vae_path is None or Path(vae_path).is_absolute():
        return vae_path
    inside = Path(run_dir) / vae_path
    return str(inside) if inside.is_dir() else vae_path


def load_vae(cfg: ModelConfig, device: str | torch.device = "cpu"):
    """The frozen autoencoder of a latent model (None in pixel space), checked against ``cfg``:
    an ``AutoencoderKL`` or a ``VQModel`` as ``cfg.first_stage`` says."""
    if not cfg.latent:
        return None
    import diffusers

    expected = vae_settings(cfg.vae_path)
    for key in ("first_stage", "in_channels", "latent_downsample"):
        if expected[key] != getattr(cfg, key):
            raise VaeError(
                f"autoencoder {cfg.vae_path} gives {key}={expected[key]!r} but the model config "
                f"says {getattr(cfg, key)!r}; this run was trained with another autoencoder"
            )
    cls = getattr(diffusers, FIRST_STAGE_CLASSES[cfg.first_stage])
    vae = cls.from_pretrained(cfg.vae_path).to(device).eval().requires_grad_(False)
    return vae


def _is_vq(vae) -> bool:
    from diffusers import VQModel

    return isinstance(vae, VQModel)


def encode(
    vae, x: torch.Tensor, cfg: ModelConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> what the diffusion runs on: the images themselves in
    pixel space, their luma (B, 1, H, W) for a 1-channel model, or the latents (B, c, h, w):
    a sample of an AutoencoderKL's posterior, or a VQModel's quant_conv(encoder(x)) *before*
    quantisation (LDM's encode_first_stage; the quantiser acts in :func:`decode`)."""
    if vae is None:
        if cfg.in_channels == 1 and x.shape[1] == 3:  # ITU-R 601 luma; grey data: R = G = B
            return torch.tensordot(x, x.new_tensor(LUMA), dims=([1], [0])).unsqueeze(1)
        return x
    with torch.no_grad():
        out = vae.encode(x.to(vae.dtype))
        z = out.latents if _is_vq(vae) else out.latent_dist.sample(generator)
    return z.float() * _scale(cfg)


def decode(vae, z: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Inverse of :func:`encode`: diffusion space -> images, roughly in [-1, 1] (B, C, H, W),
    C = 1 for a grey pixel model (:func:`rdm.sampling.to_uint8` repeats it to RGB). A VQModel
    snaps each latent vector to its nearest codebook entry first, as the official RDMs decode
    (LDM's VQModelInterface.decode); skipping that changes the images."""
    if vae is None:
        return z
    h = (z / _scale(cfg)).to(vae.dtype)
    with torch.no_grad():
        if _is_vq(vae):
            return vae.decode(h, force_not_quantize=False).sample.float()
        return vae.decode(h).sample.float()


def _scale(cfg: ModelConfig) -> float:
    return 1.0 if cfg.vae_scale_factor is None else cfg.vae_scale_factor


def unet_input_shape(cfg: ModelConfig) -> tuple[int, int, int]:
    """(C, H, W) of x_t for one sample."""
    return (cfg.in_channels, cfg.sample_size, cfg.sample_size)


if __name__ == "__main__":
    print_parameter_counts()
