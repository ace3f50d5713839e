"""A worker for tests/test_distributed.py: the Python API inside (or outside) a torchrun process group.

    python -m torch.distributed.run --standalone --nproc_per_node N tests/helpers/dist_api.py KIND OUT
    python tests/helpers/dist_api.py KIND OUT N [N ...]   # one process split for N ranks (view_ranks=N), each N

Runs a small pipeline (KIND "sdxl": Euler with CFG 7.5; "turbo": Euler-ancestral, guidance 0; "ab2":
the multistep stand-in of tests/test_multiview_denoiser.py, CFG 7.5) at a non-square size over 3 phases and
saves the latents, decoded images ([0, 1] tensors), unet_calls and the UNet forwards this process really
ran to OUT/rank<r>.pt (under torchrun) or OUT/one<N>.pt.
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository
from tests.helpers.pipeline import small_pipeline  # noqa: E402

kind, out, splits = sys.argv[1], sys.argv[2], [int(n) for n in sys.argv[3:]]
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    dist.init_process_group("gloo")
pipe = small_pipeline("turbo" if kind == "turbo" else "sdxl")
if kind == "ab2":
    from tests.test_multiview_denoiser import AdamsBashforth2  # noqa: E402

    pipe.scheduler = AdamsBashforth2(pipe.scheduler)
forwards = []
pipe.unet.register_forward_pre_hook(lambda m, a: forwards.append(a[0].shape[0]))  # rows of each UNet call here
for n in splits or [None]:
    forwards.clear()
    result = pipe("a castle", height=384, width=256, num_inference_steps=2,
                  guidance_scale=0.0 if kind == "turbo" else 7.5, seed=5, stride=8, view_batch_size=3,
                  output_type="pt", view_ranks=n)
    name = f"rank{dist.get_rank()}.pt" if dist.is_initialized() else f"one{n}.pt"
    torch.save({"latents": result.latents, "images": result.images, "unet_calls": result.unet_calls,
                "rows": sum(forwards)}, os.path.join(out, name))
if dist.is_initialized():
    dist.destroy_process_group()
