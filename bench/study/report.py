"""The study's outputs: ``results.json`` (every number), ``results.md`` and ``results.tex`` (tables).

All three are rewritten after every finished study/method, each through a temporary file and an
atomic rename, so an interrupted run leaves complete, parseable files holding what had finished.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence


@dataclass(frozen=True)
class Table:
    label: str
    caption: str
    columns: Sequence[str]
    rows: Sequence[Sequence[str]]
    align: str
    bold: frozenset[tuple[int, int]] = frozenset()  # (row, column) cells to emphasise


Describe = Callable[[dict[str, Any]], tuple[list[str], list[Table]]]


@dataclass
class Section:
    title: str
    describe: Describe  # the study's JSON dict → (notes, tables), rerun at every flush
    notes: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (file name, what it shows and how)


def jsonable(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        # mkstemp creates owner-only files; results are meant to be shared like any other output.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_TEX_SYMBOLS = {"±": r"$\pm$", "Δ": r"$\Delta$", "↓": r"$\downarrow$", "↑": r"$\uparrow$", "×": r"$\times$",
                "−": "$-$", "°": r"$^\circ$", "≈": r"$\approx$", "—": "---", "–": "--"}


def num(value: float, spec: str) -> str:
    """``value`` formatted with ``spec`` and a true minus sign (rendered as ``$-$`` in LaTeX)."""
    return format(value, spec).replace("-", "−")


def tex(text: str) -> str:
    """Plain text (with the few symbols the tables use) as LaTeX."""
    return "".join(_TEX_ESCAPES.get(ch, _TEX_SYMBOLS.get(ch, ch)) for ch in text)


def markdown(title: str, header: Sequence[str], sections: Sequence[Section]) -> str:
    lines = [f"# {title}", "", *header, ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for note in section.notes:
            lines += [note, ""]
        for table in section.tables:
            lines += [f"**{table.caption}**", ""]
            lines.append("| " + " | ".join(table.columns) + " |")
            lines.append("|" + "|".join(":--" if a == "l" else "--:" for a in table.align) + "|")
            for i, row in enumerate(table.rows):
                cells = [f"**{cell}**" if (i, j) in table.bold else cell for j, cell in enumerate(row)]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        for name, caption in section.figures:
            lines += [f"![{name}]({name})", "", f"*{caption}*", ""]
    return "\n".join(lines)


def latex(header: Sequence[str], sections: Sequence[Section]) -> str:
    lines = [f"% {line}" for line in header] + ["% Needs \\usepackage{booktabs} in the preamble.", ""]
    for section in sections:
        for table in section.tables:
            lines += [
                "\\begin{table}[t]",
                "\\centering",
                f"\\caption{{{tex(table.caption)}}}",
                f"\\label{{tab:{table.label}}}",
                f"\\begin{{tabular}}{{{table.align}}}",
                "\\toprule",
                " & ".join(tex(c) for c in table.columns) + " \\\\",
                "\\midrule",
            ]
            for i, row in enumerate(table.rows):
                cells = [f"\\textbf{{{tex(c)}}}" if (i, j) in table.bold else tex(c) for j, c in enumerate(row)]
                lines.append(" & ".join(cells) + " \\\\")
            lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(lines)


class Report:
    """The run's results, flushed to ``out`` as they grow."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.out = out
        self.data: dict[str, Any] = {"meta": meta, "studies": {}}
        self.sections: dict[str, Section] = {}

    def study(self, key: str, title: str, describe: Describe) -> dict[str, Any]:
        """The JSON dict of study ``key``, whose tables ``describe`` builds at every flush."""
        self.sections[key] = Section(title, describe)
        data: dict[str, Any] = self.data["studies"].setdefault(key, {})
        return data

    def add_figure(self, key: str, name: str, caption: str) -> None:
        """Record a written figure (again: replace); its caption gets the command that produced it."""
        caption = f"{caption} (`{self.data['meta']['command']}`)"
        section = self.sections[key]
        section.figures = [f for f in section.figures if f[0] != name] + [(name, caption)]
        listed = [f for f in self.data["studies"][key].get("figures", []) if f["file"] != name]
        self.data["studies"][key]["figures"] = listed + [{"file": name, "caption": caption}]

    def header(self) -> list[str]:
        meta = self.data["meta"]
        machine = meta["machine"]
        cpu = machine.get("cpu_isa") or {}
        isa = cpu.get("isa") or {}
        shown = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if isa.get(f)) or "none of avx2/avx512f/amx"
        elapsed = f", {meta['elapsed_s']:.0f} s" if meta.get("elapsed_s") is not None else ""
        return [
            f"Generated by `{meta['command']}` — preset `{meta['preset']}`, status **{meta['status']}**{elapsed}.",
            f"git {meta['git']}, gradsurgery {meta['versions'].get('gradsurgery')}, torch {meta['versions'].get('torch')}, "
            f"device {machine.get('device_name')}; {machine.get('workers', 1)} worker process(es), one torch thread each.",
            f"CPU {machine.get('cpu')} ({cpu.get('vendor') or cpu.get('architecture', '?')}), torch CPU kernels "
            f"{cpu.get('torch_cpu_capability', '?')}, ISA flags: {shown}. The numbers repeat exactly on this machine; "
            "another CPU or instruction set rounds differently and moves the last digits.",
            f"Started {meta['started']}; every number (seeds, configs, per-seed values) is in results.json.",
        ]

    def flush(self) -> None:
        for key, section in self.sections.items():
            section.notes, section.tables = section.describe(self.data["studies"][key])
        header = self.header()
        sections = list(self.sections.values())
        write_atomic(self.out / "results.json", json.dumps(jsonable(self.data), indent=1, allow_nan=False) + "\n")
        write_atomic(self.out / "results.md", markdown("gradsurgery joint-training study", header, sections))
        write_atomic(self.out / "results.tex", latex([h.replace("**", "").replace("`", "") for h in header], sections))
