"""The browser UI (`demofusion ui`, docs/cli.md).

Without gradio: the CLI says how to install it, and nothing else imports gradio. The UI's runner
(no browser): the page's values are checked by the pipeline's validation, runs write the CLI's
metadata (`generate --from-image` reproduces them pixel for pixel), Stop keeps the finished
phases (`generate --resume` finishes them). In a real browser (Playwright driving Debian's
chromium; skipped when gradio, playwright or chromium is missing): live phase previews, the final
size, the downloaded PNG's metadata, an error message instead of a traceback, Stop, and a second run.
"""

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demofusion.cli import main
from demofusion.errors import InputError
from demofusion.outputs import read_png_params

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = ROOT / "docs" / "images" / "ui.png"


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


# ---- without gradio ---------------------------------------------------------------------------------
def test_ui_without_gradio_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` fails as if it were not installed
    assert main(["ui", "--model", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install -e '.[ui]'" in err and len(err.splitlines()) == 1


def test_package_and_cli_never_import_gradio():
    code = ("import sys, demofusion, demofusion.cli, demofusion.ui, demofusion.ui.runner, demofusion.ui.worker, "
            "demofusion.ui.knobs; "
            "from demofusion.cli import build_parser; a = build_parser().parse_args(['ui', '--port', '7999']); "
            "assert (a.model, a.host, a.port, a.share) == ('tiny', '127.0.0.1', 7999, False); "
            "assert 'gradio' not in sys.modules, 'gradio imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---- the runner: checks, metadata, Stop (no browser) -----------------------------------------------
@pytest.fixture(scope="module")
def model():
    from demofusion.ui.runner import load_model

    return load_model("tiny", "cpu", controlnet="tiny")


def run_page(model, out, stop_after_phase=None, **values):
    from demofusion.ui.runner import Page, prepare
    from demofusion.ui.worker import Run

    run = Run(model, prepare(model, Page(**values)), out)
    run.start()
    for snap in run.watch(interval=0.05):
        if stop_after_phase and any(k >= stop_after_phase for k, *_ in snap.new_phases):
            run.stop()
        last = snap
    run.join()
    return run, last


def test_runner_errors_are_one_line_in_the_page_words(model):
    from demofusion.ui.runner import Page, prepare

    with pytest.raises(InputError, match=r"^Width 500 is not a multiple of 8; use e.g. Width 496 or 504$"):
        prepare(model, Page(prompt="x", height=512, width=500))
    with pytest.raises(InputError, match=r"^Steps must be"):
        prepare(model, Page(prompt="x", height=512, width=512, num_inference_steps=0))
    with pytest.raises(InputError, match="Memory budget|max_memory"):
        prepare(model, Page(prompt="x", height=512, width=512, max_memory="lots"))
    with pytest.raises(InputError, match="needs a Picture"):
        prepare(model, Page(mode="img2img", prompt="x", height=512, width=512))
    with pytest.raises(InputError, match="Canny edges"):
        prepare(model, Page(mode="control", prompt="x", height=512, width=512))


def test_runner_refuses_invalid_knobs_as_the_cli_does(model):
    """A bad value is refused in the page's words, never replaced (stride 0 is not
    the default stride, 2.5 steps are not 2), and the page takes the CLI's whole range."""
    from demofusion.ui.runner import Page, prepare

    ok = dict(prompt="x", height=512, width=512)
    refused = [(dict(stride="0"), r"^Stride must be 1\.\.32, got 0 latents"),
               (dict(stride="2.5"), r"^Stride must be a whole number, got '2\.5'$"),
               (dict(stride="abc"), r"^Stride must be a whole number, got 'abc'$"),
               (dict(view_batch_size="0"), r"^View batch size must be ≥ 1, got 0"),
               (dict(num_inference_steps=2.5), r"^Steps must be a whole number, got float 2\.5"),
               (dict(num_inference_steps=None), r"^Steps must be a whole number"),
               (dict(height=512.5), r"^Height must be a whole number"),
               (dict(cosine_scale_1=1001), r"^Cosine scale 1 must be in \[0\.0, 1000\.0\], got 1001"),
               (dict(sigma=101), r"^Sigma must be in \[0\.0, 100\.0\]"),
               (dict(guidance_scale=101), r"^Guidance must be in \[0\.0, 100\.0\]"),
               (dict(phase_sizes="256by256"), r"^Phase sizes '256by256': give HEIGHTxWIDTH pairs")]
    for values, message in refused:
        with pytest.raises(InputError, match=message):
            prepare(model, Page(**ok | values))
    # the CLI's range: values a slider used to cut off run; empty text is the default
    plan = prepare(model, Page(**ok, cosine_scale_1=999.5, sigma=99, guidance_scale=99, stride="", phases="2",
                               skip_residual=False, phase_sizes="256x256,512x512"))
    assert (plan.params["cosine_scale_1"], plan.params["sigma"], plan.params["guidance_scale"]) == (999.5, 99.0, 99.0)
    assert (plan.params["stride"], plan.params["phases"], plan.params["skip_residual"]) == (16, 2, False)
    assert plan.kwargs["phase_sizes"] == [[256, 256], [512, 512]]


def test_knob_controls_are_built_from_the_config():
    """Every knob's gradio control (the page calls knob_control for each), with the config's label."""
    gr = pytest.importorskip("gradio")
    from demofusion.config import DemoFusionConfig, knob, knobs
    from demofusion.ui.app import knob_control
    from demofusion.ui.knobs import control_spec

    @dataclass(frozen=True)
    class WithAlpha1End(DemoFusionConfig):  # a researcher's knob, as in tests/test_config.py
        cosine_scale_1_end: float = knob(0.0, "α1 at the last step of a phase.", "float", lo=0.0, hi=10.0)

    made = {k.name: knob_control(control_spec(k)) for k in knobs(WithAlpha1End)}
    assert isinstance(made["cosine_scale_1_end"], gr.Number) and made["cosine_scale_1_end"].label == "Cosine scale 1 end"
    assert isinstance(made["stride"], gr.Textbox) and made["stride"].label == "Stride"  # empty: the default
    assert isinstance(made["skip_residual"], gr.Checkbox) and made["skip_residual"].value is True
    assert made["sigma"].minimum is None and made["sigma"].precision is None  # no bounds, no rounding


def test_runner_writes_the_cli_metadata_and_from_image_reproduces_it(model, tmp_path):
    run, end = run_page(model, tmp_path / "ui", prompt="a lighthouse", negative_prompt="", height=256, width=384,
                        num_inference_steps=2, seed=5, view_batch_size=None, stride=16.0, max_memory="")
    assert end.end == "done" and [k for k, *_ in run.phases] == [1]
    png = run.folder / "phase_1.png"
    params = read_png_params(png)
    assert (params["prompt"], params["height"], params["width"], params["num_inference_steps"], params["seed"]) == \
        ("a lighthouse", 256, 384, 2, 5)
    assert params["controlnet"] is None and params["model"] == "tiny" and params["run_id"]
    assert main(["generate", "--from-image", str(png), "--out", str(tmp_path / "again"), "--no-progress"]) == 0
    np.testing.assert_array_equal(pixels(tmp_path / "again" / "phase_1.png"), pixels(png))


def test_runner_records_the_apps_lora_and_sampler(tmp_path):
    """`demofusion ui --lora FILE:SCALE --scheduler ddim`: fused once at startup, recorded in every
    run's metadata, and `--from-image` reproduces the picture with them."""
    import demofusion as df
    from demofusion.ui.runner import load_model
    from tests.lora.test_load_fuse_unload import lora_targets, random_factors, write_kohya

    targets = lora_targets(df.DemoFusionPipeline.from_pretrained("tiny", device="cpu")._lora_targets())
    lora = write_kohya(tmp_path / "style.safetensors", random_factors(targets, seed=3))
    m = load_model("tiny", "cpu", setup={"lora": [f"{lora}:0.5"], "scheduler": "ddim"})
    assert m.pipe.loras.loaded and type(m.pipe.scheduler).__name__ == "DDIMScheduler"
    run, end = run_page(m, tmp_path / "ui", prompt="a lighthouse", negative_prompt="", height=256, width=256,
                        num_inference_steps=2, seed=5, view_batch_size=None, stride=16.0, max_memory="")
    png = run.folder / "phase_1.png"
    params = read_png_params(png)
    assert params["lora"] == [f"{lora}:0.5"] and params["scheduler"] == "ddim" and params["lora_hash"]
    assert main(["generate", "--from-image", str(png), "--out", str(tmp_path / "again"), "--no-progress"]) == 0
    np.testing.assert_array_equal(pixels(tmp_path / "again" / "phase_1.png"), pixels(png))


def test_runner_sampler_menu_samples_that_run_and_records_it(model, tmp_path):
    """The Sampler menu (A1111 names): the run samples with the choice (the app's own sampler is
    left as it was), records it as --scheduler/--sigmas and in the PNG's A1111 parameters, and
    `--from-image` replays it pixel for pixel."""
    from demofusion.ui.knobs import sampler_choices

    values = [v for _, v in sampler_choices()]
    assert values[0] == "" and {"DPM++ 2M Karras", "Euler a", "UniPC", "LCM", "Heun Exponential"} <= set(values)
    assert "DDIM Karras" not in values
    before = model.pipe.scheduler
    run, end = run_page(model, tmp_path / "ui", prompt="a lighthouse", negative_prompt="", height=256, width=256,
                        num_inference_steps=2, seed=5, view_batch_size=None, stride=16.0, max_memory="",
                        sampler="DPM++ 2M Karras")
    assert end.end == "done" and model.pipe.scheduler is before
    png = run.folder / "phase_1.png"
    params = read_png_params(png)
    assert (params["scheduler"], params["sigmas"], params["sampler"]) == ("dpm++2m", "karras", "DPM++ 2M Karras")
    assert "Sampler: DPM++ 2M Karras," in Image.open(png).text["parameters"]
    assert main(["generate", "--from-image", str(png), "--out", str(tmp_path / "again"), "--no-progress"]) == 0
    np.testing.assert_array_equal(pixels(tmp_path / "again" / "phase_1.png"), pixels(png))


def test_runner_img2img_and_controlnet_replay(model, tmp_path):
    rng = np.random.default_rng(0)
    picture = tmp_path / "picture.png"
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(picture)
    run, end = run_page(model, tmp_path / "ui", mode="img2img", prompt="x", picture=str(picture), scale=3,
                        num_inference_steps=1)
    assert end.end == "done"
    params = read_png_params(run.phases[-1][1])
    assert (params["height"], params["width"]) == (288, 384) and Path(params["image"]).parent == run.folder
    assert main(["generate", "--from-image", str(run.phases[-1][1]), "--out", str(tmp_path / "i2i"),
                 "--no-progress"]) == 0
    np.testing.assert_array_equal(pixels(tmp_path / "i2i" / "phase_1.png"), pixels(run.phases[-1][1]))

    run, end = run_page(model, tmp_path / "ui", mode="control", prompt="x", height=256, width=256,
                        num_inference_steps=1, control_picture=str(picture), canny_low=50, canny_high=150)
    assert end.end == "done"
    params = read_png_params(run.phases[-1][1])
    assert params["controlnet"] == ["tiny"] and params["control"] == "canny" and params["control_scale"] == [0.5]
    assert (params["canny_low"], params["canny_high"]) == (50, 150) and params["controlnet_hash"]
    assert main(["generate", "--from-image", str(run.phases[-1][1]), "--out", str(tmp_path / "cn"),
                 "--no-progress"]) == 0
    np.testing.assert_array_equal(pixels(tmp_path / "cn" / "phase_1.png"), pixels(run.phases[-1][1]))


def test_runner_stop_keeps_finished_phases_and_resume_finishes(model, tmp_path):
    run, end = run_page(model, tmp_path / "ui", stop_after_phase=1, prompt="x", height=512, width=512,
                        num_inference_steps=2, guidance_scale=1.0)
    assert end.end == "stopped" and [k for k, *_ in run.phases] == [1]
    assert (run.folder / "phase_1.png").is_file() and not (run.folder / "phase_2.png").exists()
    assert main(["generate", "--resume", str(run.folder), "--no-progress"]) == 0
    assert Image.open(run.folder / "phase_2.png").size == (512, 512)


# ---- in a real browser ------------------------------------------------------------------------------
def _browser_missing() -> str | None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        return "gradio is not installed (pip install -e '.[ui]')"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    why = _browser_missing()
    if why:
        pytest.skip(why)
    cwd, port = tmp_path_factory.mktemp("ui-server"), _free_port()
    log = open(cwd / "server.log", "w")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "demofusion", "ui", "--model", "tiny", "--port", str(port)],
                            cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`demofusion ui` exited ({proc.returncode}): {(cwd / 'server.log').read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"`demofusion ui` did not listen in 180 s: {(cwd / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/", cwd
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"], headless=True)
        pg = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        pg.set_default_timeout(60_000)
        pg.goto(server[0])
        pg.wait_for_selector("#df-generate")
        yield pg
        browser.close()


def _set(pg, prompt=None, **numbers):
    if prompt is not None:
        pg.fill("#df-prompt textarea", prompt)
    for name, value in numbers.items():
        box = pg.locator(f"#df-{name} input, #df-{name} textarea").first  # the Seed is a text box
        box.fill(str(value))
        box.press("Tab")  # gradio takes a number's value on blur


def _final_size(pg) -> list:
    """The final image's pixel size, once the browser has loaded it."""
    pg.wait_for_function("() => { const i = document.querySelector('#df-final img'); "
                         "return i && i.complete && i.naturalWidth > 0; }")
    return pg.evaluate("() => { const i = document.querySelector('#df-final img'); "
                       "return [i.naturalWidth, i.naturalHeight]; }")


def _wait_text(pg, selector, *words, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = pg.locator(selector).inner_text()
        if any(w in text for w in words):
            return text
        time.sleep(0.1)
    raise AssertionError(f"{selector} never said {words}: {pg.locator(selector).inner_text()!r}")


SEED_MAX = 2**64 - 1
# each kept phase's thumbnail and caption, and whether both lie inside the gallery's scroll box
KEPT_PHASES = """() => { const box = document.querySelector('#df-phases .grid-wrap').getBoundingClientRect();
  const inside = r => r.top >= box.top - 1 && r.bottom <= box.bottom + 1 && r.left >= box.left - 1 && r.right <= box.right + 1;
  return [...document.querySelectorAll('#df-phases .thumbnail-item')].map(t => {
    const c = t.querySelector('.caption-label');
    return {caption: c ? c.innerText : '', inside: inside(t.getBoundingClientRect()) && !!c && inside(c.getBoundingClientRect())};
  }); }"""
WATCH = """() => { window.dfLog = []; let last = '';
  window.dfTimer = setInterval(() => {
    const phases = [...document.querySelectorAll('#df-phases img')].length;
    const captions = document.querySelector('#df-phases').innerText.match(/Phase \\d+/g) || [];
    const final = !!document.querySelector('#df-final img');
    const key = phases + '|' + captions.join(',') + '|' + final;
    if (key !== last) { window.dfLog.push({phases, captions, final, t: performance.now()}); last = key; }
  }, 20); }"""


def test_ui_generates_with_live_phases_and_downloads_the_png(page, server, tmp_path):
    t0 = time.time()
    pg = page
    pg.evaluate(WATCH)
    _set(pg, "a lighthouse at dawn", height=512, width=768, num_inference_steps=2, seed=SEED_MAX)
    pg.click("#df-generate")
    _wait_text(pg, "#df-progress", "Done", "Failed")
    log = pg.evaluate("() => { clearInterval(window.dfTimer); return window.dfLog; }")
    msg = pg.locator("#df-message").inner_text()
    assert "Done" in msg, msg
    # the phases appeared one after another, phase 1 long before the final image
    firsts = {}
    for entry in log:
        for n in range(1, entry["phases"] + 1):
            firsts.setdefault(n, entry)
    assert set(firsts) == {1, 2, 3}, log
    assert firsts[1]["t"] < firsts[2]["t"] < firsts[3]["t"], log
    assert firsts[1]["captions"][:1] == ["Phase 1"] and not firsts[1]["final"], log
    assert [e for e in log if e["final"]] and min(e["t"] for e in log if e["final"]) > firsts[1]["t"], log
    assert _final_size(pg) == [768, 512]
    # the download is the PNG with the CLI's metadata
    with pg.expect_download() as dl:
        pg.click("#df-download")
    png = tmp_path / "download.png"
    dl.value.save_as(png)
    params = read_png_params(png)
    assert (params["prompt"], params["height"], params["width"], params["num_inference_steps"], params["phase"]) == \
        ("a lighthouse at dawn", 512, 768, 2, 3)
    assert params["seed"] == SEED_MAX  # the documented maximum, exactly
    assert Image.open(png).size == (768, 512)
    assert pg.locator("#df-history img").count() >= 1
    _screenshot(pg, tmp_path)

    # an invalid size: a message in the page, no traceback
    _set(pg, width=500)
    pg.click("#df-generate")
    text = _wait_text(pg, "#df-message", "Error", timeout=30)
    assert "Width 500 is not a multiple of 8" in text, text
    body = pg.locator("body").inner_text()
    assert "Traceback" not in body and 'File "' not in body
    print(f"browser: generate + download + error in {time.time() - t0:.1f} s")


def test_ui_refuses_invalid_knobs_in_the_page(page, server):
    """In the browser: stride 0 and 2.5 steps are refused with the CLI's words, not
    replaced by the default stride or 2 steps; nothing starts."""
    pg = page
    pg.goto(server[0])  # a fresh page: the earlier tests' values stay in the fields otherwise
    pg.wait_for_selector("#df-generate")
    pg.get_by_text("DemoFusion knobs").click()  # open the accordion
    _set(pg, "a lighthouse at dawn", height=256, width=256, num_inference_steps=2)
    box = pg.locator("#df-stride input, #df-stride textarea").first
    box.fill("0")
    box.press("Tab")
    pg.click("#df-generate")
    text = _wait_text(pg, "#df-message", "Error", timeout=30)
    assert "Stride must be 1..32, got 0" in text, text
    assert "Not started" in pg.locator("#df-progress").inner_text()
    box.fill("")
    box.press("Tab")
    _set(pg, num_inference_steps=2.5)
    pg.click("#df-generate")
    text = _wait_text(pg, "#df-message", "whole number", timeout=30)
    assert "Steps must be a whole number, got float 2.5" in text, text
    _set(pg, num_inference_steps=2)


def test_ui_stop_keeps_phase_one_then_generates_again(page, server):
    pg = page
    pg.goto(server[0])  # a fresh page (see above)
    pg.wait_for_selector("#df-generate")
    _set(pg, "a lighthouse at dawn", height=512, width=768, num_inference_steps=6)
    pg.click("#df-generate")
    pg.wait_for_selector("#df-phases img", timeout=120_000)  # phase 1 is shown: stop now
    pg.click("#df-stop")
    text = _wait_text(pg, "#df-message", "Stopped", "Done", "Error")
    assert "Stopped" in text and "--resume" in text, text
    captions = pg.locator("#df-phases").inner_text()
    assert "Phase 1" in captions and "Phase 3" not in captions, captions
    assert pg.locator("#df-phases img").count() in (1, 2)
    assert pg.locator("#df-final img").count() == 0
    # every kept phase is drawn whole, its caption under it, inside the gallery's box (not cut off)
    boxes = pg.evaluate(KEPT_PHASES)
    assert boxes and all(b["inside"] and b["caption"].startswith("Phase ") for b in boxes), boxes
    # a second run afterwards works, and a seed above 2**53 runs as itself (not rounded by the browser)
    _set(pg, height=256, width=256, num_inference_steps=2, seed=2**53 + 1)
    pg.click("#df-generate")
    _wait_text(pg, "#df-progress", "Done", "Failed")
    message = pg.locator("#df-message").inner_text()
    assert "Done" in message
    assert _final_size(pg) == [256, 256]
    final = next(w.strip("`.") for w in message.split() if w.strip("`.").endswith("phase_1.png"))
    assert read_png_params(server[1] / final)["seed"] == 9007199254740993
    # a seed that is not a whole number: said in the page, nothing run
    _set(pg, seed="1e5")
    pg.click("#df-generate")
    text = _wait_text(pg, "#df-message", "Error", timeout=30)
    assert "Seed must be a whole number 0 … 18446744073709551615, got '1e5'" in text, text


def _screenshot(pg, tmp_path):
    """The finished page → docs/images/ui.png when missing or DEMOFUSION_UI_SCREENSHOT=1 (else a temp file,
    so a test run leaves the tree as it was), downscaled to a palette PNG of modest size."""
    raw = tmp_path / "ui-raw.png"
    pg.screenshot(path=str(raw), full_page=True)
    target = SCREENSHOT if (not SCREENSHOT.exists() or os.environ.get("DEMOFUSION_UI_SCREENSHOT") == "1") \
        else tmp_path / "ui.png"
    im = Image.open(raw).convert("RGB")
    im = im.resize((960, round(im.height * 960 / im.width)), Image.LANCZOS)
    target.parent.mkdir(parents=True, exist_ok=True)
    im.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)
    assert target.stat().st_size < 1_500_000
