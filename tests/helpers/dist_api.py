"""A worker for tests/test_distributed.py: the Python API inside (or outside) a torchrun process group.

    python -m torch.distributed.run --standalone --nproc_per_node N tests/helpers/dist_api.py KIND OUT [CALL]
    python tests/helpers/dist_api.py KIND OUT [CALL]          # the one-process reference

Runs a small pipeline (KIND "sdxl": Euler with CFG 7.5; "turbo": Euler-ancestral, guidance 0; "ab2":
the multistep stand-in of tests/test_multiview_denoiser.py, CFG 7.5; a sampler name such as "unipc":
that sampler on the sdxl pipeline) at a non-square size over 3 phases and saves each rank's latents,
decoded images ([0, 1] tensors) and unet_calls to OUT/rank<r>.pt. CALL: a JSON object of call
arguments replacing the defaults. Several KINDs joined by "," run one after another, each saved to
OUT/<kind>.rank<r>.pt.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository
from tests.helpers.pipeline import small_pipeline  # noqa: E402

kinds, out = sys.argv[1].split(","), sys.argv[2]
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    dist.init_process_group("gloo")
rank = dist.get_rank() if dist.is_initialized() else 0
for kind in kinds:
    pipe = small_pipeline("turbo" if kind == "turbo" else "sdxl")
    if kind == "ab2":
        from tests.test_multiview_denoiser import AdamsBashforth2  # noqa: E402

        pipe.scheduler = AdamsBashforth2(pipe.scheduler)
    elif kind not in ("sdxl", "turbo"):
        pipe.set_scheduler(kind)
    call = dict(height=384, width=256, num_inference_steps=2, guidance_scale=0.0 if kind == "turbo" else 7.5,
                seed=5, stride=8, view_batch_size=3, output_type="pt")
    call.update(json.loads(sys.argv[3]) if len(sys.argv) > 3 else {})
    result = pipe("a castle", **call)
    name = f"rank{rank}.pt" if len(kinds) == 1 else f"{kind}.rank{rank}.pt"
    torch.save({"latents": result.latents, "images": result.images, "unet_calls": result.unet_calls},
               os.path.join(out, name))
if dist.is_initialized():
    dist.destroy_process_group()
