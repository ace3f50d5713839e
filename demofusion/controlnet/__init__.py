"""SDXL ControlNet as a plain PyTorch module (diffusers weight names); docs/components.md, ControlNet."""

from .loading import infer_controlnet_config, load_controlnet
from .model import ControlNet, ControlNetConditioningEmbedding, ControlNetConfig

__all__ = ["ControlNet", "ControlNetConfig", "ControlNetConditioningEmbedding", "load_controlnet",
           "infer_controlnet_config"]
