"""DemoFusion's mechanisms, one small function each (re-exported from :mod:`.algorithm`, where
they are defined and read in order), and :class:`Mechanisms`, the swap point for ablations:
``DemoFusionPipeline(..., mechanisms=Mechanisms(fuse=my_fuse))``."""

from .algorithm import (Mechanisms, PathLayout, Views, blur_for_dilation, cosine_factor, dilated_pixels,
                        dilated_views, dilation_blur_std, fuse, merge_dilated, merge_windows, multidiffusion_views,
                        phase_count, phase_sizes, renormalise, skip_residual,
                        upsample_latents, view_layout, whole_view, window_pixels)
from .steps import phase_steps, sampler_evaluations
from .work import unet_evaluations

__all__ = ["Mechanisms", "PathLayout", "Views", "blur_for_dilation", "cosine_factor", "dilated_pixels",
           "dilated_views", "dilation_blur_std", "fuse", "merge_dilated", "merge_windows", "multidiffusion_views",
           "phase_count", "phase_sizes", "phase_steps", "renormalise", "sampler_evaluations", "skip_residual",
           "unet_evaluations", "upsample_latents", "view_layout", "whole_view", "window_pixels"]
