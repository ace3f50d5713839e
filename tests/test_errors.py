"""Errors in the words of the front end that shows them.

The pipeline's messages name its Python arguments; the CLI and the browser UI each map them to their
own words from one table (demofusion.errors.reword). A front end never advises a setting it lacks
(`base_size=` in the CLI, `force=True` in the page, `--resume` from `ablate`), a LoRA scale that is not
a number is said as such, and the page names an upload by its file name, never the server's temp path.
"""

from pathlib import Path

import pytest

from demofusion.cli import main
from demofusion.errors import InputError, reword


def said(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


def test_reword_maps_names_drops_advice_it_cannot_follow_and_keeps_the_rest():
    words = {"num_inference_steps": "--steps", "width": "--width", "force": "--force", "base_size": None,
             "/tmp/gradio/ab12/x.png": "x.png"}
    assert reword("num_inference_steps must be 1..1000, got 0", words) == "--steps must be 1..1000, got 0"
    assert reword("width=500 is not a multiple of 8; use e.g. width=496 or 504", words) == \
        "--width 500 is not a multiple of 8; use e.g. --width 496 or 504"
    assert reword("too big; pass force=True if you mean it", words) == "too big; pass --force if you mean it"
    assert reword("too small; give a larger target; or pass base_size= for a smaller base", words) == \
        "too small; give a larger target"
    assert reword("Picture /tmp/gradio/ab12/x.png: cannot read it", words) == "Picture x.png: cannot read it"
    assert reword("stride_x=3 and mywidth=2 stay", words) == "stride_x=3 and mywidth=2 stay"


def test_cli_never_advises_base_size_and_names_both_sides(capsys):
    assert main(["generate", "--height", "128", "--width", "256", "--dry-run"]) == 2
    assert said(capsys) == ["error: --height 128, --width 256: both must be at least the base size 256 px; "
                            "give a larger target"]


def test_cli_lora_scale_that_is_not_a_number_is_said_as_such(tmp_path, capsys):
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"not read: the scale is checked first")
    assert main(["generate", "--lora", f"{lora}:abc", "--height", "256", "--width", "256", "--steps", "1",
                 "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert said(capsys) == [f"error: --lora {lora}:abc: the scale 'abc' is not a number; give FILE:SCALE "
                            "(e.g. style.safetensors:0.8)"]
    assert not (tmp_path / "run").exists()


def test_ablate_does_not_advise_resume_it_has_not(tmp_path, capsys):
    (tmp_path / "sheet").mkdir()
    (tmp_path / "sheet" / "keep.txt").write_text("mine")
    assert main(["ablate", "--height", "256", "--width", "256", "--steps", "1", "--out", str(tmp_path / "sheet")]) == 2
    lines = said(capsys)
    assert len(lines) == 1 and "--overwrite" in lines[0] and "--resume" not in lines[0], lines
    assert [p.name for p in (tmp_path / "sheet").iterdir()] == ["keep.txt"]


@pytest.fixture(scope="module")
def model():
    pytest.importorskip("gradio")  # the runner needs no gradio, but lives with the UI's optional extra
    from demofusion.ui.runner import load_model

    return load_model("tiny", "cpu")


def test_page_never_advises_force_and_names_sizes_by_their_labels(model):
    from demofusion.ui.runner import Page, prepare

    with pytest.raises(InputError) as e:
        prepare(model, Page(prompt="x", height=20000, width=17000))
    assert str(e.value) == ("Height 20000, Width 17000: beyond 16384 px a side (days of work, terabytes of latents "
                            "traffic)")
    with pytest.raises(InputError) as e:
        prepare(model, Page(prompt="x", height=128, width=256))
    assert str(e.value) == "Height 128, Width 256: both must be at least the base size 256 px; give a larger target"


def test_page_names_an_upload_by_its_file_name_not_the_servers_temp_path(model, tmp_path):
    from demofusion.ui.runner import Page, prepare

    upload = tmp_path / "gradio" / "0f3a9c" / "holiday.png"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(b"not a picture")
    with pytest.raises(InputError) as e:
        prepare(model, Page(mode="img2img", prompt="x", picture=str(upload)))
    assert str(e.value).startswith("Picture holiday.png: ") and str(upload.parent) not in str(e.value), str(e.value)


@pytest.mark.parametrize("text", ["9007199254740993", " 18446744073709551615 "])
def test_page_seed_is_text_and_runs_as_itself(model, text):
    from demofusion.ui.runner import Page, prepare

    plan = prepare(model, Page(prompt="x", height=256, width=256, num_inference_steps=1, seed=text))
    assert plan.params["seed"] == plan.kwargs["seed"] == int(text)


@pytest.mark.parametrize("text", ["", "1e5", "-1", "2.5", "18446744073709551616"])
def test_page_seed_that_is_not_a_whole_number_in_range_is_refused(model, text):
    from demofusion.ui.runner import Page, prepare

    with pytest.raises(InputError, match="^Seed must be"):
        prepare(model, Page(prompt="x", height=256, width=256, seed=text))
