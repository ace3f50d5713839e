"""Results as people read them: a Markdown table of one evaluation (per phase for a run folder),
and an ablation's table (Markdown + JSON) and plot (matplotlib PNG), one row per contact-sheet cell."""

from __future__ import annotations

from pathlib import Path

COLUMNS = [("fid", "FID"), ("kid", "KID"), ("is", "IS"), ("fid_crop", "FID_c"), ("kid_crop", "KID_c"),
           ("is_crop", "IS_c"), ("clip_score", "CLIP")]


def number(value) -> float | None:
    """A metric's headline number: the value, or the mean of {mean, std}; None where not computed."""
    if isinstance(value, dict):
        value = value.get("mean")
    return None if value is None else float(value)


def cell_text(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, dict):
        std = value.get("std")
        return f"{value['mean']:.4g}" + ("" if std is None else f" ± {std:.2g}")
    return f"{value:.4g}"


def present(rows: list[dict]) -> list[tuple[str, str]]:
    """The columns some row has a number for."""
    return [(k, title) for k, title in COLUMNS if any(number(r.get(k)) is not None for r in rows)]


def markdown_table(names: list[str], rows: list[dict], first: str = "set") -> str:
    cols = present(rows)
    lines = ["| " + " | ".join([first, *(t for _, t in cols)]) + " |", "|" + "---|" * (len(cols) + 1)]
    for name, row in zip(names, rows):
        lines.append("| " + " | ".join([name, *(cell_text(row.get(k)) for k, _ in cols)]) + " |")
    return "\n".join(lines)


def result_markdown(result: dict) -> str:
    """One evaluation as Markdown: the metrics table and the protocol's key facts."""
    phases = result.get("phases")
    names, rows = (list(phases), list(phases.values())) if phases else (["images"], [result])
    p = result["protocol"]
    facts = (f"backend {p['backend']} (resize: {p['resize']}); Inception sha256 {str(p['inception_sha256'])[:12]}; "
             f"{p['crops']} crops of {p['crop_size']}² per picture, seed {p['crop_seed']}; "
             f"reference pictures: {p['reference']}; CLIP: {p['clip_model'] or 'not computed'}")
    return markdown_table(names, rows, "phase" if phases else "set") + "\n\n" + facts + "\n"


def is_default_cell(name: str, changes: dict, defaults: dict) -> bool:
    """The paper's setting: the full model, or a sweep value equal to the default."""
    return name == "full" or (bool(changes) and all(defaults.get(k) == v for k, v in changes.items()))


def ablation_plot(path: Path, names: list[str], rows: list[dict], defaults: list[bool]) -> None:
    """One panel per metric, one bar per cell in contact-sheet order, the paper's default hatched and
    labelled, so the plot is read cell by cell beside the sheet."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    cols = present(rows)
    fig, axes = plt.subplots(1, max(1, len(cols)), figsize=(3.2 * max(1, len(cols)), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], cols):
        values = [number(r.get(key)) for r in rows]
        bars = ax.bar(range(len(names)), [0 if v is None else v for v in values],
                      color=["tab:orange" if d else "tab:blue" for d in defaults])
        for bar, d in zip(bars, defaults):
            if d:
                bar.set_hatch("//")
        ax.set_title(title + (" (↓ better)" if key.startswith(("fid", "kid")) else " (↑ better)"), fontsize=9)
        ax.set_xticks(range(len(names)), [n + (" *" if d else "") for n, d in zip(names, defaults)],
                      rotation=45, ha="right", fontsize=7)
    fig.suptitle("* hatched: the paper's default", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
