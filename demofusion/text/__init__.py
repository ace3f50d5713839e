"""CLIP tokenizer and SDXL's two text encoders (CLIP ViT-L/14, OpenCLIP ViT-bigG/14)."""

from .clip import CLIPTextConfig, CLIPTextModel, CLIPTextOutput
from .encoders import TextEncoders, load_text_encoder, load_text_encoders
from .tokenizer import CLIPTokenizer

__all__ = [
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTextOutput",
    "CLIPTokenizer",
    "TextEncoders",
    "load_text_encoder",
    "load_text_encoders",
]
