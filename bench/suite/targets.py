"""The speed issues' targets, checked case by case against one recorded run of the suite."""

from __future__ import annotations

from typing import Any

import re

from bench.methods import ORIGINAL
from bench.suite.measure import peer_of, whole_of
from bench.suite.variants import EVERY_METHOD_KINDS, LOSS_KINDS
from bench.tiny import TINY_KINDS

BF16_MIN_SAVING = 16 * 2**20  # below this, the RSS differences between fresh processes (a few MiB) hide the saving
EVERY_METHOD_BOUND = 1.15
LOSS_BOUND, LOSS_T = 1.05, (8, 16)  # loss weighting ÷ naive summation, at those T
# Cheap modes ÷ the T-backward floor, per (T, k): every=k averaged over a whole period; tasks_per_step=k.
EVERY_BOUNDS = {(8, 4): 0.45, (16, 8): 0.25}
TASKS_PER_STEP_BOUNDS = {(16, 4): 0.30}
GRANULARITY_BOUND, GRANULARITY_T = 1.02, (8,)  # per-block step ÷ the whole-model step of the same method


def ratio_in(row: dict[str, Any], kind: str, label: str, key: str = "of_medians") -> float | None:
    """One same-run ratio of a time row (``label``: ``over_naive``, ``over_floor``, ``over_torchjd``, …)."""
    entry = row["ratios"].get(kind, {}).get(label)
    return None if entry is None else entry[key]


def targets(
    rows: list[dict[str, Any]], mems: list[dict[str, Any]], tiny: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """Each target of the issues, per case: the measured figure(s), the bound, met or not.

    Timing checks carry both same-run estimates: ``value`` (ratio of the medians) and ``paired`` (median
    of the per-round ratios); ``met`` is ``"yes"`` when both are within the bound, ``"no"`` when neither
    is, ``"mixed"`` otherwise (the load moved more than the margin).
    """
    out: list[dict[str, Any]] = []

    def add(
        target: str, case: str, value: float | None, bound: float, unit: str = "×", paired: float | None = None
    ) -> None:
        if value is None:
            return
        within = [v >= bound if unit == "≥" else v <= bound for v in (value, paired) if v is not None]
        met = "yes" if all(within) else ("no" if not any(within) else "mixed")
        out.append(
            {"target": target, "case": case, "value": value, "paired": paired, "bound": bound, "unit": unit, "met": met}
        )

    def add_ratio(target: str, case: str, row: dict[str, Any], kind: str, label: str, bound: float) -> None:
        add(target, case, ratio_in(row, kind, label), bound, paired=ratio_in(row, kind, label, "median_paired"))

    for r in rows:
        case = f"{r['model']} T={r['T']}"
        for engine in ("loop", "batched"):
            for method in ORIGINAL:
                kind = f"gs-{method}-{engine}"
                if r["T"] >= 4:
                    for label, peer, bound in (
                        ("over_floor", "the T-backward floor", 1.10),
                        ("over_torchjd", "TorchJD autojac", 0.75),
                        ("over_autogram", "TorchJD autogram", 0.75),
                    ):
                        target = f"parameter mode ({engine}) ≤ {bound:.2f}× {peer} (T ≥ 4)"
                        add_ratio(target, f"{case} {kind}", r, kind, label, bound)
        for method in ORIGINAL:
            if r["T"] <= 8:
                kind = f"gs-{method}-repr"
                add_ratio("representation mode ≤ 1.3× naive (T ≤ 8)", f"{case} {kind}", r, kind, "over_naive", 1.3)
        for kind in EVERY_METHOD_KINDS:
            add_ratio(
                f"every other registered method, parameter mode (loop) ≤ {EVERY_METHOD_BOUND:.2f}× the T-backward floor",
                f"{case} {kind}",
                r,
                kind,
                "over_floor",
                EVERY_METHOD_BOUND,
            )
        if r["T"] in LOSS_T:
            for kind in LOSS_KINDS:
                add_ratio(
                    f"loss-weighting method ≤ {LOSS_BOUND:.2f}× naive summation (T = {', '.join(map(str, LOSS_T))})",
                    f"{case} {kind}",
                    r,
                    kind,
                    "over_naive",
                    LOSS_BOUND,
                )
        for kind in r["ratios"]:
            every = re.fullmatch(r"gs-\w+-loop-every(\d+)", kind)
            tps = re.fullmatch(r"gs-\w+-loop-tps(\d+)", kind)
            if every and (r["T"], int(every[1])) in EVERY_BOUNDS:
                k = int(every[1])
                bound = EVERY_BOUNDS[(r["T"], k)]
                target = f"every={k} at T = {r['T']}: mean step over a period ≤ {bound:.2f}× the T-backward floor"
                add_ratio(target, f"{case} {kind}", r, kind, "over_floor", bound)
            if tps and (r["T"], int(tps[1])) in TASKS_PER_STEP_BOUNDS:
                k = int(tps[1])
                bound = TASKS_PER_STEP_BOUNDS[(r["T"], k)]
                target = f"tasks_per_step={k} at T = {r['T']}: step ≤ {bound:.2f}× the T-backward floor"
                add_ratio(target, f"{case} {kind}", r, kind, "over_floor", bound)
            if whole_of(kind) is not None and r["T"] in GRANULARITY_T:
                target = f"granularity (per layer, per parameter) ≤ {GRANULARITY_BOUND:.2f}× the whole-model step (T = 8)"
                add_ratio(target, f"{case} {kind} ÷ {whole_of(kind)}", r, kind, "over_whole", GRANULARITY_BOUND)
    for m in mems:
        case = f"{m['model']} T={m['T']}"
        v = {kind: entry for kind, entry in m["variants"].items() if "error" not in entry}
        for kind in v:
            if kind.startswith("gs-") and not kind.endswith("-repr"):
                for prefix, name in (("torchjd", "autojac"), ("autogram", "autogram")):
                    peer = peer_of(kind, prefix) if peer_of(kind, prefix) in v else f"{prefix}-pcgrad"
                    if peer in v:
                        add(
                            f"parameter-mode peak memory ≤ TorchJD {name}'s (first steps; later steps)",
                            f"{case} {kind} ÷ {peer}",
                            v[kind]["peak_extra"] / v[peer]["peak_extra"],
                            1.0,
                            paired=_steady_ratio(v[kind], v[peer]),
                        )
        half_buffer = m["T"] * m["shared_params"] * 2  # bytes that bf16 storage saves on the fp32 (T, P) buffer
        if "gs-pcgrad-loop-bf16" in v and "gs-pcgrad-loop" in v and half_buffer >= BF16_MIN_SAVING:
            saved = [
                v["gs-pcgrad-loop"][key] - v["gs-pcgrad-loop-bf16"][key]
                for key in ("peak_extra", "steady_peak_extra")
                if key in v["gs-pcgrad-loop"]
            ]
            add(
                "bf16 storage: peak extra drops by the saved half buffer (saving ÷ T·P·2 bytes; first steps; later steps)",
                f"{case} gs-pcgrad-loop-bf16",
                saved[0] / half_buffer,
                0.9,
                "≥",
                paired=saved[1] / half_buffer if len(saved) > 1 else None,
            )
    if tiny is not None:
        for kind in TINY_KINDS:
            o = tiny["overhead_over_floor"].get(kind)
            if kind.startswith("gs-") and o is not None:
                add(
                    "tiny problem: overhead ≤ 150 µs over the floor",
                    kind,
                    o["of_medians_us"],
                    150.0,
                    "µs",
                    paired=o["median_paired_us"],
                )
    return out


def _steady_ratio(a: dict[str, int], b: dict[str, int]) -> float | None:
    if "steady_peak_extra" not in a or "steady_peak_extra" not in b:
        return None
    return a["steady_peak_extra"] / b["steady_peak_extra"]


def target_summary(checks: list[dict[str, Any]]) -> list[list[str]]:
    """Per target: how many cases meet it (both estimates), are mixed, miss it; the range of the figures."""
    rows = []
    for target in dict.fromkeys(c["target"] for c in checks):
        cs = [c for c in checks if c["target"] == target]
        counts = {k: sum(c["met"] == k for c in cs) for k in ("yes", "mixed", "no")}
        values = [c["paired"] if c["paired"] is not None else c["value"] for c in cs]
        unit = cs[0]["unit"]
        rows.append(
            [
                target,
                str(counts["yes"]),
                str(counts["mixed"]),
                str(counts["no"]),
                f"{format_check(min(values), unit)} – {format_check(max(values), unit)}",
            ]
        )
    return rows


def format_check(value: float, unit: str) -> str:
    return f"{value:.0f} µs" if unit == "µs" else (f"{value:.3g}" if unit == "≥" else f"{value:.3g}×")
