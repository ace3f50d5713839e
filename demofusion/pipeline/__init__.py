"""The DemoFusion pipeline and its algorithm (demofusion/pipeline/algorithm.py; docs/algorithm.md)."""

from .algorithm import (MultiViewDenoiser, PathLayout, Views, blur_for_dilation, cosine_factor, dilated_views,
                        dilation_blur_std, fuse, multidiffusion_views, phase_count, phase_sizes, renormalise,
                        skip_residual, upsample_latents, view_layout)
from .pipeline import DemoFusionOutput, DemoFusionPipeline, Mechanisms, from_pil, to_pil
from .reference import DEFAULT, PRIS_CV, Policy

__all__ = [
    "DemoFusionPipeline", "DemoFusionOutput", "Mechanisms", "MultiViewDenoiser", "PathLayout", "Views",
    "Policy", "DEFAULT", "PRIS_CV", "phase_count", "phase_sizes", "view_layout",
    "upsample_latents", "cosine_factor", "skip_residual", "multidiffusion_views", "dilated_views",
    "blur_for_dilation", "dilation_blur_std", "fuse", "renormalise", "to_pil", "from_pil",
]
