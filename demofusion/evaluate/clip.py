"""CLIP score (prompt ↔ picture) by torchmetrics' ``CLIPScore``: 100 · cos(image, text), floored at
0, averaged over the pictures. The CLIP model is a transformers ``CLIPModel`` + ``CLIPProcessor``
read from a local folder (``--clip-model DIR``), or a hub name that transformers downloads."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from ..errors import InputError, first_line
from .inception import INSTALL_HINT

_CACHE: dict = {}


def _is_hub_name(name: str) -> bool:
    return not Path(name).expanduser().exists() and name.count("/") == 1 and not name.startswith((".", "/", "~"))


def clip_loader(model: str):
    """A loader for torchmetrics (it takes a callable returning (model, processor) for any source)."""
    path = Path(model).expanduser()
    if not _is_hub_name(model) and not (path / "config.json").is_file():
        raise InputError(f"--clip-model {path}: no CLIP model there (a folder with config.json, the weights and "
                         "the processor's files, as transformers' CLIPModel.save_pretrained writes it)")
    return partial(_load, model if _is_hub_name(model) else str(path))


class Embeddings(torch.nn.Module):
    """A CLIPModel whose get_image_features / get_text_features return the projected embeddings as a
    tensor under every transformers version: transformers 5 returns an output object (the embeddings
    in ``pooler_output``), which torchmetrics' CLIPScore (1.9) cannot read."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs):
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def _load(source: str):
    from transformers import CLIPModel, CLIPProcessor

    try:
        return Embeddings(CLIPModel.from_pretrained(source).eval()), CLIPProcessor.from_pretrained(source)
    except OSError as e:  # offline, or an incomplete folder
        raise InputError(f"--clip-model {source}: cannot load it ({first_line(e)[:160]})") from None


def clip_metric(model: str, device="cpu"):
    """torchmetrics' CLIPScore on ``model`` (cached: ablate scores every cell with one model)."""
    key = (model, str(device))
    if key not in _CACHE:
        try:
            from torchmetrics.multimodal.clip_score import CLIPScore
        except ImportError as e:
            raise InputError(f"CLIP score needs {e.name}: {INSTALL_HINT} and transformers") from None
        _CACHE[key] = CLIPScore(model_name_or_path=clip_loader(model)).to(device)
    metric = _CACHE[key]
    metric.reset()
    return metric


@torch.no_grad()
def clip_score(pictures, prompts: list[str], model: str, device="cpu") -> float:
    """``pictures``: an iterable of uint8 [3, H, W] in prompt order (read one at a time)."""
    metric = clip_metric(model, device)
    for image, prompt in zip(pictures, prompts):
        metric.update(image.unsqueeze(0).to(device), [prompt])
    return float(metric.compute())
