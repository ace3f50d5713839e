"""CLIP tokenizer and SDXL's two text encoders (CLIP ViT-L/14, OpenCLIP ViT-bigG/14)."""

from .tokenizer import CLIPTokenizer

__all__ = ["CLIPTokenizer"]
