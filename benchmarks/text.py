"""Text path cost: tokenizer throughput and SDXL text-encoder forward, ours vs transformers.

    flock /tmp/df-bigmem.lock python benchmarks/text.py [--device cpu] [--dtype fp32] [--batch 2]

The encoders are built at SDXL's real sizes (CLIP ViT-L 123 M + bigG 695 M parameters) with
random weights; ours *share* transformers' tensors (assigned, not copied), so both run on the
same numbers and the run needs ~3.3 GB (fp32) only once. ``--layers N`` shortens both.
"""

import argparse
import warnings

import torch

from shared import seconds_per_call

from demofusion.text import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from demofusion.text.convert import from_transformers
from demofusion.weights import build_and_load, parse_dtype

PROMPTS = [
    "a photo of an astronaut riding a horse on mars, highly detailed, 8k",
    "Émoji 🤖!! café & naïve résumé, 3.14159, (((masterpiece))), trending on artstation",
    "word " * 90,
]


def bench_tokenizer(reps):
    from transformers import CLIPTokenizer as HFTok  # reference only (benchmark script)
    import tempfile

    ours = CLIPTokenizer.from_open_clip()
    with tempfile.TemporaryDirectory() as d:
        ours.save(d)
        ref = HFTok.from_pretrained(d)
    prompts = PROMPTS * 10

    def run_ours():
        ours._cache.clear()  # cold cache: every prompt BPE'd from scratch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours(prompts)

    def run_ref():
        ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")

    n = len(prompts)
    return {k: n / seconds_per_call(f, reps, lambda: None) for k, f in (("ours", run_ours), ("transformers", run_ref))}


def bench_encoder(name, hf_cls, layers, device, dtype, batch, reps):
    from transformers import CLIPTextConfig as HFConfig

    cfg = CLIPTextConfig.preset(name, **({"num_hidden_layers": layers} if layers else {}))
    hf_cfg = HFConfig(**{k: v for k, v in cfg.to_dict().items() if v is not None}, eos_token_id=2)
    torch.manual_seed(0)
    ref = hf_cls(hf_cfg).to(device=device, dtype=dtype).eval()  # transformers' own random init
    ours = build_and_load(lambda: CLIPTextModel(cfg), from_transformers(ref.state_dict()), name)
    ids = CLIPTokenizer.from_open_clip()(PROMPTS[:1] * batch).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.no_grad():
        t_ours = seconds_per_call(lambda: ours(ids), reps, sync)
        t_ref = seconds_per_call(lambda: ref(input_ids=ids, output_hidden_states=True), reps, sync)
        err = (ours(ids).hidden_states[-2] - ref(input_ids=ids, output_hidden_states=True).hidden_states[-2]).abs().max()
    return t_ours, t_ref, float(err)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--layers", type=int, default=0, help="0: the real depth (12 / 32)")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    from transformers import CLIPTextModel as HFModel, CLIPTextModelWithProjection

    tok = bench_tokenizer(a.reps)
    print(f"tokenizer (cold BPE cache): ours {tok['ours']:.0f} prompts/s, transformers {tok['transformers']:.0f} prompts/s")
    dtype = parse_dtype(a.dtype)
    for name, cls in (("clip-l", HFModel), ("bigg", CLIPTextModelWithProjection)):
        t_ours, t_ref, err = bench_encoder(name, cls, a.layers, a.device, dtype, a.batch, a.reps)
        print(f"{name} batch {a.batch} {a.dtype} {a.device}: ours {t_ours * 1e3:.0f} ms, "
              f"transformers {t_ref * 1e3:.0f} ms (penultimate max|Δ| {err:.1e})")


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main()
