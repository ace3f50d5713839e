"""SDXL / SDXL-Turbo UNet2DCondition as plain PyTorch modules (diffusers weight names)."""

from .config import UNetConfig
from .loading import infer_config, load_unet
from .model import UNet

__all__ = ["UNet", "UNetConfig", "load_unet", "infer_config"]
