"""The FID Inception-v3, built by the library of the chosen backend from a local file (or the
library's own download), and the resize each backend applies before it.

The weights file is torch-fidelity's layout of the 2015-12-05 TF graph (pytorch-fid and
torchmetrics use the same network). It is checked with ``torch.load(weights_only=True)`` — plain
tensors only — before the library reads it, so no pickle code ever runs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, first_line

INSTALL_HINT = "pip install 'demofusion[eval]' (torch-fidelity, torchmetrics, scipy, matplotlib)"
BACKENDS = ("torch-fidelity", "torchmetrics", "clean-fid")
# the filter that takes a picture to Inception's 299², per backend (recorded in every protocol)
RESIZE = {
    "torch-fidelity": "bilinear, TensorFlow-1.x compatible, no antialias (torch-fidelity, as the original TF FID)",
    "torchmetrics": "bilinear with antialias (torch.nn.functional.interpolate; torchmetrics' default)",
    "clean-fid": "PIL bicubic per channel in float (clean-fid's make_resizer), rounded to uint8",
}
FEATURES = ["2048", "logits_unbiased"]  # pool features (FID, KID) and the logits IS reads
_CACHE: dict = {}


def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_weights(path) -> Path:
    """--inception-weights FILE: present, and a plain-tensor state dict (never unpickled code)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"--inception-weights {p}: no such file; pass the FID Inception weights "
                         "(torch-fidelity's weights-inception-2015-12-05-6726825d.pth)")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code, a truncated or foreign file
        raise InputError(f"--inception-weights {p}: not a plain PyTorch state dict ({first_line(e)[:120]})") from None
    if not isinstance(sd, dict) or "fc.weight" not in sd or "Conv2d_1a_3x3.conv.weight" not in sd:
        raise InputError(f"--inception-weights {p}: not the FID Inception layout (no Conv2d_1a_3x3 / fc tensors)")
    return p


def _library(backend: str):
    try:
        if backend == "torchmetrics":
            from torchmetrics.image.fid import NoTrainInceptionV3 as cls
        else:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3 as cls
        if backend == "clean-fid":
            import cleanfid  # noqa: F401  (its resizer and statistics)
    except ImportError as e:
        raise InputError(f"--backend {backend} needs {e.name}: {INSTALL_HINT}"
                         + (" and pip install clean-fid" if backend == "clean-fid" else "")) from None
    return cls


def feature_net(backend: str, weights, device="cpu", features=tuple(FEATURES)):
    """The library's Inception module for ``backend`` (cached per backend, file and features)."""
    path = None if weights is None else check_weights(weights)
    key = (backend, str(path), str(device), tuple(features))
    if key not in _CACHE:
        cls = _library(backend)
        kwargs = {"antialias": True} if backend == "torchmetrics" else {}
        try:
            net = cls("inception-v3-compat", list(features), feature_extractor_weights_path=None if path is None
                      else str(path), **kwargs)
        except RuntimeError as e:  # load_state_dict: missing / unexpected / mis-shaped tensors
            raise InputError(f"--inception-weights {path}: does not fit the FID Inception "
                             f"({first_line(e)[:160]})") from None
        except OSError as e:  # no --inception-weights and no network: the library's download failed
            raise InputError("no Inception weights: the download failed offline; pass --inception-weights FILE "
                             f"(torch-fidelity's weights-inception-2015-12-05-6726825d.pth) [{type(e).__name__}]") from None
        _CACHE[key] = net.to(device).eval()
    return _CACHE[key]


def weights_sha256(weights) -> str | None:
    """The recorded identity of the Inception weights (the library's cached download when none given)."""
    if weights is not None:
        return sha256_of(check_weights(weights))
    cached = Path(torch.hub.get_dir()) / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    return sha256_of(cached) if cached.is_file() else None


def pil_bicubic_299(batch: torch.Tensor) -> torch.Tensor:
    """clean-fid's resize: each channel in float through PIL bicubic to 299², then uint8 for the net."""
    from cleanfid.resize import make_resizer

    resize = make_resizer("PIL", False, "bicubic", (299, 299))
    out = [np.rint(resize(img.permute(1, 2, 0).numpy())).clip(0, 255).astype(np.uint8) for img in batch]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def features(backend: str, net, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [B, 3, H, W] → (pool features [B, 2048], logits [B, 1008]) on the CPU, float32."""
    if backend == "clean-fid":
        batch = pil_bicubic_299(batch)
    device = next(net.parameters()).device
    batch = batch.to(device)
    # torchmetrics' forward returns only the first feature; its _torch_fidelity_forward (the same net,
    # the antialiased resize) gives both in one pass
    out = net._torch_fidelity_forward(batch) if backend == "torchmetrics" else net(batch)
    return tuple(o.float().reshape(len(batch), -1).cpu() for o in out)
