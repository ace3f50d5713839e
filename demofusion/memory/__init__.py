"""Peak GPU memory of every stage of a DemoFusion run, measured on our own modules, without a GPU.

The real UNet, VAE and text encoders are built at SDXL shapes with *fake* CUDA tensors
(``FakeTensorMode``: shapes, dtypes, strides, no data, no arithmetic); the real code runs on them
while a :class:`Tracker` sums the bytes of the live CUDA storages and keeps the maximum. Host work
on ordinary CPU tensors (tile weights, tokenisation) runs for real. Two fixes make fake CUDA act
like real CUDA: attention is routed to the flash / memory-efficient kernels CUDA picks in
fp16/bf16 (:class:`SDPARouter`; the math path fake mode would take materialises the L×L matrix:
2.6 GiB for one 4096-token SDXL call), and a bool read such as ``isfinite(x).all()`` answers True
(the healthy path). What fake tensors cannot see (CUDA context, workspaces, allocator slack) is a
stated :func:`reserve`.

Entry points: :func:`measure`, :func:`unet_call_peak`, :func:`vae_decode_tile_peak`,
:func:`vae_encode_tile_peak`, :func:`text_encode_peak`, :func:`stage_table`.
"""

from ..tensors import weight_bytes
from .fake import (StagePeak, fake_text, fake_unet, fake_vae, text_encode_peak, unet_call_peak,
                   vae_decode_tile_peak, vae_encode_tile_peak)
from .measure import (CUDA_CONTEXT, FRAGMENTATION, WORKSPACES, GiB, MiB, SDPARouter, Tracker, fake_input, fake_mode,
                      measure, on_fake_cuda, reserve, track)
from .stages import (LATENT_COPIES, VIEW_COPIES, Stage, decode_peak, lone_halves, peak, stage_table, unet_calls,
                     view_paths)
