"""The conditional UNet ε_θ(x_t, t, {φ(y) : y ∈ ξ_k(x, D)}) and the no-retrieval baseline.

As in the paper's released models, the k neighbour embeddings enter the network *as they are*: a
(B, k, d) context of raw unit-norm database vectors, without positional encoding (the set is
permutation invariant) and without any learned encoder in front. The only learned map from the
database space into the network is each cross-attention layer's ``to_k`` / ``to_v`` projection
(``Linear(d -> heads x head_dim)``, no bias).

Classifier-free guidance needs a null context ∅ that stands for "no neighbours": a learned (k, d)
parameter, or all zeros (what the released code feeds at sampling time). The *baseline* is the same
UNet that only ever sees ∅, so it is fully parametric with the same parameter count.

Latent-space models keep a frozen diffusers ``AutoencoderKL`` beside the UNet (never trained, never
saved with the run, referenced by its directory in the config).
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


def vae_settings(vae_dir: str | Path) -> dict:
    """The ModelConfig fields implied by an AutoencoderKL directory (reads its config.json only)."""
    from diffusers import AutoencoderKL

    vae_dir = Path(vae_dir)
    try:
        conf = AutoencoderKL.load_config(vae_dir)
    except (OSError, ValueError) as exc:
        raise VaeError(
            f"{vae_dir} is not an AutoencoderKL directory (config.json + weights saved with "
            f"save_pretrained): {exc}"
        ) from None
    return {
        "latent": True,
        "vae_path": str(vae_dir),
        "in_channels": int(conf["latent_channels"]),
        "latent_downsample": 2 ** (len(conf["block_out_channels"]) - 1),
        "vae_scale_factor": float(conf.get("scaling_factor", 1.0)),
    }


def load_vae(cfg: ModelConfig, device: str | torch.device = "cpu"):
    """The frozen autoencoder of a latent model (None in pixel space), checked against ``cfg``."""
    if not cfg.latent:
        return None
    from diffusers import AutoencoderKL

    expected = vae_settings(cfg.vae_path)
    for key in ("in_channels", "latent_downsample"):
        if expected[key] != getattr(cfg, key):
            raise VaeError(
                f"autoencoder {cfg.vae_path} gives {key}={expected[key]} but the model config "
                f"says {getattr(cfg, key)}; this run was trained with another autoencoder"
            )
    vae = AutoencoderKL.from_pretrained(cfg.vae_path).to(device).eval().requires_grad_(False)
    return vae


def encode(
    vae, x: torch.Tensor, cfg: ModelConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> what the diffusion runs on: the images themselves in
    pixel space, their luma (B, 1, H, W) for a 1-channel model, or the latents."""
    if vae is None:
        if cfg.in_channels == 1 and x.shape[1] == 3:  # ITU-R 601 luma; grey data: R = G = B
            return torch.tensordot(x, x.new_tensor(LUMA), dims=([1], [0])).unsqueeze(1)
        return x
    with torch.no_grad():
        z = vae.encode(x.to(vae.dtype)).latent_dist.sample(generator)
    return z.float() * _scale(cfg)


def decode(vae, z: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Inverse of :func:`encode`: diffusion space -> images, roughly in [-1, 1] (B, C, H, W),
    C = 1 for a grey pixel model (:func:`rdm.sampling.to_uint8` repeats it to RGB)."""
    if vae is None:
        return z
    with torch.no_grad():
        return vae.decode((z / _scale(cfg)).to(vae.dtype)).sample.float()


def _scale(cfg: ModelConfig) -> float:
    return 1.0 if cfg.vae_scale_factor is None else cfg.vae_scale_factor


def unet_input_shape(cfg: ModelConfig) -> tuple[int, int, int]:
    """(C, H, W) of x_t for one sample."""
    return (cfg.in_channels, cfg.sample_size, cfg.sample_size)


if __name__ == "__main__":
    print_parameter_counts()
