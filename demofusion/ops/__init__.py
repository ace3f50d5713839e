"""Tensor ops behind DemoFusion: MultiDiffusion views, dilated sampling, Gaussian blur."""

from .blur import gaussian_blur, gaussian_kernel1d, match_mean_std
from .dilated import dilate, pad_to_multiple, undilate
from .views import gather_views, jitter_range, jitter_views, local_views, scatter_add_views, view_starts

__all__ = [
    "view_starts", "local_views", "jitter_range", "jitter_views", "gather_views", "scatter_add_views",
    "dilate", "undilate", "pad_to_multiple", "gaussian_kernel1d", "gaussian_blur", "match_mean_std",
]
