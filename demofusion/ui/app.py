"""The browser UI's page (gradio): layout and events only — the work is :mod:`demofusion.ui.runner`'s
(checks, parameters) and :mod:`demofusion.ui.worker`'s (the run).

``build_app(pipe_or_model)`` → a ``gr.Blocks``; ``launch(...)`` serves it (docs/cli.md, ui). One
generation at a time (the queue's ``default_concurrency_limit=1``); the model is loaded once.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home (before gradio is imported)

import html  # noqa: E402
import inspect  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402

from ..errors import InputError, first_line  # noqa: E402
from ..frontend.errors import CLIError  # noqa: E402
from ..frontend.runs import DEFAULTS  # noqa: E402
from . import runner, worker  # noqa: E402
from ..config import knobs  # noqa: E402
from .knobs import HELP, LABELS, control_spec, markdown_text, sampler_choices  # noqa: E402

CSS = """
#df-progress .df-track { height: 14px; background: var(--neutral-200, #e5e7eb); border-radius: 7px; overflow: hidden; }
#df-progress .df-bar { height: 100%; background: var(--color-accent, #f97316); transition: width .2s; }
#df-progress .df-text { margin-top: 4px; font-size: 0.9em; }
#df-message .error { color: #b91c1c; }
"""
TINY = ("**Note:** `tiny` is an untrained model with random weights: its pictures are structured noise. "
        "For real pictures start the app with `--model weights/sdxl-base`.")
LOCAL = ("127.0.0.1", "localhost", "::1")


def _kw(fn, **kwargs) -> dict:
    """Only the keyword arguments this gradio version knows (4, 5 and 6 differ)."""
    known = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in known}


def progress_html(fraction: float, text: str) -> str:
    pct = max(0.0, min(100.0, 100 * fraction))
    return (f'<div class="df-track"><div class="df-bar" style="width:{pct:.1f}%"></div></div>'
            f'<div class="df-text" data-fraction="{fraction:.3f}">{html.escape(text)}</div>')


def _error(message: str) -> str:
    return f"⚠️ **Error:** {markdown_text(message)}"


def _number(name: str, value, **kw):
    return gr.Number(value=value, label=LABELS[name], info=HELP[name], elem_id=f"df-{name}", **kw)


def knob_control(spec: dict):
    """The gradio control of a knob (:func:`demofusion.ui.knobs.control_spec`): no bounds and no
    rounding on the control, so every value reaches the run's check and a bad one is refused in
    the page's words, as the CLI refuses it."""
    common = dict(label=spec["label"], info=spec["info"], elem_id=spec["elem_id"])
    if spec["kind"] == "checkbox":
        return gr.Checkbox(spec["value"], **common)
    if spec["kind"] == "text":
        return gr.Textbox(spec["value"], placeholder="empty: the default", max_lines=1, **common)
    return gr.Number(value=spec["value"], **common)


def build_app(pipe_or_model="tiny", *, controlnet: str | None = None, device: str = "auto", out="out/ui",
              model_name: str | None = None, setup: dict | None = None) -> gr.Blocks:
    """The page for a model path / preset (loaded here, once) or an already loaded pipeline
    (``model_name`` / ``controlnet``: the names its runs record)."""
    if isinstance(pipe_or_model, runner.Model):
        model = pipe_or_model
    elif isinstance(pipe_or_model, (str, Path)):
        model = runner.load_model(str(pipe_or_model), device, controlnet, setup)
    else:
        model = runner.wrap_pipeline(pipe_or_model, model_name, controlnet)
    sessions, out = worker.Sessions(), Path(out)
    base = model.base
    fields: dict = {}  # Page field → component

    with gr.Blocks(**_kw(gr.Blocks.__init__, title="DemoFusion", css=CSS)) as app:  # gradio 6: CSS at launch
        header = (f"# DemoFusion\nHigh-resolution pictures by progressive upscaling, skip residual and dilated "
                  f"sampling — model `{model.name}` (base {base} px) on {model.device} in {model.dtype}"
                  + (f", ControlNet `{model.controlnet}`" if model.controlnet else "")
                  + f". Results go to `{out}`.")
        gr.Markdown(header + ("\n\n" + TINY if model.name == "tiny" else ""))
        mode = gr.State("txt2img")
        history = gr.State([])
        fields["mode"] = mode
        with gr.Row():
            with gr.Column(scale=5):
                with gr.Tabs():
                    with gr.Tab("Text to image", id="txt2img") as t2i:
                        gr.Markdown("Phase 1 is plain generation at the base size; every later phase upscales it.")
                    with gr.Tab("Image to image", id="img2img") as i2i:
                        fields["picture"] = gr.Image(type="filepath", label="Picture", image_mode=None,
                                                     sources=["upload", "clipboard"], elem_id="df-picture",
                                                     **_kw(gr.Image.__init__, format="png"))
                        with gr.Row():
                            fields["scale"] = gr.Number(2.0, label="Scale", info=HELP["scale"], elem_id="df-scale")
                            fields["size_from_picture"] = gr.Checkbox(True, label="Size = picture × Scale",
                                                                      info=HELP["size_from_picture"])
                        target = gr.Markdown("Upload a picture to upscale.", elem_id="df-target")
                    tabs = [(t2i, "txt2img"), (i2i, "img2img")]
                    if model.controlnet:
                        with gr.Tab("ControlNet", id="control") as ctl:
                            edges = _control_tab(fields)
                        tabs.append((ctl, "control"))
                fields["prompt"] = gr.Textbox(label=LABELS["prompt"], info=HELP["prompt"], lines=2,
                                              elem_id="df-prompt", value=DEFAULTS["prompt"])
                fields["negative_prompt"] = gr.Textbox(label=LABELS["negative_prompt"], info=HELP["negative_prompt"],
                                                       elem_id="df-negative_prompt")
                with gr.Row():
                    fields["height"] = _number("height", 2 * base, step=8)  # no precision: 500.5 is refused, not rounded
                    fields["width"] = _number("width", 2 * base, step=8)
                with gr.Row():
                    fields["num_inference_steps"] = _number("num_inference_steps", DEFAULTS["num_inference_steps"])
                    fields["guidance_scale"] = _number("guidance_scale", DEFAULTS["guidance_scale"], step=0.1)
                    fields["sampler"] = gr.Dropdown(sampler_choices(), value="", label=LABELS["sampler"],
                                                    info=HELP["sampler"], elem_id="df-sampler")
                with gr.Row(equal_height=True):
                    # text, not a number: the browser's numbers are doubles, which round seeds above 2**53
                    fields["seed"] = gr.Textbox(str(DEFAULTS["seed"]), label=LABELS["seed"], info=HELP["seed"],
                                                elem_id="df-seed", max_lines=1)
                    dice = gr.Button("Random seed", elem_id="df-random-seed", scale=0, size="sm")
                with gr.Accordion("DemoFusion knobs", open=False):
                    for k in knobs():  # one control per DemoFusionConfig field (ui/knobs.py)
                        fields[k.name] = knob_control(control_spec(k))
                    fields["max_memory"] = gr.Textbox(label=LABELS["max_memory"], info=HELP["max_memory"],
                                                      placeholder="e.g. 8GiB (empty: none)", elem_id="df-max_memory")
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="df-generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="df-stop")
                message = gr.Markdown("", elem_id="df-message")
            with gr.Column(scale=6):
                progress = gr.HTML(progress_html(0, "Idle. One generation at a time: others wait in the queue "
                                                    "(their position shows here)."), elem_id="df-progress")
                # four columns however many phases (fitted to one, a single phase overflowed the height and
                # lost its caption below the fold)
                phases = gr.Gallery(label="Phases (each shown as it ends)", columns=4, height=260, elem_id="df-phases",
                                    **_kw(gr.Gallery.__init__, object_fit="contain", fit_columns=False))
                compare, final = _compare_and_final()
                download = gr.DownloadButton("Download PNG (with its metadata)", value=None, interactive=False,
                                             elem_id="df-download")
                gallery = gr.Gallery(label="This session's results", columns=6, height=180, elem_id="df-history",
                                     **_kw(gr.Gallery.__init__, object_fit="contain", fit_columns=False))

        names = list(fields)
        outputs = [progress, message, phases, compare, final, download, gallery, history]

        def generate(data: dict, request: gr.Request):
            page = runner.Page(**{k: data[fields[k]] for k in names})
            yield from _generate(model, sessions, out, page, list(data[history]), request.session_hash,
                                 dict(zip(("progress", "message", "phases", "compare", "final", "download",
                                           "gallery", "history"), outputs)))

        def stop_run(request: gr.Request):
            if sessions.stop(request.session_hash):
                return "Stopping after the current step…"
            return "Nothing to stop: no generation of yours is running."

        go.click(generate, inputs={*fields.values(), history}, outputs=outputs,
                 **_kw(go.click, show_progress="full", show_progress_on=[progress]))
        stop.click(stop_run, None, message, queue=False)
        dice.click(lambda: str(random.randrange(2**32)), None, fields["seed"], queue=False)
        for tab, name in tabs:
            tab.select(lambda name=name: name, None, mode, queue=False)
        size_inputs = [fields[k] for k in ("picture", "scale", "size_from_picture", "height", "width")]
        for c in size_inputs:
            c.change(runner.target_size, size_inputs, target, queue=False)
        if model.controlnet:
            edge_inputs = [fields[k] for k in ("control_picture", "canny_low", "canny_high")]
            for c in edge_inputs:
                c.change(_edges_preview, edge_inputs, [edges, message], queue=False)
    return app


def _compare_and_final():
    """The phase 1 ↔ final slider (gradio ≥ 5) and the final image; with gradio 4, phase 1 beside the final."""
    final = dict(label="Final image", type="filepath", interactive=False, elem_id="df-final", height=420,
                 **_kw(gr.Image.__init__, format="png"))
    if hasattr(gr, "ImageSlider"):
        return (gr.ImageSlider(label="Phase 1 ↔ final (drag)", type="filepath", elem_id="df-compare", height=420),
                gr.Image(**final))
    with gr.Row():
        return (gr.Image(label="Phase 1 (a drag slider needs gradio ≥ 5)", type="filepath", elem_id="df-compare",
                         height=420, interactive=False), gr.Image(**final))


def _control_tab(fields: dict):
    """The ControlNet tab's controls (into ``fields``); returns the Canny preview image."""
    fields["control_from"] = gr.Radio([("Canny edges of a picture", "canny"), ("A ready control map", "map")],
                                      value="canny", label="Control", info=HELP["control_from"])
    with gr.Row():
        fields["control_picture"] = gr.Image(type="filepath", label="Picture for edges", elem_id="df-control-picture",
                                             sources=["upload", "clipboard"])
        edges = gr.Image(label="Canny edges", interactive=False, elem_id="df-edges")
        fields["control_map"] = gr.Image(type="filepath", label="Control map", elem_id="df-control-map",
                                         sources=["upload", "clipboard"])
    with gr.Row():
        fields["canny_low"] = gr.Slider(0, 1000, value=100, step=1, label="Canny low", info=HELP["canny_low"])
        fields["canny_high"] = gr.Slider(0, 1000, value=200, step=1, label="Canny high", info=HELP["canny_high"])
    fields["control_scale"] = gr.Slider(0, 2, value=0.5, step=0.05, label=LABELS["controlnet_conditioning_scale"],
                                        info=HELP["control_scale"])
    with gr.Row():
        fields["control_start"] = gr.Slider(0, 1, value=0.0, step=0.05, label="Control start",
                                            info=HELP["control_start"])
        fields["control_end"] = gr.Slider(0, 1, value=1.0, step=0.05, label="Control end", info=HELP["control_end"])
    with gr.Row():
        fields["guess_mode"] = gr.Checkbox(False, label="Guess mode", info=HELP["guess_mode"])
        fields["control_upscale"] = gr.Checkbox(False, label="Upscale the picture", info=HELP["control_upscale"])
    return edges


def _edges_preview(picture, low, high):
    if not picture:
        return None, gr.update()
    try:
        return runner.edges(picture, low, high), ""
    except InputError as e:
        return None, _error(str(e))


def _generate(model, sessions, out, page, history, session, c):
    """The Generate event: check, start the worker, then page updates as steps and phases arrive."""
    idle = {c["phases"]: [], c["compare"]: None, c["final"]: None,
            c["download"]: gr.update(value=None, interactive=False)}
    try:
        plan = runner.prepare(model, page)
        run = worker.Run(model, plan, out)
        run.start()
    except InputError as e:
        yield {**idle, c["progress"]: progress_html(0, "Not started."), c["message"]: _error(str(e))}
        return
    except Exception as e:  # noqa: BLE001 - a bug of ours: one line here, the traceback in the server's log
        traceback.print_exc(file=sys.stderr)
        yield {**idle, c["progress"]: progress_html(0, "Not started."),
               c["message"]: _error(f"internal error ({type(e).__name__}: {first_line(e)}); the server's log has "
                                    "the traceback")}
        return
    s = plan.settings
    sizes = " → ".join(f"{w}×{h}" for h, w in s.sizes)
    yield {**idle, c["progress"]: progress_html(0, f"Phase 1 of {s.phases}: starting…"),
           c["message"]: f"Running {s.phases} phase(s): {sizes} px, "
                         f"{' / '.join(str(s.phase_steps(k)[0] - s.phase_steps(k)[1]) for k in range(s.phases))} steps; "
                         f"writing to `{run.folder}`."}
    sessions.add(session, run)
    shown = []
    try:
        for snap in run.watch():
            text = (f"Phase {max(snap.phase, 1)} of {s.phases} · step {snap.step + 1} of "
                    f"{s.phase_steps(max(snap.phase, 1) - 1)[0]} · "
                    f"{100 * snap.fraction:.0f} % · {snap.elapsed:.1f} s")
            upd = {c["progress"]: progress_html(snap.fraction, text)}
            for k, path, (h, w) in snap.new_phases:
                shown.append((str(path), f"Phase {k} · {w}×{h}"))
                upd[c["phases"]] = list(shown)
            if snap.end:
                upd.update(_finish(run, snap, shown, history, c))
            yield upd
    finally:
        run.stop()  # the page went away (or the run ended): the worker stops after its current step
        run.join()
        sessions.remove(session, run)


def _finish(run, snap, shown, history, c) -> dict:
    s, folder = run.plan.settings, run.folder
    if snap.end == "error":
        return {c["progress"]: progress_html(snap.fraction, "Failed."), c["message"]: _error(snap.message)}
    upd = {}
    if shown:
        last = shown[-1][0]
        upd[c["download"]] = gr.update(value=last, interactive=True)
        history = history + [(last, f"{Path(last).parent.name}/{Path(last).name}")]
        upd[c["gallery"]], upd[c["history"]] = history, history
    if snap.end == "stopped":
        done = len(run.phases)
        upd[c["progress"]] = progress_html(snap.fraction, f"Stopped after {done} of {s.phases} phase(s).")
        upd[c["message"]] = (f"Stopped: {done} finished phase(s) kept in `{folder}`" +
                             (f"; continue with `demofusion generate --resume {folder}`." if done else "."))
        return upd
    final = shown[-1][0]
    upd[c["final"]] = final
    upd[c["compare"]] = (shown[0][0], final) if hasattr(gr, "ImageSlider") else shown[0][0]
    upd[c["progress"]] = progress_html(1.0, f"Done: {s.phases} phase(s) in {snap.elapsed:.1f} s.")
    upd[c["message"]] = (f"Done in {snap.elapsed:.1f} s: `{final}`. Its metadata reproduces it: "
                         f"`demofusion generate --from-image {final}`.")
    return upd


def _check_port(host: str, port: int) -> None:
    if not 0 < port < 65536:
        raise CLIError(f"--port {port}: give a port in 1..65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise CLIError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e}); "
                           "pick another with --port") from None


def launch(model="tiny", host="127.0.0.1", port=7860, controlnet=None, device="auto", share=False,
           out="out/ui", setup: dict | None = None) -> int:
    """Load the model once and serve the page until Ctrl-C (``share``: a public gradio.live link)."""
    _check_port(host, port)
    app = build_app(model, controlnet=controlnet, device=device, out=out, setup=setup)
    if host not in LOCAL:
        print(f"warning: listening on {host}: anyone who can reach this machine can use the app and read its "
              "results; use the default 127.0.0.1 to keep it local", file=sys.stderr)
    if share:
        print("warning: --share publishes the app through a public gradio.live link", file=sys.stderr)
    Path(out).mkdir(parents=True, exist_ok=True)
    app.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, share=share, show_error=False, inbrowser=False,
        **_kw(app.launch, allowed_paths=[str(Path(out).resolve())], css=CSS))
    return 0
