"""About a hundred bad inputs to the CLI and the API, table-driven.

Each one gives a one-line error naming the argument (exit 2 on the command line, no traceback, no
file written) or its documented meaning (σ = 0: no blur; guidance ≤ 1: no guidance). Nothing here
runs a generation: every case is refused up front, before any weights are loaded.
"""

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from demofusion.cli import main
from demofusion.errors import InputError
from demofusion.pipeline import DemoFusionPipeline

SMALL = ["--model", "tiny", "--height", "512", "--width", "512", "--steps", "1", "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A folder of awkward things for the CLI to be given."""
    d = tmp_path_factory.mktemp("bad")
    (d / "note.txt").write_text("not a picture")
    (d / "full").mkdir()
    (d / "full" / "photo.png").write_bytes(b"x")
    Image.new("RGB", (64, 64), "red").save(d / "plain.png")
    Image.new("RGB", (64, 64), "red").save(d / "photo.jpg")
    (d / "garbage-model" / "unet").mkdir(parents=True)
    (d / "garbage-model" / "unet" / "config.json").write_text("{not json")
    (d / "random-model" / "unet").mkdir(parents=True)
    (d / "random-model" / "unet" / "config.json").write_text('{"sample_size": 32}')
    (d / "random-model" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(os.urandom(4096))
    (d / "random.safetensors").write_bytes(os.urandom(4096))
    # a real (stopped) run to resume: 256² on tiny is one phase of one step
    run = d / "run"
    assert main(["generate", "--model", "tiny", "--height", "512", "--width", "512", "--steps", "1", "--seed", "3",
                 "--no-progress", "--out", str(run), "--stop-after-phase", "1"]) == 0
    return d


# (argv with {d} for the fixture folder, words the one line must contain)
CLI_CASES = [
    # numbers that are not numbers, or out of range
    (["--sigma", "nan"], ["--sigma", "finite"]),
    (["--sigma", "-1"], ["--sigma"]),
    (["--sigma", "inf"], ["--sigma", "finite"]),
    (["--guidance", "inf"], ["--guidance", "finite"]),
    (["--guidance", "nan"], ["--guidance"]),
    (["--guidance", "-5"], ["--guidance", "-5"]),
    (["--cosine-scale-1", "nan"], ["--cosine-scale-1"]),
    (["--cosine-scale-2", "-50"], ["--cosine-scale-2", "-50"]),
    (["--cosine-scale-3", "inf"], ["--cosine-scale-3"]),
    (["--stride", "0"], ["--stride", "0"]),
    (["--stride", "1000"], ["--stride", "1000"]),
    (["--phases", "0"], ["--phases", "0"]),
    (["--phases", "-1"], ["--phases", "-1"]),
    (["--phases", "100"], ["--phases", "100"]),
    (["--phases", "20"], ["--phases", "half the base"]),
    (["--stop-after-phase", "0"], ["--stop-after-phase", "0"]),
    (["--stop-after-phase", "9"], ["--stop-after-phase", "9"]),
    (["--seed", "-1"], ["--seed", "-1"]),
    (["--seed", str(2**64)], ["--seed"]),
    (["--seed", "1.7"], ["--seed", "1.7"]),
    (["--steps", "0"], ["--steps", "0"]),
    (["--steps", "5000"], ["--steps", "5000"]),
    (["--steps", "ten"], ["--steps", "ten"]),
    (["--view-batch-size", "0"], ["--view-batch-size"]),
    (["--view-batch-size", "2.5"], ["--view-batch-size", "2.5"]),
    (["--height", "100000", "--width", "100000"], ["16384", "--force"]),
    (["--height", "260"], ["--height 260", "multiple of 8"]),
    (["--height", "128"], ["base size 256"]),
    (["--height", "abc"], ["--height", "abc"]),
    (["--width", "-512"], ["width"]),
    (["--phase-sizes", "256by256"], ["--phase-sizes", "HEIGHTxWIDTH"]),
    (["--phase-sizes", "256x256,384x384"], ["end with the target"]),
    (["--phase-sizes", "256x256,260x260,512x512"], ["multiple of 8"]),
    (["--no-local-paths", "--no-dilated-sampling"], ["local_paths", "dilated_sampling"]),
    (["--bogus-flag"], ["--bogus-flag"]),
    # devices, dtypes, compile modes
    (["--device", "banana"], ["--device banana"]),
    (["--device", "cuda:7"], ["--device cuda:7"]),
    (["--device", "tpu"], ["--device tpu"]),
    (["--dtype", "float8"], ["--dtype float8"]),
    (["--compile", "bogus"], ["--compile bogus"]),
    # models
    (["--model", "{d}/nowhere"], ["--model", "not found"]),
    (["--model", "sdxl-base"], ["demofusion download sdxl-base"]),
    (["--model", "{d}/garbage-model", "--height", "1024", "--width", "1024"], ["config.json"]),
    (["--model", "{d}/random-model"], ["diffusion_pytorch_model.safetensors"]),
    (["--model", "{d}/random-model", "--out", "{d}/fresh"], ["diffusion_pytorch_model.safetensors"]),  # no empty --out left
    (["--model", "{d}/random.safetensors", "--height", "1024", "--width", "1024"], ["random.safetensors"]),
    # output folders
    (["--out", "{d}/note.txt"], ["--out", "is a file"]),
    (["--out", "{d}/full"], ["--out", "--overwrite"]),
    (["--out", "{d}/note.txt/sub"], ["--out"]),
    # images in, images to replay
    (["--from-image", "{d}/missing.png"], ["--from-image", "no such file"]),
    (["--from-image", "{d}/note.txt"], ["--from-image", "note.txt"]),
    (["--from-image", "{d}/plain.png"], ["--from-image", "no demofusion metadata"]),
    (["--from-image", "{d}/photo.jpg"], ["--from-image", "JPEG"]),
    (["--image", "{d}/missing.png"], ["--image", "no such file"]),
    (["--image", "{d}/note.txt"], ["--image", "not an image"]),
    (["--image", "{d}/photo.jpg", "--scale", "0"], ["--scale"]),
    (["--image", "{d}/photo.jpg", "--out", "{d}"], ["--out"]),
    (["--scale", "2"], ["--scale", "--image"]),
    (["--dry-run", "--out", "{d}/full"], ["--out", "--overwrite"]),
    (["--dry-run", "--out", "{d}/note.txt/sub"], ["--out", "cannot create"]),
    # resuming
    (["--resume", "{d}/nowhere"], ["--resume", "run.json"]),
    (["--resume", "{d}/run", "--seed", "5"], ["--seed 5", "conflicts"]),
    (["--resume", "{d}/run", "--steps", "9"], ["--num-inference-steps 9", "conflicts"]),
    (["--resume", "{d}/run", "--out", "{d}/elsewhere"], ["--out", "--resume"]),
    (["--resume", "{d}/run", "--from-image", "{d}/plain.png"], ["--resume", "--from-image"]),
]

OTHER_COMMANDS = [
    (["ablate", *SMALL, "--grid", "bogus"], ["--grid", "bogus"]),
    (["ablate", *SMALL, "--grid", ","], ["--grid"]),
    (["ablate", *SMALL, "--sweep", "sigma=abc"], ["--sweep", "sigma=abc"]),
    (["ablate", *SMALL, "--sweep", "nope=1"], ["--sweep", "nope"]),
    (["ablate", *SMALL, "--sweep", "sigma"], ["--sweep", "KNOB="]),
    (["ablate", *SMALL, "--sweep", "sigma="], ["--sweep", "no values"]),
    (["ablate", *SMALL, "--sweep", "stride=0"], ["cell stride=0", "--stride"]),
    (["ablate", *SMALL, "--sweep", "guidance_scale=-1"], ["cell guidance_scale=-1", "--guidance"]),
    (["ablate", *SMALL, "--sweep", "cosine_scale_2=1,-50"], ["cell cosine_scale_2=-50"]),
    (["ablate", *SMALL, "--out", "{d}/full"], ["--out", "--overwrite"]),
    (["inspect", "{d}/nowhere"], ["nowhere"]),
    (["inspect", "{d}/random.safetensors"], ["random.safetensors"]),
    (["inspect", "{d}/note.txt"], ["note.txt"]),
    (["upscale", "{d}/missing.png"], ["--image", "no such file"]),
    (["upscale", "{d}/photo.jpg", "--model", "tiny", "--scale", "-2"], ["--scale"]),
    (["upscale", "{d}/photo.jpg", "--model", "tiny", "--height", "100"], ["multiple of 8"]),
    (["download", "sdxl-nope"], ["sdxl-nope"]),
    ([], ["command"]),
]


def _one_line_error(capsys, argv, words, d, code=2):
    argv = [a.replace("{d}", str(d)) for a in argv]
    before = sorted(p.name for p in d.rglob("*"))
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == code, (argv, rc, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w.replace("{d}", str(d)) in lines[0], (w, lines[0])
    assert sorted(p.name for p in d.rglob("*")) == before, "a refused command wrote files"


@pytest.mark.parametrize("argv, words", CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_generate_refuses_with_one_line(files, capsys, monkeypatch, tmp_path, argv, words):
    monkeypatch.chdir(tmp_path)  # a default out/ folder would land here: it must not appear
    first = [] if "--model" in argv else ["--model", "tiny"]
    sizes = [] if {"--height", "--width", "--resume"} & set(argv) else ["--height", "512", "--width", "512"]
    _one_line_error(capsys, ["generate", *first, *sizes, "--no-progress", *argv], words, files)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, words", OTHER_COMMANDS, ids=[" ".join(a) or "(none)" for a, _ in OTHER_COMMANDS])
def test_other_commands_refuse_with_one_line(files, capsys, monkeypatch, tmp_path, argv, words):
    monkeypatch.chdir(tmp_path)
    _one_line_error(capsys, argv, words, files)
    assert not (tmp_path / "out").exists()


def test_resume_refusal_leaves_the_run_as_it_was(files, capsys):
    run = files / "run"
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(["generate", "--resume", str(run), "--seed", "5"]) == 2
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


# ---- the API: the same checks, raised as InputError (a ValueError) -------------------------------
@pytest.fixture(scope="module")
def pipe():
    return DemoFusionPipeline.from_pretrained("tiny")


def _z(*shape, fill=None):
    z = torch.zeros(shape)
    return z.fill_(fill) if fill is not None else z


API_CASES = [
    (dict(height="512"), "height"),
    (dict(width=512.5), "width"),
    (dict(height=None), "height"),
    (dict(prompt=None), "prompt"),
    (dict(prompt=5), "prompt"),
    (dict(prompt=[]), "prompt"),
    (dict(prompt=["a", 3]), "prompt"),
    (dict(negative_prompt=3), "negative_prompt"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt"),
    (dict(prompt_2=7), "prompt_2"),
    (dict(view_batch_size=2.5), "view_batch_size"),
    (dict(view_batch_size=0), "view_batch_size"),
    (dict(seed=1.7), "seed"),
    (dict(seed=-1), "seed"),
    (dict(seed=True), "seed"),
    (dict(seed="0"), "seed"),
    (dict(guidance_scale=-5), "guidance_scale"),
    (dict(guidance_scale=math.nan), "guidance_scale"),
    (dict(guidance_scale="7"), "guidance_scale"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(num_inference_steps=2.5), "num_inference_steps"),
    (dict(output_type="np"), "output_type"),
    (dict(sigma=-0.1), "sigma"),
    (dict(sigma=math.inf), "sigma"),
    (dict(cosine_scale_1=math.nan), "cosine_scale_1"),
    (dict(cosine_scale_2=-50), "cosine_scale_2"),
    (dict(stride=0), "stride"),
    (dict(stride=33), "stride"),
    (dict(phases=0), "phases"),
    (dict(phases=2.5), "phases"),
    (dict(phases=20), "phase 1"),
    (dict(base_size=100), "base_size"),
    (dict(height=100000, width=100000), "force"),
    (dict(phase_sizes="abc"), "phase_sizes"),
    (dict(phase_sizes=[(256, 256)]), "phase_sizes"),
    (dict(callback=5), "callback"),
    (dict(on_phase_end="print"), "on_phase_end"),
    (dict(multi_decoder="yes"), "multi_decoder"),
    (dict(reference_compat=1), "reference_compat"),
    (dict(image="/nonexistent/photo.png"), "image"),
    (dict(image=_z(1, 3, 64, 64, fill=255.0)), "image"),
    (dict(image=_z(1, 3, 64, 64, fill=math.nan)), "image"),
    (dict(image=_z(1, 4, 64, 64)), "image"),
    (dict(image=42), "image"),
    (dict(latents=_z(1, 4, 32, 32, fill=math.nan)), "latents"),
    (dict(latents=_z(1, 4, 16, 16)), "latents"),
    (dict(latents=np.zeros((1, 4, 32, 32))), "latents"),
    (dict(latents=_z(1, 4, 32, 32), image=Image.new("RGB", (64, 64))), "latents"),
    (dict(upscale_noise=[_z(1, 4, 64, 64)] * 3), "upscale_noise"),
    (dict(upscale_noise=[_z(1, 4, 64, 64, fill=math.inf)]), "upscale_noise"),
    (dict(resume_latents=[_z(1, 4, 32, 32, fill=math.nan)]), "resume_latents"),
    (dict(resume_latents=[_z(1, 4, 32, 32)] * 5), "resume_latents"),
]


@pytest.mark.parametrize("kwargs, name", API_CASES, ids=[f"{next(iter(k))}-{i}" for i, (k, _) in enumerate(API_CASES)])
def test_api_refuses_naming_the_argument(pipe, kwargs, name):
    kw = dict(prompt="x", height=512, width=512, num_inference_steps=1, output_type="latent") | kwargs
    prompt = kw.pop("prompt")
    with pytest.raises(InputError) as e:
        pipe(prompt, **kw)
    msg = str(e.value)
    assert "\n" not in msg and name in msg, msg
    assert isinstance(e.value, ValueError)  # callers catching ValueError keep working


def test_enough_cases():
    assert len(CLI_CASES) + len(OTHER_COMMANDS) + len(API_CASES) >= 100
