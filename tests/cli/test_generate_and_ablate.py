"""`demofusion generate` / `ablate` end to end on the tiny preset, and the one-line errors."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from demofusion.cli import main, read_png_params

# 512×768 on tiny (base 256) runs 3 phases: 168×256, 344×512, 512×768
RUN = ["--model", "tiny", "--prompt", "a lighthouse at dawn", "--height", "512", "--width", "768",
       "--steps", "3", "--seed", "7", "--no-progress"]


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    assert main(["generate", *RUN, "--out", str(out)]) == 0
    return out


def test_generate_writes_every_phase_with_metadata(full_run, capsys):
    for k in (1, 2, 3):
        assert (full_run / f"phase_{k}.png").is_file() and (full_run / f"phase_{k}.safetensors").is_file()
    assert Image.open(full_run / "phase_3.png").size == (768, 512)
    meta = read_png_params(full_run / "phase_3.png")
    run = json.loads((full_run / "run.json").read_text())
    assert meta == {**run, "phase": 3}
    assert meta["prompt"] == "a lighthouse at dawn" and meta["seed"] == 7 and meta["model"] == "tiny"
    for knob in ("view_batch_size", "stride", "cosine_scale_1", "cosine_scale_2", "cosine_scale_3", "sigma",
                 "multi_decoder", "skip_residual", "dilated_sampling", "local_paths", "num_inference_steps",
                 "guidance_scale", "height", "width", "model_hash", "version"):
        assert knob in meta, knob
    assert meta["cosine_scale_1"] == 3.0 and meta["sigma"] == 0.8
    assert meta["view_batch_size"] is None and meta["max_memory"] is None  # auto: 16 without a budget


def test_tiny_says_it_is_noise(tmp_path, capsys):
    assert main(["generate", "--model", "tiny", "--height", "256", "--width", "256", "--steps", "2",
                 "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "UNTRAINED" in out and "demofusion download sdxl-base" in out


def test_from_image_reproduces_pixels(full_run, tmp_path):
    assert main(["generate", "--from-image", str(full_run / "phase_3.png"), "--no-progress", "--out", str(tmp_path)]) == 0
    assert np.array_equal(pixels(tmp_path / "phase_3.png"), pixels(full_run / "phase_3.png"))


def test_resume_after_interruption_is_bit_identical(full_run, tmp_path, capsys):
    assert main(["generate", *RUN, "--out", str(tmp_path), "--stop-after-phase", "2"]) == 0
    assert (tmp_path / "phase_2.safetensors").is_file() and not (tmp_path / "phase_3.png").exists()
    assert main(["generate", "--resume", str(tmp_path), "--no-progress"]) == 0
    assert "phases 1–2 already finished" in capsys.readouterr().out
    assert np.array_equal(pixels(tmp_path / "phase_3.png"), pixels(full_run / "phase_3.png"))
    assert torch.equal(load_file(str(tmp_path / "phase_3.safetensors"))["latents"],
                       load_file(str(full_run / "phase_3.safetensors"))["latents"])


def test_ablate_cells_differ_exactly_where_switches_say(tmp_path):
    out = tmp_path / "abl"
    assert main(["ablate", "--model", "tiny", "--height", "512", "--width", "512", "--steps", "3", "--seed", "3",
                 "--out", str(out), "--sweep", "cosine_scale_1=1,3"]) == 0
    record = json.loads((out / "ablation.json").read_text())
    names = [c["name"] for c in record["cells"]]
    assert names == ["full", "no-skip-residual", "no-dilated-sampling", "no-local-paths", "progressive-only",
                     "cosine_scale_1=1", "cosine_scale_1=3"]
    cells = {c["name"]: c for c in record["cells"]}
    first = {n: pixels(c["images"][0]) for n, c in cells.items()}
    final = {n: pixels(c["images"][-1]) for n, c in cells.items()}
    # phase 1 is plain SDXL at the base size: no switch touches it, same seed → same pixels everywhere
    for n in names:
        assert np.array_equal(first[n], first["full"]), n
    # every mechanism switch changes the final picture, and each in its own way
    switched = ["full", "no-skip-residual", "no-dilated-sampling", "no-local-paths", "progressive-only"]
    for i, a in enumerate(switched):
        for b in switched[i + 1:]:
            assert not np.array_equal(final[a], final[b]), (a, b)
    # the default value of a knob reproduces the full cell; another value does not
    assert np.array_equal(final["cosine_scale_1=3"], final["full"])
    assert not np.array_equal(final["cosine_scale_1=1"], final["full"])
    assert cells["progressive-only"]["settings"]["skip_residual"] is False
    assert cells["progressive-only"]["settings"]["dilated_sampling"] is False
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[0] == 4 * 512 and sheet.size[1] == 2 * (512 + 18)


# ---- errors: one clear line each ---------------------------------------------------------------
def err(capsys, argv, code=2, start="error: "):
    rc = main(argv)
    text = capsys.readouterr().err.strip()
    assert rc == code, text
    lines = text.splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), text
    return lines[0]


def test_error_missing_weights(capsys, tmp_path):
    line = err(capsys, ["generate", "--model", str(tmp_path / "nowhere"), "--height", "1024", "--width", "1024"])
    assert "not found" in line and "demofusion download sdxl-base" in line
    line = err(capsys, ["generate", "--model", "sdxl-turbo", "--height", "1024", "--width", "1024"])
    assert "demofusion download sdxl-turbo" in line


def test_error_size_not_multiple_of_8(capsys):
    line = err(capsys, ["generate", "--model", "tiny", "--height", "260", "--width", "256"])
    assert "--height 260 is not a multiple of 8" in line and "256 or 264" in line


def test_error_size_below_base(capsys, tmp_path):
    line = err(capsys, ["generate", "--model", "tiny", "--height", "128", "--width", "256", "--no-progress",
                        "--out", str(tmp_path)])
    assert "at least the base size 256" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_error_cuda_without_cuda(capsys):
    line = err(capsys, ["generate", "--model", "tiny", "--device", "cuda", "--height", "256", "--width", "256"])
    assert "CUDA is not available" in line and "--device cpu" in line


def test_error_out_of_memory(capsys, tmp_path, monkeypatch):
    from demofusion.pipeline import DemoFusionPipeline

    def boom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(DemoFusionPipeline, "__call__", boom)
    line = err(capsys, ["generate", "--model", "tiny", "--height", "256", "--width", "256", "--out", str(tmp_path)])
    assert "out of memory" in line and "--max-memory" in line and "--dry-run" in line and "--fp8" in line


def test_warning_prompt_over_77_tokens(capsys, tmp_path):
    # the tiny byte-level tokenizer: one token per byte, so 75 bytes fit and the rest is cut —
    # with --truncate-prompts; by default the tail is a second chunk, nothing is cut, nothing said
    prompt = "a" * 75 + " and this tail is cut"
    run = ["generate", "--model", "tiny", "--prompt", prompt, "--height", "256", "--width", "256", "--steps", "1",
           "--no-progress"]
    assert main([*run, "--truncate-prompts", "--out", str(tmp_path / "cut")]) == 0
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning: prompt")]
    assert len(lines) == 1 and "'and this tail is cut'" in lines[0] and "77" in lines[0]
    assert main([*run, "--out", str(tmp_path / "whole")]) == 0
    assert not [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning: prompt")]


def test_resume_after_ctrl_c_in_phase_3(full_run, tmp_path, capsys, monkeypatch):
    from demofusion.pipeline import decoding as module  # where phase_output calls decode_latents

    decode = module.decode_latents

    def interrupted(vae, z, k, *a, **kw):  # Ctrl-C while phase 3 is in flight (at its decode)
        if k == 2:
            raise KeyboardInterrupt
        return decode(vae, z, k, *a, **kw)

    monkeypatch.setattr(module, "decode_latents", interrupted)
    line = err(capsys, ["generate", *RUN, "--out", str(tmp_path)], code=130, start="interrupted")  # Ctrl-C: 130
    assert f"--resume {tmp_path}" in line
    assert (tmp_path / "phase_2.png").is_file() and not (tmp_path / "phase_3.safetensors").exists()
    monkeypatch.setattr(module, "decode_latents", decode)
    assert main(["generate", "--resume", str(tmp_path), "--no-progress"]) == 0
    assert np.array_equal(pixels(tmp_path / "phase_3.png"), pixels(full_run / "phase_3.png"))


def test_compile_flag_compiles_the_unet(tmp_path, monkeypatch):
    from demofusion.pipeline import DemoFusionPipeline

    modes = []
    monkeypatch.setattr(DemoFusionPipeline, "compile", lambda self, mode=None, **k: modes.append(mode) or self)
    for flag, want in ((["--compile"], None), (["--compile", "reduce-overhead"], "reduce-overhead"), ([], "none")):
        assert main(["generate", "--model", "tiny", "--height", "256", "--width", "256", "--steps", "1",
                     "--no-progress", "--out", str(tmp_path / str(len(modes))), *flag]) == 0
        assert (modes[-1] if flag else "none") == want
    assert len(modes) == 2


def test_phase_sizes_flag(tmp_path, capsys):
    out = tmp_path / "three"
    assert main(["generate", "--model", "tiny", "--height", "512", "--width", "512", "--steps", "1", "--no-progress",
                 "--phase-sizes", "256x256,384x384,512x512", "--out", str(out)]) == 0
    assert [Image.open(out / f"phase_{k}.png").size for k in (1, 2, 3)] == [(256, 256), (384, 384), (512, 512)]
    assert read_png_params(out / "phase_3.png")["phase_sizes"] == [[256, 256], [384, 384], [512, 512]]
    # the image carries its schedule: --from-image reproduces it
    again = tmp_path / "again"
    assert main(["generate", "--from-image", str(out / "phase_3.png"), "--no-progress", "--out", str(again)]) == 0
    assert np.array_equal(pixels(again / "phase_3.png"), pixels(out / "phase_3.png"))
    line = err(capsys, ["generate", "--model", "tiny", "--height", "512", "--width", "512", "--phase-sizes", "256x256,384x384",
                        "--out", str(tmp_path / "bad")])
    assert "end with the target" in line
    assert main(["generate", "--phase-sizes", "256by256"]) == 2
    assert "HEIGHTxWIDTH pairs" in capsys.readouterr().err
