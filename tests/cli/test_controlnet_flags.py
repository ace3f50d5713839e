"""The command line's ControlNet flags: --controlnet, --control-image, --control canny
(OpenCV), scales, windows and guess mode recorded with the run and replayed by --from-image; errors
said in one line before any weights load."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from demofusion.cli import main

RUN = ["--height", "512", "--width", "512", "--steps", "2", "--no-progress", "--seed", "3"]


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    d = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    x = np.zeros((160, 200, 3), np.uint8)
    x[40:120, 50:150] = 255  # a white box: clear edges
    x = np.clip(x.astype(int) + rng.integers(0, 40, x.shape), 0, 255).astype(np.uint8)
    Image.fromarray(x).save(d / "photo.png")
    Image.fromarray((rng.random((64, 96, 3)) * 255).astype(np.uint8)).save(d / "map.png")
    return d


def _png(path):
    return np.asarray(Image.open(path)).astype(int)


def _meta(path):
    return json.loads(Image.open(path).text["demofusion"])


def test_control_image_run_is_recorded_and_replayed(tmp_path, pictures):
    out, again, plain = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main(["generate", *RUN, "--controlnet", "tiny", "--control-image", str(pictures / "map.png"),
                 "--control-scale", "0.7", "--control-end", "0.5", "--out", str(out)]) == 0
    meta = _meta(out / "phase_2.png")
    assert meta["controlnet"] == ["tiny"] and meta["control_image"] == [str(pictures / "map.png")]
    assert meta["control_scale"] == [0.7] and meta["control_end"] == [0.5] and len(meta["control_sha256"]) == 1
    assert main(["generate", "--from-image", str(out / "phase_2.png"), "--no-progress", "--out", str(again)]) == 0
    assert np.array_equal(_png(out / "phase_2.png"), _png(again / "phase_2.png"))
    assert main(["generate", *RUN, "--out", str(plain)]) == 0
    assert np.abs(_png(out / "phase_2.png") - _png(plain / "phase_2.png")).mean() > 1  # the ControlNet acts


def test_canny_control_uses_opencv_edges(tmp_path, pictures, monkeypatch):
    cv2 = pytest.importorskip("cv2")
    import demofusion.cli.control as C

    seen = []
    canny = C.canny
    monkeypatch.setattr(C, "canny", lambda *a: seen.append(canny(*a)) or seen[-1])
    out = tmp_path / "edges"
    assert main(["generate", *RUN, "--controlnet", "tiny", "--control", "canny", "--control-source",
                 str(pictures / "photo.png"), "--canny-low", "50", "--canny-high", "150", "--out", str(out)]) == 0
    grey = np.asarray(Image.open(pictures / "photo.png").convert("L"))
    want = cv2.Canny(grey, 50, 150)
    got = np.asarray(seen[0])
    assert got.shape == (160, 200, 3) and np.array_equal(got[..., 0], want) and np.array_equal(got[..., 2], want)
    assert want.any() and not want.all()
    meta = _meta(out / "phase_2.png")
    assert (meta["control"], meta["canny_low"], meta["canny_high"]) == ("canny", 50, 150)


def test_resume_refuses_changed_control(tmp_path, pictures):
    out = tmp_path / "r"
    m = pictures / "map.png"
    assert main(["generate", *RUN, "--controlnet", "tiny", "--control-image", str(m), "--out", str(out),
                 "--stop-after-phase", "1"]) == 0
    assert main(["generate", "--resume", str(out), "--control-scale", "0.2"]) == 2
    assert main(["generate", "--resume", str(out), "--no-progress"]) == 0


@pytest.mark.parametrize("flags, words", [
    (["--control-image", "MAP"], "--control-image needs a ControlNet: add --controlnet PATH"),
    (["--controlnet", "tiny", "--controlnet", "tiny", "--control-image", "MAP"], "1 control map(s) for 2 ControlNet(s)"),
    (["--controlnet", "tiny", "--control", "canny"], "--control canny needs a picture"),
    (["--controlnet", "tiny", "--control-image", "MAP", "--control-start", "0.6", "--control-end", "0.3"],
     "--control-start 0.6 must be below --control-end 0.3"),
    (["--controlnet", "tiny", "--control-image", "MAP", "--control-scale", "1", "--control-scale", "2"],
     "--control-scale has 2 entries for 1 ControlNet(s)"),
    (["--controlnet", "/no/such/net", "--control-image", "MAP"], "--controlnet /no/such/net: no such file or folder"),
    (["--controlnet", "tiny", "--control-image", "/no/such/map.png"], "/no/such/map.png"),
])
def test_control_errors_are_one_line_before_loading(tmp_path, pictures, capsys, flags, words):
    flags = [str(pictures / "map.png") if f == "MAP" else f for f in flags]
    assert main(["generate", *RUN, *flags, "--out", str(tmp_path / "x"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err


def test_dry_run_plans_the_controlnet(capsys, pictures):
    args = ["generate", "--model", "sdxl-base", "--height", "2048", "--width", "2048", "--device", "cuda",
            "--max-memory", "8GiB", "--dry-run"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--controlnet", "tiny", "--control-image", str(pictures / "map.png")]) == 0
    with_cn = capsys.readouterr().out
    assert "offload=model" in plain and "offload=sequential" in with_cn  # its 2.3 GiB do not fit beside the UNet
