"""A worker for tests/test_parallel.py: the Python API inside (or outside) a torchrun process group.

    python -m torch.distributed.run --standalone --nproc_per_node N tests/helpers/dist_api.py KIND OUT [CALL]
    python tests/helpers/dist_api.py KIND OUT [CALL] [N ...]   # one process; N: split as for N ranks (view_ranks=N)

Runs a small pipeline (KIND "sdxl": Euler with CFG 7.5; "turbo": Euler-ancestral, guidance 0; "ab2":
the multistep stand-in of tests/pipeline/test_multiview_denoiser.py, CFG 7.5; a sampler name such as "unipc":
that sampler on the sdxl pipeline) at a non-square size over 3 phases and saves the latents, decoded
images ([0, 1] tensors), unet_calls and the UNet rows this process really ran to OUT/rank<r>.pt (under
torchrun, or one process without N) or OUT/one<N>.pt. CALL: a JSON object of call arguments replacing
the defaults. Several KINDs joined by "," run one after another, each file prefixed "<kind>.".
"""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository
from tests.helpers.pipeline import small_pipeline  # noqa: E402

kinds, out, args = sys.argv[1].split(","), sys.argv[2], sys.argv[3:]
extra = json.loads(args.pop(0)) if args and args[0].startswith("{") else {}
splits = [int(n) for n in args]
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    dist.init_process_group("gloo")
rank = dist.get_rank() if dist.is_initialized() else 0
for kind in kinds:
    pipe = small_pipeline("turbo" if kind == "turbo" else "sdxl")
    if kind == "ab2":
        from tests.pipeline.test_multiview_denoiser import AdamsBashforth2  # noqa: E402

        pipe.scheduler = AdamsBashforth2(pipe.scheduler)
    elif kind not in ("sdxl", "turbo"):
        pipe.set_scheduler(kind)
    forwards = []
    pipe.unet.register_forward_pre_hook(lambda m, a: forwards.append(a[0].shape[0]))  # rows of each UNet call here
    for n in splits or [None]:
        forwards.clear()
        call = dict(height=384, width=256, num_inference_steps=2, guidance_scale=0.0 if kind == "turbo" else 7.5,
                    seed=5, stride=8, view_batch_size=3, output_type="pt", view_ranks=n)
        call.update(extra)
        result = pipe("a castle", **call)
        name = f"rank{rank}.pt" if n is None else f"one{n}.pt"
        name = name if len(kinds) == 1 else f"{kind}.{name}"
        torch.save({"latents": result.latents, "images": result.images, "unet_calls": result.unet_calls,
                    "rows": sum(forwards)}, os.path.join(out, name))
if dist.is_initialized():
    dist.destroy_process_group()
