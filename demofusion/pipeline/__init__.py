"""The DemoFusion pipeline and its algorithm (demofusion/pipeline/algorithm.py; docs/algorithm.md).

The package has two layers: the algorithm, the call's checks and the view batching (algorithm.py,
reference.py, settings.py, guards.py, …), which the memory planner (demofusion/memory/) builds
on, and the pipeline class (pipeline.py, decoding.py), which uses that planner. Importing the
package loads only the first; :class:`DemoFusionPipeline`, :class:`DemoFusionOutput`,
:func:`to_pil` and :func:`from_pil` load on first use.
"""

from importlib import import_module

from .algorithm import (Mechanisms, MultiViewDenoiser, PathLayout, Views, blur_for_dilation, cosine_factor,
                        dilated_views, dilation_blur_std, fuse, multidiffusion_views, phase_count, phase_sizes,
                        renormalise, skip_residual, upsample_latents, view_layout)
from .reference import DEFAULT, PRIS_CV, Policy

# name → the module of this package that defines it (above the memory planner: loaded on first use)
_ABOVE_THE_PLANNER = {"DemoFusionPipeline": "pipeline", "DemoFusionOutput": "pipeline", "to_pil": "decoding",
                      "from_pil": "decoding"}

__all__ = [
    "DemoFusionPipeline", "DemoFusionOutput", "Mechanisms", "MultiViewDenoiser", "PathLayout", "Views",
    "Policy", "DEFAULT", "PRIS_CV", "phase_count", "phase_sizes", "view_layout",
    "upsample_latents", "cosine_factor", "skip_residual", "multidiffusion_views", "dilated_views",
    "blur_for_dilation", "dilation_blur_std", "fuse", "renormalise", "to_pil", "from_pil",
]


def __getattr__(name):
    try:
        module = _ABOVE_THE_PLANNER[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(import_module(f"{__name__}.{module}"), name)  # lazy: the pipeline class imports the memory planner, which imports this package
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
