"""The DemoFusion pipeline and its mechanisms (one function each; see docs/algorithm.md)."""

from .mechanisms import (Views, blur_for_dilation, cosine_factor, dilated_views, dilation_blur_std, fuse,
                         multidiffusion_views, phase_count, phase_sizes, renormalise, skip_residual,
                         upsample_latents)
from .pipeline import DemoFusionOutput, DemoFusionPipeline, Mechanisms, from_pil, to_pil

__all__ = [
    "DemoFusionPipeline", "DemoFusionOutput", "Mechanisms", "Views", "phase_count", "phase_sizes",
    "upsample_latents", "cosine_factor", "skip_residual", "multidiffusion_views", "dilated_views",
    "blur_for_dilation", "dilation_blur_std", "fuse", "renormalise", "to_pil", "from_pil",
]
