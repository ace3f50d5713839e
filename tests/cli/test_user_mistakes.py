"""What a new user broke (a tiny σ, NaN, closed pipes, ASCII terminals, bad LoRA scales and files,
replayed PNG fields, `inspect`, float16 on the CPU, …): each case is the outcome the user sees —
exit code, exactly one `error:` line (none for a closed pipe), no traceback, nothing written — on
the tiny model and tiny files."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from demofusion.cli import main

SMALL = ["--model", "tiny", "--height", "512", "--width", "512", "--steps", "1", "--no-progress"]


def one_error(capsys, argv, *words, code=2) -> str:
    """Run the CLI in-process; exactly one `error:` line holding ``words``, exit ``code``."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith(("warning:", "note:"))]
    assert rc == code, (rc, err)
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "internal error" not in lines[0], lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# ---- a tiny σ is the limit (no blur), never NaN -------------------------------------------------
@pytest.mark.parametrize("std", [1e-30, 1e-200, torch.tensor(1e-30), torch.tensor(1e-44)])
def test_tiny_sigma_kernel_is_the_identity(std):
    from demofusion.ops.blur import gaussian_blur, gaussian_kernel1d

    for dtype in (torch.float32, torch.float16):
        assert torch.equal(gaussian_kernel1d(5, std, dtype=dtype), torch.tensor([0, 0, 1, 0, 0], dtype=dtype))
    x = torch.randn(1, 4, 9, 9)
    assert torch.equal(gaussian_blur(x, 5, std), x)


def test_tiny_sigma_runs_to_a_finite_picture(tmp_path, capsys):
    out = tmp_path / "run"
    # stride = window: few views, the dilated (blurred) path of phase 2 all the same
    assert main(["generate", *SMALL, "--stride", "32", "--sigma", "1e-30", "--out", str(out)]) == 0, capsys.readouterr().err
    picture = np.asarray(Image.open(out / "phase_2.png"))
    assert picture.std() > 0  # a picture, not a constant (NaN-derived) one


def test_nan_message_does_not_only_blame_the_weights():
    from demofusion.pipeline.guards import likely_cause

    cause = likely_cause(torch.float32)
    assert cause.index("setting") < cause.index("weights")


# ---- closed pipe, ASCII terminals ----------------------------------------------------------------
@pytest.mark.parametrize("argv, unbuffered", [("generate --dry-run --height 512 --width 512", "1"), ("inspect tiny", "")])
def test_closed_pipe_exits_quietly(tmp_path, argv, unbuffered):
    # `| true`: the reader is gone before the first write (`| head -1` with a slower reader)
    cmd = f"{sys.executable} -m demofusion {argv}"
    r = subprocess.run(f"set -o pipefail; {cmd} | true; echo rc=$?", shell=True, executable="/bin/bash",
                       capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": os.getcwd(), "PYTHONUNBUFFERED": unbuffered})
    assert r.stdout == "rc=141\n", r.stdout
    assert r.stderr == "", r.stderr  # no error line, no "Exception ignored", no traceback


def test_ascii_terminal_gets_x_for_times(monkeypatch):
    out, err = (io.TextIOWrapper(io.BytesIO(), encoding="ascii") for _ in range(2))
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    assert main(["generate", "--help"]) == 0
    # --force passes the 16384 px side limit, so the phase-count error (which has a "×") speaks
    assert main(["generate", "--model", "tiny", "--height", "100000", "--width", "100000", "--force"]) == 2
    out.flush(), err.flush()
    assert "image size x --scale" in out.buffer.getvalue().decode("ascii")
    lines = err.buffer.getvalue().decode("ascii").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "100000x100000 px" in lines[0], lines


# ---- a bad DEMOFUSION_DIST_TIMEOUT ---------------------------------------------------------------
def test_bad_dist_timeout_never_breaks_version_and_is_one_line_in_a_run(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("DEMOFUSION_DIST_TIMEOUT", "abc")
    assert main(["--version"]) == 0 and "demofusion" in capsys.readouterr().out
    r = subprocess.run([sys.executable, "-m", "demofusion", "--version"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode == 0 and r.stderr == "", r.stderr
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun: the value is read when the run joins
    one_error(capsys, ["generate", *SMALL, "--out", tmp_path / "o"], "DEMOFUSION_DIST_TIMEOUT=abc", "seconds")
    assert not (tmp_path / "o").exists()


# ---- files: a tiny model folder, LoRAs, a UNet alone, pickles -------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from PIL.PngImagePlugin import PngInfo
    from safetensors.torch import save_file

    from demofusion.pipeline import DemoFusionPipeline

    d = tmp_path_factory.mktemp("files")
    pipe = DemoFusionPipeline.from_pretrained("tiny")
    pipe.save_pretrained(d / "tiny-model")
    down, up = "lora_unet_time_embedding_linear_1.lora_down.weight", "lora_unet_time_embedding_linear_1.lora_up.weight"
    g = torch.Generator().manual_seed(0)
    save_file({down: torch.randn(2, 32, generator=g), up: torch.randn(128, 2, generator=g)}, str(d / "style.safetensors"))
    save_file({down: torch.full((2, 32), float("nan")), up: torch.randn(128, 2, generator=g)}, str(d / "nan.safetensors"))
    (d / "style.pt").write_bytes(b"\x80\x02 a pickle")  # never opened
    (d / "only-unet").mkdir()
    (d / "only-unet" / "unet").symlink_to(d / "tiny-model" / "unet")
    (d / "etc").mkdir()
    (d / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")

    def png(name, **fields):
        from demofusion.frontend.runs import defaults

        info = PngInfo()
        info.add_text("demofusion", __import__("json").dumps({**defaults(), "height": 512, "width": 512,
                                                               "num_inference_steps": 1, **fields}))
        Image.new("RGB", (64, 64)).save(d / name, pnginfo=info)
        return d / name

    return d, pipe, png


UNET = "tiny-model/unet/diffusion_pytorch_model.safetensors"
DRY = ["generate", "--dry-run", "--height", "512", "--width", "512"]


# ---- LoRA scales and LoRA values -------------------------------------------------------------------
@pytest.mark.parametrize("scale", ["nan", "inf", "1e30", "-11"])
def test_lora_scale_outside_the_range_is_refused_before_anything(files, capsys, tmp_path, scale):
    d, _, _ = files
    one_error(capsys, [*DRY, "--lora", f"{d}/style.safetensors:{scale}"], "--lora", "scale", "-10 … 10")
    one_error(capsys, ["generate", *SMALL, "--lora", f"{d}/style.safetensors:{scale}", "--out", tmp_path / "o"],
              "finite number in -10 … 10")
    assert not (tmp_path / "o").exists()


def test_api_refuses_nan_scale_and_nan_lora_leaving_weights_as_they_were(files):
    from demofusion.lora import LoraError

    d, pipe, _ = files
    before = pipe.unet.time_embedding.linear_1.weight.detach().clone()
    for scale in (float("nan"), 1e30, "abc"):
        with pytest.raises(LoraError, match="LoRA scale"):
            pipe.load_lora(d / "style.safetensors", scale)
    with pytest.raises(LoraError, match="NaN/Inf") as e:
        pipe.load_lora(d / "nan.safetensors")
    assert "\n" not in str(e.value) and "lora_unet_time_embedding_linear_1.lora_down.weight" in str(e.value)
    assert torch.equal(pipe.unet.time_embedding.linear_1.weight, before) and pipe.loras.loaded == {}
    name = pipe.load_lora(d / "style.safetensors", 10)  # the edge of the range is allowed
    pipe.loras.unload(pipe._lora_targets(), name)
    assert torch.equal(pipe.unet.time_embedding.linear_1.weight, before)


def test_nan_lora_file_is_one_line_from_the_cli(files, capsys, tmp_path):
    d, _, _ = files
    one_error(capsys, ["generate", *SMALL, "--lora", d / "nan.safetensors", "--out", tmp_path / "o"],
              "nan.safetensors", "NaN/Inf", "re-download")


# ---- each flag gets what it takes, said before any weights load -----------------------------------
@pytest.mark.parametrize("argv, words", [
    (["--model", "{d}/etc", "--height", "1024", "--width", "1024"], ["--model {d}/etc", "without weights", "diffusers folder"]),
    (["--model", "{d}/only-unet"], ["--model", "no vae/ folder"]),
    (["--model", "{d}/" + UNET], ["--model", "a UNet alone", "--model takes an SDXL model"]),
    (["--model", "{d}/style.safetensors"], ["--model", "this is a LoRA (use it as --lora FILE[:SCALE])"]),
    (["--vae", "/nonexistent"], ["--vae /nonexistent", "does not exist", "--vae takes a VAE"]),
    (["--vae", "{d}/" + UNET], ["--vae", "a UNet alone", "--vae takes a VAE"]),
    (["--vae", "{d}/style.safetensors"], ["--vae", "a LoRA", "--vae takes a VAE"]),
    (["--vae", "{d}/etc/passwd"], ["--vae {d}/etc/passwd", "not a safetensors file"]),
    (["--lora", "{d}/style.pt"], ["--lora", "pickle", "never opened"]),
    (["--lora", "{d}/" + UNET], ["--lora", "a UNet alone", "--lora takes a LoRA"]),
    (["--lora", "{d}/tiny-model/vae/diffusion_pytorch_model.safetensors"], ["--lora", "a VAE (use it as --vae PATH)"]),
    (["--controlnet", "{d}/style.safetensors", "--control-image", "{d}/pic.png"], ["--controlnet", "a LoRA",
                                                                                  "--controlnet takes"]),
    (["--controlnet", "{d}/tiny-model", "--control-image", "{d}/pic.png"], ["--controlnet", "SDXL model folder"]),
])
@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "run"])
def test_each_flag_is_given_what_it_takes(files, capsys, tmp_path, argv, words, dry):
    d, _, _ = files
    Image.new("RGB", (64, 64)).save(d / "pic.png")
    argv = [a.replace("{d}", str(d)) for a in argv]
    base = DRY if dry else ["generate", *SMALL, "--out", str(tmp_path / "o")]
    one_error(capsys, [*base, *argv], *(w.replace("{d}", str(d)) for w in words))
    assert not (tmp_path / "o").exists()


def test_ablate_checks_its_files_too(files, capsys, tmp_path):
    d, _, _ = files
    one_error(capsys, ["ablate", *SMALL, "--vae", d / UNET, "--out", tmp_path / "o"], "--vae", "a UNet alone")
    assert not (tmp_path / "o").exists()


def test_a_prompts_batch_checks_its_files_too(files, capsys, tmp_path):
    d, _, _ = files
    (tmp_path / "prompts.txt").write_text("a lighthouse\na harbour\n")
    one_error(capsys, ["generate", *SMALL, "--prompts", tmp_path / "prompts.txt", "--vae", d / UNET,
                       "--out", tmp_path / "o"], "--vae", "a UNet alone")
    assert not (tmp_path / "o").exists()


def test_a_tiny_model_folder_passes_the_checks(files):
    # (a whole run from such a folder: tests/inspection/test_checkpoints.py::test_generate_from_a_model_folder)
    from demofusion.cli.preflight import check_files

    d, _, _ = files
    check_files({"model": str(d / "tiny-model"), "vae": str(d / "tiny-model" / "vae"),
                 "lora": [f"{d}/style.safetensors:0.5"], "controlnet": ["tiny"]})


@pytest.mark.parametrize("fields, words", [
    ({"lora": 5}, ["lora is 5", "FILE[:SCALE]"]),
    ({"lora": [f"STYLE:nan"]}, ["scale nan"]),
    ({"lora": ["{d}/style.pt"]}, ["pickle"]),
    ({"vae": "{d}/etc/passwd"}, ["--vae", "not a safetensors file"]),
    ({"vae": ["x"]}, ["vae is ['x']", "a path"]),
    ({"height": "512"}, ["height is '512'", "--height"]),
    ({"fp8": "yes"}, ["fp8", "true or false"]),
    ({"scheduler": "dpm"}, ["scheduler", "ddim"]),
    ({"phase_sizes": [[256, "x"]]}, ["phase_sizes", "pairs"]),
    ({"model": "{d}/etc"}, ["--model", "without weights"]),
])
def test_replayed_png_fields_are_untrusted_input(files, capsys, tmp_path, fields, words):
    d, _, png = files
    fields = {k: (v.replace("{d}", str(d)).replace("STYLE", str(d / "style.safetensors")) if isinstance(v, str)
                  else [x.replace("{d}", str(d)).replace("STYLE", str(d / "style.safetensors")) for x in v]
                  if isinstance(v, list) and all(isinstance(x, str) for x in v) else v) for k, v in fields.items()}
    source = png("replay.png", **fields)
    before = source.read_bytes()
    for extra in (["--dry-run"], ["--out", str(tmp_path / "o")]):
        one_error(capsys, ["generate", "--from-image", source, "--no-progress", *extra],
                  *(w.replace("{d}", str(d)) for w in words))
    assert source.read_bytes() == before and not (tmp_path / "o").exists()


# ---- inspect checks what loading checks, and says what a file is ------------------------------------
def test_inspect_tiny(capsys):
    assert main(["inspect", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "UNTRAINED" in out and "--model tiny" in out and out.count("values all finite") == 4


def test_inspect_refuses_a_folder_without_every_component(files, capsys):
    d, _, _ = files
    line = one_error(capsys, ["inspect", d / "only-unet"], "no vae/ folder")
    assert "+2 more problems" in line  # text_encoder/ and text_encoder_2/ too


def test_inspect_reads_values_nan_is_a_problem_and_fp16_overflow_a_warning(files, capsys, tmp_path):
    from safetensors.torch import save_file

    d, pipe, _ = files
    sd = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    sd["conv_in.weight"][0, 0, 0, 0] = 1e6
    save_file(sd, str(tmp_path / "big.safetensors"))
    assert main(["inspect", str(tmp_path / "big.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "warning: 1 tensors hold values beyond float16's ±65504 ('conv_in.weight')" in out
    assert "--dtype bfloat16" in out and "a UNet alone cannot run" in out
    sd["conv_in.weight"][0, 0, 0, 0] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"))
    one_error(capsys, ["inspect", tmp_path / "nan.safetensors"], "1 tensors hold NaN/Inf", "conv_in.weight")


def test_inspect_names_loras_controlnets_and_vaes(files, capsys, tmp_path):
    from safetensors.torch import save_file

    from demofusion.presets import tiny_controlnet

    d, pipe, _ = files
    assert main(["inspect", str(d / "style.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "LoRA (kohya layout): 1 targets (unet: 1)" in out and "--lora" in out and "KeyError" not in out
    one_error(capsys, ["inspect", d / "nan.safetensors"], "NaN/Inf")
    net = tiny_controlnet(pipe.unet.config, 1, "cpu", torch.float32)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "net.safetensors"))
    assert main(["inspect", str(tmp_path / "net.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "SDXL ControlNet" in out and "keys match the model exactly, values all finite" in out and "--controlnet" in out
    assert main(["inspect", str(d / "tiny-model" / "vae")]) == 0
    assert "--vae" in capsys.readouterr().out


# ---- smaller: one phase limit, CPU float16, an unused negative prompt --------------------------------
def test_one_phase_limit_answers_at_once(capsys):
    one_error(capsys, [*DRY, "--force", "--height", "100000"], "390 phases", "more than 64", "--phases 64")
    one_error(capsys, [*DRY, "--phases", "65"], "--phases", "65")
    one_error(capsys, [*DRY, "--phase-sizes", ",".join(["512x512"] * 65)], "65 entries", "more than 64")


def test_float16_on_the_cpu_warns(capsys):
    from demofusion.frontend.loading import load_pipeline

    load_pipeline({"model": "tiny", "device": "cpu", "dtype": "float16"})
    err = capsys.readouterr().err
    assert "warning: float16 on the CPU is 10–40× slower than float32" in err


def test_negative_prompt_without_guidance_is_said(capsys):
    assert main([*DRY, "--negative-prompt", "blurry", "--guidance", "1"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: --negative-prompt is unused: --guidance 1"), err
    assert main([*DRY, "--negative-prompt", "blurry"]) == 0
    assert "unused" not in capsys.readouterr().err
