"""Whether a state dict fits a model: missing, unexpected and mis-shaped keys, and their wording."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from .common import WeightsError


def _shape(v) -> tuple:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


@dataclass
class FitProblems:
    """How a state dict differs from a model's: key names, and (key, file shape, model shape)."""

    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)


def fit_problems(
    expected: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    ignore: Callable[[str], bool] = lambda k: False,
) -> FitProblems:
    """Missing, unexpected and mis-shaped keys of ``state_dict`` against ``expected``.

    Values on both sides may be tensors (real or meta) or shapes; used by the loaders (via
    :func:`check_state_dict`) and by ``demofusion inspect`` (with shapes from the header).
    """
    got = {k for k in state_dict if not ignore(k)}
    return FitProblems(
        missing=sorted(set(expected) - got),
        unexpected=sorted(got - set(expected)),
        mismatched=sorted(
            (k, _shape(state_dict[k]), _shape(expected[k]))
            for k in set(expected) & got
            if _shape(state_dict[k]) != _shape(expected[k])
        ),
    )


def word_fit_problems(problems: FitProblems, what: str, file: str | os.PathLike | None = None) -> str:
    """The message for ``problems``: a one-line summary (naming ``file``), then the key lists."""

    def count(n: int, one: str, many: str) -> str:
        return f"{n} {one if n == 1 else many}"

    def few(items: list, n: int = 3) -> str:
        return ", ".join(items[:n]) + (f", … (+{len(items) - n} more)" if len(items) > n else "")

    def show(items: list, n: int = 12) -> str:
        more = f" … (+{len(items) - n} more)" if len(items) > n else ""
        return "\n    " + "\n    ".join(items[:n]) + more

    wrong = [f"{k}: file {f} vs model {m}" for k, f, m in problems.mismatched]
    summary = []
    if problems.missing:
        summary.append(f"{count(len(problems.missing), 'missing key', 'missing keys')} ({few(problems.missing)})")
    if problems.unexpected:
        summary.append(f"{count(len(problems.unexpected), 'unexpected key', 'unexpected keys')} "
                       f"({few(problems.unexpected)})")
    if wrong:
        summary.append(f"{count(len(wrong), 'shape mismatch', 'shape mismatches')} ({few(wrong)})")
    where = f"{file}: " if file is not None else ""
    msg = [f"{where}the weights do not fit the {what}: " + "; ".join(summary)]
    if problems.missing:
        msg.append(f"  {len(problems.missing)} missing key(s):{show(problems.missing)}")
    if problems.unexpected:
        msg.append(f"  {len(problems.unexpected)} unexpected key(s):{show(problems.unexpected)}")
    if wrong:
        msg.append(f"  {len(wrong)} shape mismatch(es):{show(wrong)}")
    msg.append(
        "  Check that the file is the right component and model kind (SDXL base / Turbo) "
        "and that its config.json matches it; re-download it if it was damaged."
    )
    return "\n".join(msg)


def check_state_dict(
    expected: Mapping[str, torch.Size | tuple],
    state_dict: Mapping[str, torch.Tensor],
    what: str,
    ignore: Callable[[str], bool] = lambda k: False,
    file: str | os.PathLike | None = None,
) -> None:
    """Raise a :class:`WeightsError` naming every missing, unexpected and mis-shaped key."""
    problems = fit_problems(expected, state_dict, ignore)
    if problems:
        raise WeightsError(word_fit_problems(problems, what, file))
