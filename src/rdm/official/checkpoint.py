"""The official RDM Lightning checkpoint + its ``config.yaml`` -> a normal rdm run directory.

The release's model (``rdm.models.diffusion.ddpm.MinimalRETRODiffusion``) is an LDM whose UNet
(``openaimodel.UNetModel`` with ``SpatialTransformer`` cross-attention) reads the k retrieved CLIP
embeddings as its context, inside the latent space of a VQ-f4 autoencoder (paper §4, App. E).
Here the UNet becomes a diffusers ``UNet2DConditionModel`` built from a :class:`ModelConfig`
(:func:`rdm.model.build_unet`), and the first stage a diffusers ``VQModel``::

    RUN/config.json          RunConfig: model (latent, first_stage "vq"), schedule, sampler defaults
    RUN/ema.safetensors      the EMA UNet (model_ema.*), the weights the release samples with
    RUN/model.safetensors    the raw UNet (model.diffusion_model.*), on request
    RUN/first_stage/         VQModel.save_pretrained (config.json + safetensors)
    RUN/official.json        where it came from: files, sha256s, weights taken, stubbed globals

The conversion's traps (fixture EXPECTED.md §7), each handled where it arises:

- diffusers' ``attention_head_dim`` is a head COUNT: ``ModelConfig.head_dim = num_head_channels``
  gives ``channels // num_head_channels`` heads per level (``ModelConfig.heads``).
- LitEma names drop every dot: ``model.diffusion_model.a.1.b`` -> ``model_ema.diffusion_modela1b``.
- LDM's ``beta_schedule="linear"`` is linear in √β: diffusers' (and rdm's) ``"scaled_linear"``;
  checked against the checkpoint's own ``alphas_cumprod``.
- The latents are not rescaled (``scale_by_std: false`` -> ``scale_factor`` 1.0, not diffusers'
  default 0.18215), and decoding goes through the quantiser (``VQModelInterface.decode``);
  ``convert_ldm_vae_checkpoint`` leaves out the codebook, which is copied here.
- Guidance runs against an all-zero context: ``rdm_sample.py`` passes
  ``unconditional_retro_guidance_label=0.``, which scales the stored ``unconditional_guidance_vex``
  by 0 (so it is not needed, and release files may lack it): ``null_context="zeros"``.

What the weights cannot tell is taken from the config: a ``num_head_channels`` that still divides
every width (16 instead of 32) changes the head count without changing any shape, so the
config.yaml must be the one released with the checkpoint.

tests/test_official_checkpoint.py reproduces the fixture's official outputs (max |diff| <= 1e-4,
observed ~3e-6). The fixture has one attention level and channel_mult [1, 1]; the release's layout
(channel_mult [1, 2, 3, 5], num_res_blocks 2, attention_resolutions [8, 4, 2], VQ ch_mult
[1, 2, 4]) was checked once outside the repository against the official openaimodel UNet and ldm
Encoder/Decoder with random weights at small widths: ε 2.6e-6, encode 3.3e-6, decode 1.4e-5.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rdm.checkpoint import state_dict_mismatch
from rdm.config import (
    ConfigError,
    DiffusionConfig,
    ModelConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
)
from rdm.errors import RdmError
from rdm.official.unpickle import is_stub, load_lightning_checkpoint

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
VQ_PREFIX = "first_stage_model."
FIRST_STAGE_DIR = "first_stage"
# DDPM.register_schedule's buffers: derived from the schedule, which the config rebuilds
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
    "lvlb_weights",
)
# not weights: LitEma's bookkeeping, the guidance vector multiplied by 0, scale_by_std's scale
OTHER_KEYS = ("model_ema.decay", "model_ema.num_updates", "unconditional_guidance_vex")
# the release's sampler (scripts/rdm_sample.py): DDIM, 100 steps, η = 0 (DDIMSampler's default),
# guidance scale 2.0 against the zero context
RELEASE_SAMPLING = SampleConfig(sampler="ddim", steps=100, eta=0.0, guidance_scale=2.0)
# LDM's make_beta_schedule names -> rdm's DiffusionConfig.schedule
SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "cosine"}
PARAMETERIZATIONS = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
# max |ᾱ_t(config) − ᾱ_t(checkpoint)|: the float32 buffer vs float64 rebuild differ by ~3e-8
SCHEDULE_TOLERANCE = 1e-5


class OfficialImportError(RdmError):
    """A release checkpoint or config that cannot be imported; the message names the file."""


@dataclass
class ImportReport:
    """What :func:`import_checkpoint` wrote and took."""

    out: Path
    weights: tuple[str, ...]  # "ema" and / or "model": the files written
    stubbed: list[str]  # globals of the checkpoint's pickle replaced by inert stubs
    unet_parameters: int
    first_stage_parameters: int
    config: RunConfig
    notes: list[str]


# --- config.yaml ------------------------------------------------------------------------------------


def read_release_config(path: str | Path) -> dict:
    """The release's ``config.yaml`` (``model.params`` of a MinimalRETRODiffusion), checked for
    the parts rdm converts: an ``openaimodel.UNetModel`` with spatial transformers, a
    ``VQModelInterface`` first stage, retrieval-only conditioning, an identity retrieval encoder."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OfficialImportError(f"config {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise OfficialImportError(f"config {path} cannot be read ({exc})") from None
    except yaml.YAMLError as exc:
        raise OfficialImportError(f"config {path} is not valid YAML ({exc})") from None
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("params"), dict):
        raise OfficialImportError(
            f"config {path} has no model.params section; give the release's config.yaml "
            "(e.g. models/rdm/imagenet/config.yaml)"
        )
    params = model["params"]
    where = f"config {path}"
    _expect(where, "model.target", model.get("target"), "MinimalRETRODiffusion", suffix=True)
    _expect(where, "unet_config.target", _target(params, "unet_config"), "UNetModel", suffix=True)
    _expect(
        where,
        "first_stage_config.target",
        _target(params, "first_stage_config"),
        "ldm.models.autoencoder.VQModelInterface",
    )
    _expect(
        where,
        "retrieval_encoder_cfg.target",
        _target(params, "retrieval_encoder_cfg"),
        "torch.nn.Identity",
    )
    _expect(where, "conditioning_key", params.get("conditioning_key", "retro_only"), "retro_only")
    _expect(
        where,
        "cond_stage_config",
        params.get("cond_stage_config", "__is_unconditional__"),
        "__is_unconditional__",
    )
    for key in ("nn_encoder_cfg", "query_encoder_cfg", "retro_conditioning_key"):
        if params.get(key):
            raise OfficialImportError(
                f"{where}: model.params.{key} is set; rdm imports RDMs whose UNet reads the "
                "retrieved embeddings directly (the release's), not through a learned encoder"
            )
    if params.get("retro_concat"):
        raise OfficialImportError(f"{where}: model.params.retro_concat is not supported")
    return model


def _target(params: dict, key: str) -> Any:
    section = params.get(key)
    return section.get("target") if isinstance(section, dict) else section


def _expect(where: str, key: str, value: Any, wanted: str, suffix: bool = False) -> None:
    ok = isinstance(value, str) and (value.endswith(wanted) if suffix else value == wanted)
    if not ok:
        raise OfficialImportError(
            f"{where}: {key} is {value!r}, rdm imports {'…' if suffix else ''}{wanted} "
            "(the release's RDM configs)"
        )


# known openaimodel.UNetModel arguments; the ones that change the architecture are checked
_UNET_KEYS = {
    "image_size",
    "in_channels",
    "model_channels",
    "out_channels",
    "num_res_blocks",
    "attention_resolutions",
    "dropout",
    "channel_mult",
    "conv_resample",
    "dims",
    "num_classes",
    "use_checkpoint",
    "use_fp16",
    "num_heads",
    "num_head_channels",
    "num_heads_upsample",
    "use_scale_shift_norm",
    "resblock_updown",
    "use_new_attention_order",
    "use_spatial_transformer",
    "transformer_depth",
    "context_dim",
    "n_embed",
    "attn_type",
    "run_without_timestep_conditioning",
    "minor_priority",
    "legacy",
}
_UNET_REQUIRED = {  # name: the value rdm's diffusers UNet has (or None: must be absent / None)
    "use_spatial_transformer": True,
    "transformer_depth": 1,
    "use_scale_shift_norm": False,
    "resblock_updown": False,
    "dims": 2,
    "conv_resample": True,
    "num_classes": None,
    "n_embed": None,
    "run_without_timestep_conditioning": False,
}
_UNET_DEFAULTS = {  # openaimodel.UNetModel's defaults for the checked arguments
    "use_spatial_transformer": False,
    "transformer_depth": 1,
    "use_scale_shift_norm": False,
    "resblock_updown": False,
    "dims": 2,
    "conv_resample": True,
    "num_classes": None,
    "n_embed": None,
    "run_without_timestep_conditioning": False,
    "channel_mult": (1, 2, 4, 8),
    "num_heads": -1,
    "num_head_channels": -1,
    "attn_type": "vanilla",
}
_VQ_KEYS = {"embed_dim", "n_embed", "ddconfig", "lossconfig", "ckpt_path", "ignore_keys"}
_VQ_KEYS |= {"image_key", "colorize_nlabels", "monitor", "batch_resize_range", "scheduler_config"}
_VQ_KEYS |= {"lr_g_factor", "remap", "sane_index_shape"}
_DD_KEYS = {"double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult"}
_DD_KEYS |= {"num_res_blocks", "attn_resolutions", "dropout", "resamp_with_conv"}
_DD_KEYS |= {"give_pre_end", "tanh_out", "use_linear_attn", "attn_type"}


def release_run_config(model: dict, where: str) -> tuple[RunConfig, dict]:
    """(RunConfig, VQModel keyword arguments) of a release ``model`` section
    (:func:`read_release_config`)."""
    params = model["params"]
    unet = dict(params["unet_config"].get("params") or {})
    _unknown(where, "unet_config.params", unet, _UNET_KEYS)
    for key, wanted in _UNET_REQUIRED.items():
        value = unet.get(key, _UNET_DEFAULTS[key])
        if value != wanted:
            raise OfficialImportError(
                f"{where}: unet_config.params.{key} is {value!r}; rdm's diffusers UNet matches "
                f"openaimodel.UNetModel only with {key}: {wanted!r}"
            )
    if unet.get("attn_type", "vanilla") not in ("vanilla", "softmax"):
        raise OfficialImportError(f"{where}: unet attn_type {unet['attn_type']!r} is not supported")
    head_channels = int(unet.get("num_head_channels", -1))
    if head_channels == -1:
        # a fixed head count per level has another head width at every level, which a single
        # ModelConfig.head_dim cannot express
        raise OfficialImportError(
            f"{where}: unet_config.params gives num_heads, not num_head_channels; rdm imports "
            "UNets with a fixed channel width per head (the release's num_head_channels: 32)"
        )
    context_dim = unet.get("context_dim")
    if not isinstance(context_dim, int):
        raise OfficialImportError(
            f"{where}: unet_config.params.context_dim is {context_dim!r}; one integer d expected"
        )
    mult = tuple(int(m) for m in unet.get("channel_mult", _UNET_DEFAULTS["channel_mult"]))
    channels = tuple(int(unet["model_channels"]) * m for m in mult)
    attention = tuple(int(r) for r in unet["attention_resolutions"])
    in_channels, out_channels = int(unet["in_channels"]), int(unet["out_channels"])
    if in_channels != out_channels:
        raise OfficialImportError(
            f"{where}: the UNet has in_channels {in_channels} but out_channels {out_channels}; "
            "rdm's UNet predicts ε with the shape of x_t"
        )

    vq_kwargs, downsample = _vq_kwargs(params["first_stage_config"].get("params") or {}, where)
    if vq_kwargs["vq_embed_dim"] != in_channels:
        raise OfficialImportError(
            f"{where}: the first stage's embed_dim {vq_kwargs['vq_embed_dim']} is not the UNet's "
            f"in_channels {in_channels}"
        )
    latent_size = int(params.get("image_size", unet["image_size"]))
    if latent_size != int(unet["image_size"]):
        raise OfficialImportError(
            f"{where}: model.params.image_size {latent_size} differs from the UNet's image_size "
            f"{unet['image_size']}"
        )
    # scale_by_std: true trains the scale; it is then a checkpoint buffer (import_checkpoint)
    scale = float(params.get("scale_factor", 1.0))

    schedule = params.get("beta_schedule", "linear")
    if schedule not in SCHEDULES or params.get("given_betas") is not None:
        raise OfficialImportError(
            f"{where}: beta_schedule {schedule!r} (given_betas {params.get('given_betas')!r}) is "
            f"not supported; rdm rebuilds {', '.join(SCHEDULES)}"
        )
    parameterization = params.get("parameterization", "eps")
    if parameterization not in PARAMETERIZATIONS:
        raise OfficialImportError(
            f"{where}: parameterization {parameterization!r} is not supported "
            f"({', '.join(PARAMETERIZATIONS)})"
        )
    try:
        model_cfg = ModelConfig(
            resolution=latent_size * downsample,
            in_channels=in_channels,
            block_out_channels=channels,
            # openaimodel: a level gets attention iff its downsample factor ds = 2^level is listed
            attention_levels=tuple(2**level in attention for level in range(len(channels))),
            layers_per_block=int(unet["num_res_blocks"]),
            head_dim=head_channels,
            norm_num_groups=32,  # ldm's normalization() is GroupNorm32(32, channels)
            context_dim=context_dim,
            k=int(params.get("k_nn", 4)),
            null_context="zeros",
            latent=True,
            vae_path=FIRST_STAGE_DIR,  # inside the run (rdm.model.resolve_vae_path)
            vae_scale_factor=scale,
            latent_downsample=downsample,
            first_stage="vq",
        )
        diffusion = DiffusionConfig(
            num_train_timesteps=int(params.get("timesteps", 1000)),
            schedule=SCHEDULES[schedule],
            beta_start=float(params.get("linear_start", 1e-4)),
            beta_end=float(params.get("linear_end", 2e-2)),
            prediction_type=PARAMETERIZATIONS[parameterization],
            clip_sample=False,  # latents are not in [-1, 1]
        )
        cfg = RunConfig(
            preset="official",
            model=model_cfg,
            diffusion=diffusion,
            train=TrainConfig(
                lr=float(model.get("base_learning_rate", 1e-4)),
                p_uncond=float(params.get("p_uncond", 0.0)),  # the release trained without ∅
            ),
            sample=dataclasses.replace(RELEASE_SAMPLING),
        )
    except ConfigError as exc:
        raise OfficialImportError(f"{where}: rdm cannot represent this model ({exc})") from None
    return cfg, vq_kwargs


def _vq_kwargs(vq: dict, where: str) -> tuple[dict, int]:
    """diffusers ``VQModel`` arguments of an LDM ``VQModelInterface`` (and its downsampling)."""
    _unknown(where, "first_stage_config.params", vq, _VQ_KEYS)
    dd = dict(vq.get("ddconfig") or {})
    _unknown(where, "first_stage_config.params.ddconfig", dd, _DD_KEYS)
    problems = []
    if dd.get("double_z", True):
        problems.append("double_z must be false for a VQ model")
    if list(dd.get("attn_resolutions", [])):
        problems.append("attn_resolutions must be [] (diffusers' VQModel has no down/up attention)")
    if vq.get("remap") is not None:
        problems.append("remap (a codebook index remapping) is not supported")
    if dd.get("give_pre_end") or dd.get("tanh_out") or dd.get("use_linear_attn"):
        problems.append("give_pre_end / tanh_out / use_linear_attn are not supported")
    if dd.get("resamp_with_conv", True) is not True:
        problems.append("resamp_with_conv must be true")
    if dd.get("attn_type", "vanilla") != "vanilla":
        problems.append("attn_type must be 'vanilla'")
    if problems:
        raise OfficialImportError(f"{where}: first_stage_config: {'; '.join(problems)}")
    mult = [int(m) for m in dd["ch_mult"]]
    kwargs = {
        "in_channels": int(dd["in_channels"]),
        "out_channels": int(dd["out_ch"]),
        "down_block_types": ["DownEncoderBlock2D"] * len(mult),
        "up_block_types": ["UpDecoderBlock2D"] * len(mult),
        "block_out_channels": [int(dd["ch"]) * m for m in mult],
        "layers_per_block": int(dd["num_res_blocks"]),
        "act_fn": "silu",
        "latent_channels": int(dd["z_channels"]),
        "sample_size": int(dd["resolution"]),
        "num_vq_embeddings": int(vq["n_embed"]),
        "norm_num_groups": 32,
        "vq_embed_dim": int(vq["embed_dim"]),
        # RDM does not rescale its latents (scale_by_std: false -> LatentDiffusion's 1.0); the
        # diffusers default 0.18215 belongs to Stable Diffusion's KL-f8
        "scaling_factor": 1.0,
        "norm_type": "group",
        "mid_block_add_attention": True,
        "lookup_from_codebook": False,
        "force_upcast": False,
    }
    return kwargs, 2 ** (len(mult) - 1)


def _unknown(where: str, section: str, d: dict, known: set[str]) -> None:
    extra = sorted(set(d) - known)
    if extra:
        raise OfficialImportError(
            f"{where}: {section} has keys rdm does not know ({', '.join(extra)}); they may change "
            "the architecture, so the import stops rather than guess"
        )


# --- weights ----------------------------------------------------------------------------------------


def ema_key(raw_key: str) -> str:
    """LitEma's name for ``model.diffusion_model.a.1.b``: ``model_ema.diffusion_modela1b``
    (the wrapper's parameter name with every dot removed)."""
    return EMA_PREFIX + raw_key[len("model.") :].replace(".", "")


def split_state_dict(state: dict, path: Path) -> dict[str, dict]:
    """The checkpoint's entries by role; anything rdm does not convert is refused by name."""
    groups: dict[str, dict] = {"unet": {}, "ema": {}, "vq": {}, "other": {}}
    unknown = []
    for key, value in state.items():
        if key.startswith(UNET_PREFIX):
            groups["unet"][key] = value
        elif key in OTHER_KEYS or key in SCHEDULE_BUFFERS or key == "scale_factor":
            groups["other"][key] = value
        elif key.startswith(EMA_PREFIX):
            groups["ema"][key] = value
        elif key.startswith(VQ_PREFIX):
            groups["vq"][key] = value
        else:
            unknown.append(key)
    if not groups["unet"] or not groups["vq"]:
        raise OfficialImportError(
            f"checkpoint {path} is not an RDM checkpoint: it has {len(groups['unet'])} "
            f"{UNET_PREFIX}* and {len(groups['vq'])} {VQ_PREFIX}* weights (both are needed); "
            "give the release's model.ckpt"
        )
    if unknown:
        shown = ", ".join(unknown[:5]) + (" …" if len(unknown) > 5 else "")
        raise OfficialImportError(
            f"checkpoint {path} holds weights of another architecture that rdm does not convert "
            f"({len(unknown)} entries: {shown}); rdm imports the release's RDMs (UNet + VQ first "
            "stage, identity retrieval encoder)"
        )
    bad = [k for k, v in state.items() if not torch.is_tensor(v)]
    if bad:
        raise OfficialImportError(
            f"checkpoint {path}: entries {', '.join(bad[:5])} are not tensors "
            f"({', '.join(sorted({repr(state[k]) for k in bad[:5]}))}); the file is not what "
            "rdm reads"
        )
    return groups


def unet_state_dict(
    groups: dict[str, dict], cfg: ModelConfig, weights: str, path: Path
) -> dict[str, torch.Tensor]:
    """diffusers ``UNet2DConditionModel`` weights from the raw (``weights="model"``) or the EMA
    (``"ema"``) UNet of the checkpoint."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    raw = groups["unet"]
    if weights == "ema":
        # LitEma's names are the raw ones without dots; diffusers' extract_ema guesses EMA only
        # past 100 EMA tensors, so the EMA set is picked here under the raw names
        missing = [k for k in raw if ema_key(k) not in groups["ema"]]
        if missing:
            raise OfficialImportError(
                f"checkpoint {path} has no EMA copy of {len(missing)} UNet weights (e.g. "
                f"{ema_key(missing[0])}); import the raw weights with --weights model"
            )
        source = {k: groups["ema"][ema_key(k)] for k in raw}
    else:
        source = dict(raw)
    unet_conf = {"layers_per_block": cfg.layers_per_block}
    converted = _quiet(convert_ldm_unet_checkpoint, source, unet_conf)
    empty = sorted(k for k, v in converted.items() if v is None)
    if empty or len(converted) != len(source):
        raise OfficialImportError(
            f"checkpoint {path}: {len(source)} UNet tensors mapped to {len(converted)} diffusers "
            f"names ({len(empty)} empty); the checkpoint's UNet does not have the layout its "
            "config.yaml describes (num_res_blocks, channel_mult, attention_resolutions)"
        )
    return {k: v.float().contiguous() for k, v in converted.items()}


def vq_state_dict(groups: dict[str, dict], vq_kwargs: dict, path: Path) -> dict:
    """diffusers ``VQModel`` weights; ``convert_ldm_vae_checkpoint`` drops the codebook, so
    ``quantize.embedding.weight`` (n_embed, embed_dim) is copied by hand."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vq = groups["vq"]
    codebook_key = VQ_PREFIX + "quantize.embedding.weight"
    if codebook_key not in vq:
        raise OfficialImportError(f"checkpoint {path} has no VQ codebook ({codebook_key})")
    body = {k: v for k, v in vq.items() if not k.startswith(VQ_PREFIX + "quantize.")}
    converted = _quiet(convert_ldm_vae_checkpoint, body, vq_kwargs)
    converted["quantize.embedding.weight"] = vq[codebook_key]
    if any(v is None for v in converted.values()) or len(converted) != len(body) + 1:
        raise OfficialImportError(
            f"checkpoint {path}: {len(body) + 1} first-stage tensors mapped to {len(converted)} "
            "diffusers names; its VQ model does not have the layout config.yaml describes"
        )
    return {k: v.float().contiguous() for k, v in converted.items()}


def _quiet(fn, *args):
    """diffusers' converters log EMA / non-EMA advice meant for its own scripts."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return fn(*args)
    finally:
        logging.set_verbosity(level)


def _load_into(module: torch.nn.Module, state: dict, path: Path, config: Path, what: str) -> None:
    """``module.load_state_dict(state, strict=True, assign=True)``, refusing a mismatch with a
    short account of it (torch's lists every key: thousands of lines for a 400M UNet)."""
    _, problems = state_dict_mismatch(
        module.state_dict(),
        state,
        unexpected_as="not in the config's model",
        shapes_as=("in the checkpoint", "by the config"),
    )
    if problems:
        raise OfficialImportError(
            f"checkpoint {path} does not fit config {config}: of its {what} weights "
            f"{problems}; give the config.yaml released with this checkpoint"
        )
    module.load_state_dict(state, strict=True, assign=True)


def check_schedule(cfg: DiffusionConfig, other: dict, path: Path, config: Path) -> float | None:
    """max |ᾱ_t| difference between the config's schedule and the checkpoint's buffer (None when
    the checkpoint has none); refuses a config whose schedule is not the checkpoint's."""
    from rdm.diffusion import make_scheduler

    stored = other.get("alphas_cumprod")
    if stored is None:
        return None
    ours = make_scheduler(cfg).alphas_cumprod.double()
    if stored.shape != ours.shape:
        raise OfficialImportError(
            f"checkpoint {path} was trained with {stored.shape[0]} timesteps but config {config} "
            f"says {ours.shape[0]}"
        )
    diff = float((stored.double() - ours).abs().max())
    if diff > SCHEDULE_TOLERANCE:
        raise OfficialImportError(
            f"config {config}'s noise schedule ({cfg.schedule} {cfg.beta_start} -> "
            f"{cfg.beta_end}) differs from checkpoint {path}'s alphas_cumprod by {diff:.3g} "
            f"(> {SCHEDULE_TOLERANCE}); give the config.yaml released with this checkpoint"
        )
    return diff


# --- the import -------------------------------------------------------------------------------------


def import_checkpoint(
    ckpt: str | Path,
    config: str | Path,
    out: str | Path,
    *,
    weights: str = "ema",
    encoder: dict | None = None,
    overwrite: bool = False,
) -> ImportReport:
    """Convert the release's ``model.ckpt`` + ``config.yaml`` into the run directory ``out``.

    ``weights``: "ema" (default, what the release samples with), "model" (the raw weights) or
    "both"; each set goes to ``ema.safetensors`` / ``model.safetensors``, as in a trained run.
    ``encoder``: the encoder identity to record, which the run's databases must share; by default
    the release's (OpenAI CLIP ViT-B/32, QuickGELU, the release's preprocessing, d = the UNet's
    context_dim: :func:`rdm.encoders.release_identity`), as an imported release database has.
    The run is written into a temporary directory beside ``out`` and renamed into place."""
    from diffusers import VQModel

    from rdm.checkpoint import save_weights
    from rdm.encoders import release_identity
    from rdm.io import OutputError, replace_dir, require_writable, sha256_file, write_json
    from rdm.model import RetrievalUNet, count_parameters

    if weights not in ("ema", "model", "both"):
        raise OfficialImportError(f"weights={weights!r}: use 'ema', 'model' or 'both'")
    ckpt, config, out = Path(ckpt), Path(config), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OfficialImportError(
            f"--out {out} exists and is not empty; choose a new directory (or --overwrite)"
        )
    model_section = read_release_config(config)
    cfg, vq_kwargs = release_run_config(model_section, f"config {config}")
    state_ckpt, stubbed = load_lightning_checkpoint(ckpt)
    groups = split_state_dict(state_ckpt["state_dict"], ckpt)
    other = groups["other"]
    notes = []
    if "scale_factor" in other:  # scale_by_std: true trains a scale and keeps it as a buffer
        cfg.model.vae_scale_factor = float(other["scale_factor"])
        notes.append(f"latent scale factor {cfg.model.vae_scale_factor:g} (checkpoint buffer)")
    diff = check_schedule(cfg.diffusion, other, ckpt, config)
    if diff is not None:
        notes.append(f"schedule matches the checkpoint's alphas_cumprod (max |diff| {diff:.2g})")
    if "model_ema.decay" in other:  # a float32 scalar: 0.9999 reads back as 0.99989998
        cfg.train.ema_decay = float(f"{float(other['model_ema.decay']):.6g}")
    cfg.encoder = release_identity(cfg.model.context_dim) if encoder is None else dict(encoder)
    if cfg.encoder.get("dim", cfg.model.context_dim) != cfg.model.context_dim:
        raise OfficialImportError(
            f"the encoder to record has d={cfg.encoder['dim']} but checkpoint {ckpt}'s UNet reads "
            f"d={cfg.model.context_dim} (config {config}); give the encoder of its database"
        )
    if "unconditional_guidance_vex" in other:
        notes.append(
            "unconditional_guidance_vex not used: the release guides against the zero context "
            "(rdm_sample.py scales it by 0)"
        )

    sets = ("ema", "model") if weights == "both" else (weights,)
    unets = {}
    for name in sets:
        state = unet_state_dict(groups, cfg.model, name, ckpt)
        with torch.device("meta"):  # no random init of a 400M-parameter UNet
            unet = RetrievalUNet(cfg.model)
        full = {f"unet.{k}": v for k, v in state.items()}
        full["null"] = torch.zeros(cfg.model.k, cfg.model.context_dim)  # the release's ∅
        _load_into(unet, full, ckpt, config, f"UNet ({name})")
        unets[name] = unet
    with torch.device("meta"):
        vq = VQModel(**vq_kwargs)
    _load_into(vq, vq_state_dict(groups, vq_kwargs, ckpt), ckpt, config, "first-stage")

    tmp = require_writable(out.with_name(f".{out.name}.tmp-{os.getpid()}"), is_dir=True)
    try:
        cfg.to_json(tmp / "config.json")  # first: save_weights records each sha256 in it
        for name, unet in unets.items():
            save_weights(unet, tmp / f"{name}.safetensors")
        vq.save_pretrained(tmp / FIRST_STAGE_DIR, safe_serialization=True)
        write_json(
            tmp / "official.json",
            {
                "format": "rdm-official-import/1",
                "checkpoint": {"path": str(ckpt.resolve()), "sha256": sha256_file(ckpt)},
                "config": {"path": str(config.resolve()), "sha256": sha256_file(config)},
                "weights": list(sets),
                "stubbed_globals": stubbed,
                "epoch": _plain(state_ckpt.get("epoch")),
                "global_step": _plain(state_ckpt.get("global_step")),
                "pytorch_lightning_version": _plain(state_ckpt.get("pytorch-lightning_version")),
                "ema_num_updates": _plain(other.get("model_ema.num_updates")),
                "notes": notes,
            },
        )
        if out.exists() and not any(out.iterdir()):
            out.rmdir()
        replace_dir(tmp, out)
    except OSError as exc:
        raise OutputError(
            f"cannot write the run to {out} ({exc.strerror or exc}); choose a writable directory"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cfg.weights_sha256 = RunConfig.from_json(out / "config.json").weights_sha256
    return ImportReport(
        out=out,
        weights=sets,
        stubbed=stubbed,
        unet_parameters=count_parameters(next(iter(unets.values())).unet),
        first_stage_parameters=count_parameters(vq),
        config=cfg,
        notes=notes,
    )


def _plain(value: Any) -> Any:
    """A JSON-able copy of a checkpoint scalar (a 0-d tensor becomes its number)."""
    if torch.is_tensor(value) and value.numel() == 1:
        return value.item()
    if value is None or isinstance(value, (int, float, str, bool)):
        return value
    return "<stub>" if is_stub(value) else repr(value)
