"""The browser UI: `demofusion ui` (docs/cli.md, ui). Needs gradio (``pip install -e '.[ui]'``).

Importing this package does not import gradio; :func:`build_app` and :func:`launch` do.
"""

from __future__ import annotations

INSTALL_HINT = "the browser UI needs gradio: pip install -e '.[ui]'"


def have_gradio() -> bool:
    """Whether gradio can be imported here."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        return False
    return True


def build_app(pipe_or_model="tiny", **kwargs):
    """The gradio Blocks of the UI for a model path / preset or a loaded pipeline (see app.build_app)."""
    from .app import build_app as build  # lazy: ui.app imports gradio, an optional extra

    return build(pipe_or_model, **kwargs)


def launch(model="tiny", host="127.0.0.1", port=7860, controlnet=None, device="auto", share=False, out="out/ui",
           setup: dict | None = None):
    """Load ``model`` once and serve the UI on ``host:port`` until Ctrl-C (see app.launch)."""
    from .app import launch as serve  # lazy: ui.app imports gradio, an optional extra

    return serve(model=model, host=host, port=port, controlnet=controlnet, device=device, share=share, out=out,
                 setup=setup)


__all__ = ["build_app", "launch", "have_gradio", "INSTALL_HINT"]
