"""One UI run in a worker thread, without gradio: its folder written as the CLI writes one
(``run.json``; ``phase_<k>.png`` with the metadata `demofusion generate --from-image` replays;
``phase_<k>.safetensors``, so `demofusion generate --resume` finishes a stopped run), every step
and finished phase reported through a queue, and Stop after the current step (raised from the
pipeline's ``callback``).
"""

from __future__ import annotations

import hashlib
import queue
import shutil
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..errors import InputError, NonFiniteError, first_line
from ..frontend.control import control_hashes
from ..frontend.errors import is_oom, oom_message
from ..frontend.runs import run_id
from ..frontend.sampling import sampler_name
from ..outputs import RUN_FILE, new_run_folder, save_latents, save_png, write_json
from ..pipeline.steps import run_scheduler
from .knobs import in_page_words
from .runner import Model, Plan


class Stopped(Exception):
    """Raised from the step callback when Stop was pressed."""


@dataclass
class Snapshot:
    """What changed since the last look: progress, newly finished phases, the end (if it came)."""

    phase: int
    step: int
    fraction: float
    elapsed: float
    new_phases: list  # [(k, path of phase_k.png, (h, w))]
    end: str | None = None  # "done", "stopped" or "error"
    message: str = ""


class Run:
    """One generation: ``start()`` makes its folder and starts the worker; ``watch()`` yields
    :class:`Snapshot`\\ s until it ends; ``stop()`` ends it after the current step."""

    def __init__(self, model: Model, plan: Plan, out_root="out/ui"):
        self.model, self.plan, self.out_root = model, plan, Path(out_root)
        self.events: queue.Queue = queue.Queue()
        self.stop_requested = threading.Event()
        self.folder: Path | None = None
        self.phases: list = []  # [(k, path, (h, w))]
        self.thread: threading.Thread | None = None
        self.t0 = time.perf_counter()
        evals = plan.settings.unet_evaluations()
        self._evals, self._total = evals, max(sum(evals), 1)

    # the folder: inputs copied in, every recorded key filled, run.json
    def start(self) -> None:
        self.folder = new_run_folder(self.out_root, self.plan.params["seed"])
        try:
            self._complete_params()
        except OSError as e:
            raise InputError(f"cannot write the run folder {self.folder} ({e.strerror or e})") from None
        self.thread = threading.Thread(target=self._work, name="demofusion-ui-run", daemon=True)
        self.t0 = time.perf_counter()
        self.thread.start()

    def _complete_params(self) -> None:
        p, m = self.plan.params, self.model
        names = {"image": "input", "control_source": "control_source", "control_image": "control_map"}
        for key, src in self.plan.inputs.items():
            dst = self.folder / f"{names[key]}{Path(src).suffix.lower() or '.png'}"
            shutil.copyfile(src, dst)
            p[key] = [str(dst.resolve())] if key == "control_image" else str(dst.resolve())
        if p.get("image"):
            p["image_sha256"] = hashlib.sha256(Path(p["image"]).read_bytes()).hexdigest()[:16]
        p["control_sha256"] = control_hashes(p)
        p.update(model_hash=m.fingerprint, version=__version__,
                 sampler=sampler_name(run_scheduler(m.pipe.scheduler, self.plan.settings)),
                 controlnet_hash=m.controlnet_hash if p.get("controlnet") else None, vae_hash=None, lora_hash=None)
        chosen = ("scheduler", "sigmas") if self.plan.kwargs.get("sampler") else ()  # the page's Sampler menu
        p.update({k: v for k, v in m.setup.items() if k not in chosen})  # the app's --vae, --lora, --scheduler …
        p["run_id"] = run_id(p)
        write_json(self.folder / RUN_FILE, p)

    def _work(self) -> None:
        s, params = self.plan.settings, self.plan.params

        def callback(phase, step, t, latents):
            self.events.put(("step", phase, step))
            if self.stop_requested.is_set():
                raise Stopped()

        def on_phase_end(k, image, latents):
            h, w = s.sizes[k - 1]
            save_latents(self.folder / f"phase_{k}.safetensors", latents.detach(),
                         {"run_id": params["run_id"], "phase": str(k), "size": f"{h}x{w}"})
            path = self.folder / f"phase_{k}.png"
            save_png(image, path, {**params, "phase": k})
            self.events.put(("phase", k, path, (h, w)))

        try:
            with self.model.lock, warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="prompt is longer")
                self.model.pipe_for(self.plan.mode)(**self.plan.kwargs, callback=callback, on_phase_end=on_phase_end)
            self.events.put(("done",))
        except Stopped:
            self.events.put(("stopped",))
        except (InputError, NonFiniteError) as e:
            self.events.put(("error", in_page_words(first_line(e), self.plan.inputs.values())))
        except Exception as e:  # noqa: BLE001 - the page says one line; the server log has the traceback
            traceback.print_exc(file=sys.stderr)
            msg = oom_message(e) if is_oom(e) else \
                f"internal error ({type(e).__name__}: {first_line(e)}); the server's log has the traceback"
            self.events.put(("error", msg))

    def stop(self) -> None:
        self.stop_requested.set()

    def join(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    def fraction(self, phase: int, step: int) -> float:
        if not phase:
            return 0.0
        n, first = self.plan.settings.phase_steps(phase - 1)  # a phase may start late (upscale_strength)
        done = sum(self._evals[:phase - 1]) + self._evals[phase - 1] * (step + 1 - first) / max(n - first, 1)
        return min(done / self._total, 1.0)

    def watch(self, interval: float = 0.25):
        """Snapshots as things happen (steps coalesced to at most one per ``interval``), the last one with ``end``."""
        phase = step = 0
        while True:
            try:
                events = [self.events.get(timeout=interval)]
            except queue.Empty:
                if self.thread is not None and not self.thread.is_alive() and self.events.empty():
                    events = [("error", "the run ended without a result; the server's log says why")]
                else:
                    continue
            time.sleep(0.02)  # let a burst of steps arrive together
            while True:
                try:
                    events.append(self.events.get_nowait())
                except queue.Empty:
                    break
            new, end, message = [], None, ""
            for ev in events:
                if ev[0] == "step":
                    phase, step = ev[1], ev[2]
                elif ev[0] == "phase":
                    self.phases.append(ev[1:])
                    new.append(ev[1:])
                else:
                    end, message = ev[0], (ev[1] if len(ev) > 1 else "")
            frac = 1.0 if end == "done" else self.fraction(phase, step)
            yield Snapshot(phase, step, frac, time.perf_counter() - self.t0, new, end, message)
            if end:
                return


class Sessions:
    """The running generation of each browser session, so that its Stop stops its own run."""

    def __init__(self):
        self._runs: dict[str, Run] = {}
        self._lock = threading.Lock()

    def add(self, session: str, run: Run) -> None:
        with self._lock:
            self._runs[session] = run

    def remove(self, session: str, run: Run) -> None:
        with self._lock:
            if self._runs.get(session) is run:
                del self._runs[session]

    def stop(self, session: str) -> bool:
        with self._lock:
            run = self._runs.get(session)
        if run is None:
            return False
        run.stop()
        return True
