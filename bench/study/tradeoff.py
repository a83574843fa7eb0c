"""Study 4 (``--tradeoff``, part of ``--full``): does it still help when it costs less?

On MultiDigits with 4 tasks, where a full step of a gradient method costs ``T = 4`` backward passes:
PCGrad, CAGrad and MGDA with their weights refreshed every step and every 4 steps (``every=4``: one
full step, then three weighted backward passes), and every loss-weighting method (one backward of a
weighted objective). Δm% against the same single-task models, over the same seeds, and the step time
÷ Sum from the same interleaved timing unit as the 4-task table (:mod:`bench.study.timing`). The runs
are the 4-task study's; this section only selects and draws them.
"""

from __future__ import annotations

from typing import Any, Sequence

from . import figures
from .multidigits import FOUR, columns, table_rows, timing_note
from .report import Report, Table

TITLE = "Does it still help? Cheap modes and loss weighting (MultiDigits, 4 tasks)"


def prepare(entries: Sequence[str], report: Report) -> dict[str, Any]:
    data = report.study("tradeoff", TITLE, describe)
    data.update({"variant": FOUR.key, "entries": ["stl", *entries], "summary": {}})
    return data


def refresh(data: dict[str, Any], variant: dict[str, Any]) -> None:
    """Copy the 4-task study's rows of the trade-off's entries (after each of its results)."""
    summary = variant.get("summary") or {}
    data["summary"] = {e: summary[e] for e in data["entries"] if e in summary}
    data["timing"] = variant.get("timing")
    data["config"] = variant["config"]


def describe(data: dict[str, Any]) -> tuple[list[str], list[Table]]:
    summary = data.get("summary")
    if not summary:
        return [], []
    seeds = max(row["seeds"] for row in summary.values())
    timing = data.get("timing")
    notes = [
        "Gradient methods refreshed every step and every 4 steps (`every=4`: their weights from a full step, then "
        "three steps of one backward of the weighted losses), and the loss-weighting methods (one backward per step), "
        f"on the runs of the 4-task section; Δm% against its single-task models, mean ± std over {seeds} seed(s). "
        + timing_note(timing),
    ]
    rows, bold = table_rows(summary, FOUR.tasks, data["entries"])
    table = Table(
        label="gradsurgery-tradeoff",
        caption=f"Cheap modes and loss weighting on MultiDigits with 4 tasks: test accuracy (%), Δm% (lower is better; "
        f"mean ± std over {seeds} seed(s)) and step time relative to Sum, interleaved.",
        columns=columns(FOUR.tasks), rows=rows, align="l" + "r" * (len(FOUR.tasks) + 2), bold=frozenset(bold),
    )
    return notes, [table]


def draw(data: dict[str, Any], report: Report) -> None:
    summary = data.get("summary") or {}
    naive = ((data.get("timing") or {}).get("entries") or {}).get("naive")
    if figures.tradeoff(report.out / "tradeoff.png", summary, data.get("timing"), naive):
        report.add_figure("tradeoff", "tradeoff.png", "Δm% (mean ± std over seeds) against step time ÷ Sum (median and "
                          "quartiles of the interleaved per-round ratios); every=4 drawn hollow, joined to every=1")
