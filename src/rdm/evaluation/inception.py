"""The FID Inception network: torchvision's inception_v3 layout with TensorFlow's pooling.

FID (Heusel et al. 2017) is defined on the 2048-d pool3 features of the TensorFlow graph
``inception-2015-12-05``. Its PyTorch port (pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``)
is a state dict for torchvision's ``Inception3`` with a 1008-class ``fc`` and no auxiliary head,
run with three differences from torchvision's blocks, all in the pooling branch:

- Mixed_5b-d, 6b-e (InceptionA / C) and Mixed_7b (InceptionE): average pooling that leaves the
  zero padding out of the average (TensorFlow's ``count_include_pad=False``);
- Mixed_7c (InceptionE): max pooling instead of average pooling.

Inputs are bilinearly resized to 299 x 299 and scaled to [-1, 1], as in pytorch-fid and
torch-fidelity. The weights cannot be downloaded here: they are read from a local file.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rdm.checkpoint import state_dict_mismatch
from rdm.errors import RdmError

WEIGHTS_ENV = "RDM_INCEPTION_WEIGHTS"
WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_HINT = (
    f"the FID Inception weights {WEIGHTS_NAME} (github.com/mseitzer/pytorch-fid releases, "
    "'fid_weights'), copied to this machine"
)
INPUT_SIZE = 299
DIM = 2048  # pool3


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _tf_max_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def _with_pool(block: nn.Module, pool) -> nn.Module:
    """Make ``block``'s pooling branch read ``pool(x)``; every other branch is torchvision's.

    torchvision's blocks return their branch outputs as a list from ``_forward`` with the pooling
    branch last; only that entry is recomputed (one extra 1x1 convolution per block).
    """
    inner = block._forward

    def _forward(x: torch.Tensor) -> list[torch.Tensor]:
        outputs = inner(x)
        outputs[-1] = block.branch_pool(pool(x))
        return outputs

    block._forward = _forward
    return block


def fid_inception_v3() -> nn.Module:
    """Random-initialised FID Inception (load weights with :func:`load_weights`)."""
    from torchvision.models import inception_v3

    net = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    for name in (
        "Mixed_5b",
        "Mixed_5c",
        "Mixed_5d",
        "Mixed_6b",
        "Mixed_6c",
        "Mixed_6d",
        "Mixed_6e",
    ):
        _with_pool(getattr(net, name), _tf_avg_pool)
    _with_pool(net.Mixed_7b, _tf_avg_pool)
    _with_pool(net.Mixed_7c, _tf_max_pool)
    return net.eval()


def pool3(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (B, 3, H, W) -> pool3 features (B, 2048)."""
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1"):
        x = getattr(net, name)(x)
    for name in ("Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2"):
        x = getattr(net, name)(x)
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c"):
        x = getattr(net, name)(x)
    for name in ("Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
        x = getattr(net, name)(x)
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict of this layout, for tests and benchmarks (the real weights cannot be
    downloaded here): He-scaled convolutions, identity BatchNorm, so activations stay finite."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in fid_inception_v3().state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.zeros((), dtype=torch.int64)
        elif k.endswith(("running_mean", "bias")):
            state[k] = torch.zeros(shape)
        elif k.endswith(("running_var", "bn.weight")):
            state[k] = torch.ones(shape)
        else:  # convolution and fc weights, (out, in, ...)
            fan_in = int(torch.tensor(shape[1:]).prod())
            state[k] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    return state


def resolve_weights(path: str | Path | None) -> Path:
    """The weights file from the argument, else ``$RDM_INCEPTION_WEIGHTS``; refuse when neither."""
    import os

    given = path or os.environ.get(WEIGHTS_ENV)
    if not given:
        raise RdmError(
            f"--features inception needs {WEIGHTS_HINT}: pass --inception-weights PATH or set "
            f"{WEIGHTS_ENV}=PATH (it cannot be downloaded at run time)"
        )
    p = Path(given).expanduser()
    if not p.is_file():
        raise RdmError(f"Inception weights file {p} does not exist; give {WEIGHTS_HINT}")
    return p


def load(path: Path) -> nn.Module:
    """The FID Inception with the weights of ``path`` (a ``.pth`` state dict read with
    ``weights_only``, or ``.safetensors``); refuses any other layout, naming what differs.

    The network is built on the meta device and the file's tensors are assigned into it, so no
    random initialisation of its 24M parameters is computed only to be overwritten.
    """
    with torch.device("meta"):
        net = fid_inception_v3()
    state = _read_state_dict(path)
    unexpected, problem = state_dict_mismatch(net.state_dict(), state, examples=3)
    if problem:
        if "AuxLogits.fc.weight" in unexpected:
            problem = (
                "it has an auxiliary head: torchvision's ImageNet inception_v3, not the FID weights"
            )
        raise RdmError(f"{path} is not the FID Inception layout: {problem}; give {WEIGHTS_HINT}")
    net.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, assign=True
    )
    return net.eval()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as exc:
            raise RdmError(f"cannot read Inception weights {path}: {exc}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        # weights_only refuses pickled objects other than tensors: not a plain state dict
        reason = str(exc).splitlines()[0]
        raise RdmError(f"cannot read Inception weights {path} as a state dict: {reason}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RdmError(f"{path} does not hold a state dict of tensors; give {WEIGHTS_HINT}")
    return state
