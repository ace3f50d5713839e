"""What `demofusion inspect` reports: one :class:`ComponentReport` per file part, gathered in a
:class:`Report`. Its own module, below :mod:`demofusion.inspection.checkpoint` and
:mod:`demofusion.inspection.kinds`, which both build reports (importable from :mod:`demofusion.inspection`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


@dataclass
class ComponentReport:
    name: str
    file: str
    params: int
    dtypes: dict
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    note: str = ""
    mismatched: list = field(default_factory=list)  # "key: file (shape) vs model (shape)"
    problems: list = field(default_factory=list)  # one line each, as the loader words them
    warnings: list = field(default_factory=list)  # loadable, but e.g. float16 would overflow
    values_checked: bool = False  # every value read (finite: else a problem)

    @property
    def ok(self) -> bool:
        return not (self.problems or self.note)


@dataclass
class Report:
    path: str
    layout: str  # "diffusers folder" | "component folder" | "component file" | "single-file" | "unreadable file"
    kind: str
    components: list
    usage: str = ""  # what it is for and how to use it

    def problems(self) -> list[str]:
        """Everything that stops these weights from loading, one line each (no duplicates);
        each is the first line of the error the loaders raise for it."""
        out = []
        for c in self.components:
            for p in c.problems + ([f"{c.file}: {c.note}"] if c.note else []):
                if p not in out:
                    out.append(p)
        return out

    @property
    def ok(self) -> bool:
        """True when the files are intact and every key and shape fits the model (loadable)."""
        return not self.problems()

    def text(self) -> str:
        lines = [f"{self.path}", f"  layout: {self.layout}", f"  model:  {self.kind}"]
        for c in self.components:
            dt = ", ".join(f"{k} ({v} tensors)" for k, v in c.dtypes.items())
            desc = f"{c.params / 1e6:.2f} M parameters, {dt}" if c.dtypes else "no readable tensors"
            lines.append(f"  {c.name}: {desc}  [{c.file}]")
            if c.note:
                lines.append(f"    {c.note}")
            for p in c.problems:
                lines.append(f"    problem: {p}")
            for what, keys in (("missing keys", c.missing), ("unexpected keys", c.unexpected),
                               ("shape mismatches", c.mismatched)):
                if keys:
                    more = f" … (+{len(keys) - 8} more)" if len(keys) > 8 else ""
                    lines.append(f"    {len(keys)} {what}: {', '.join(keys[:8])}{more}")
            if c.ok:
                keys = "every key read as a LoRA pair" if c.name == "lora" else "keys match the model exactly"
                lines.append(f"    {keys}" + (", values all finite" if c.values_checked else ""))
            lines += [f"    warning: {w}" for w in c.warnings]
        if self.usage:
            lines.append(f"  {self.usage}")
        n = len(self.problems())
        if n:
            lines.append(f"  {n} problem(s): these weights would not load")
        return "\n".join(lines)


def _meta(header: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """Meta-device stand-ins for the file's tensors (shape and dtype only)."""
    return {k[len(prefix):]: torch.empty(v["shape"], dtype=_DTYPES.get(v["dtype"], torch.float32), device="meta")
            for k, v in header.items() if k.startswith(prefix)}
