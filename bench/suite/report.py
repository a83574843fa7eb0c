"""The suite's report: the tables on the terminal, ``suite.md`` (its hand-written notes kept) and the
step-time plot, from the rows of one recorded run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench import harness
from bench.methods import ORIGINAL
from bench.suite.measure import MEMORY_KINDS, MMAP_THRESHOLD, PEERS
from bench.suite.targets import format_check, ratio_in, target_summary
from bench.suite.variants import EVERY_METHOD_KINDS, KINDS, LOSS_KINDS, LOSS_PEER_KINDS, Spec, method_of
from bench.tiny import TINY_KINDS

NOTES_MARKER = "<!-- Hand-written notes below this line are kept when bench_suite rewrites the file above it. -->"
PLOT_KINDS = (
    "naive",
    "floor",
    "gs-pcgrad-loop",
    "gs-cagrad-loop",
    "gs-mgda-loop",
    "gs-pcgrad-repr",
    "gs-mgda-repr",
    "torchjd-pcgrad",
    "torchjd-mgda",
    "autogram-pcgrad",
    "pyo-pcgrad",
)

def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _kinds(rows: list[dict[str, Any]]) -> list[str]:
    """The variants of the run in table order: the grid's, every other registered method's, the
    loss-weighting methods' and their TorchJD scalarizers, then the rest (cheap modes, granularities)
    in the order the run timed them."""
    present = list(dict.fromkeys(kind for r in rows for kind in r["ratios"]))
    known = [kind for kind in (*KINDS, *EVERY_METHOD_KINDS, *LOSS_KINDS, *LOSS_PEER_KINDS) if kind in present]
    return known + [kind for kind in present if kind not in known]


def _cell(row: dict[str, Any], kind: str, label: str) -> str:
    a, b = ratio_in(row, kind, label), ratio_in(row, kind, label, "median_paired")
    return "—" if a is None else f"{a:.2f} ({b:.2f})"


def loss_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Each loss-weighting method ÷ naive summation and ÷ TorchJD's scalarizer, per problem that timed it."""
    timed = [r for r in rows if any(kind in r["ratios"] for kind in LOSS_KINDS)]
    header = ["method"] + [f"{r['model']} T={r['T']}: {what}" for r in timed for what in ("÷ naive", "÷ TorchJD")]
    body = []
    for kind in LOSS_KINDS:
        cells = [_cell(r, kind, label) for r in timed for label in ("over_naive", "over_torchjd")]
        if any(c != "—" for c in cells):
            body.append([kind, *cells])
    return header, body


def cheap_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The cheap modes ÷ the floor (an every=k step: the mean over a whole period), with the ideal."""
    header = ["variant", "problem", "÷ floor", "÷ naive", "ideal ÷ floor"]  # ideal: the mode's own floor
    body = []
    for r in rows:
        for kind in r["ratios"]:
            option = kind.rsplit("-", 1)[-1]
            if not kind.startswith("gs-") or not (option.startswith("every") or option.startswith("tps")):
                continue
            if option.startswith("every"):
                ideal = r.get("ideal_over_floor", {}).get(option)
                ideal_cell = "—" if ideal is None else f"{ideal['of_medians']:.2f} ({ideal['median_paired']:.2f})"
            else:  # tasks_per_step=k: its own floor, k backward passes
                ideal_cell = _cell(r, f"floor-tasks{option.removeprefix('tps')}", "over_floor")
            body.append(
                [kind, f"{r['model']} T={r['T']}", _cell(r, kind, "over_floor"), _cell(r, kind, "over_naive"), ideal_cell]
            )
    return header, body


def granularity_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Per-block surgery ÷ the whole-model step of the same method (and ÷ the floor)."""
    header = ["variant", "problem", "÷ whole model", "÷ floor"]
    body = [
        [kind, f"{r['model']} T={r['T']}", _cell(r, kind, "over_whole"), _cell(r, kind, "over_floor")]
        for r in rows
        for kind in r["ratios"]
        if ratio_in(r, kind, "over_whole") is not None
    ]
    return header, body


def ratio_table(rows: list[dict[str, Any]], label: str) -> tuple[list[str], list[list[str]]]:
    header = ["variant"] + [f"{r['model']} T={r['T']}" for r in rows]
    return header, [[kind, *(_cell(r, kind, label) for r in rows)] for kind in _kinds(rows)]


def peer_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["ours", "÷"] + [f"{r['model']} T={r['T']}" for r in rows]
    body = []
    names = {"torchjd": "TorchJD autojac", "autogram": "TorchJD autogram", "pyo": "pytorch-optimizer"}
    for mode in ("loop", "batched", "repr"):
        for method in ORIGINAL:
            kind = f"gs-{method}-{mode}"
            for label, prefix in PEERS:
                peer = names[prefix]
                cells = [_fmt(ratio_in(r, kind, label)) for r in rows]
                if any(c != "—" for c in cells):
                    body.append([kind, peer, *cells])
    return header, body


def memory_table(mems: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["variant"]
    for m in mems:
        header += [f"{m['model']} T={m['T']}: first 2 steps, MiB (÷ naive)", "later steps"]
    body = []
    for kind in [k for k in MEMORY_KINDS if any(k in m["variants"] for m in mems)]:
        cells = []
        for m in mems:
            v = m["variants"]
            for key in ("peak_extra", "steady_peak_extra"):
                if kind in v and "error" in v[kind]:
                    cells.append("failed")
                    continue
                if kind not in v or key not in v[kind] or "error" in v.get("naive", {}):
                    cells.append("—")
                    continue
                value, base = v[kind][key], v["naive"][key]
                cells.append(f"{value / 2**20:.1f} ({value / base:.2f})" if base > 0 else f"{value / 2**20:.1f}")
        body.append([kind, *cells])
    return header, body


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    mlp = sorted((r for r in rows if r["model"] == "mlp"), key=lambda r: r["T"])
    if not mlp:
        return
    Ts = [r["T"] for r in mlp]
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    ax_ms, ax_ratio = fig.subplots(1, 2)
    styles = {"naive": ("k", "-"), "floor": ("0.45", "--")}
    colours = {"pcgrad": "tab:blue", "cagrad": "tab:orange", "mgda": "tab:green"}
    for kind in PLOT_KINDS:
        ms = [r["variants"][kind]["median_s"] * 1e3 for r in mlp]
        ratio = [ratio_in(r, kind, "over_naive") for r in mlp]
        if kind in styles:
            colour, line = styles[kind]
            marker = "o"
        else:
            colour = colours.get(method_of(kind), "tab:red")
            line = {"gs": "-", "torchjd": ":", "autogram": "-.", "pyo": (0, (1, 3))}[kind.split("-")[0]]
            marker = "s" if kind.endswith("-repr") else ("^" if not kind.startswith("gs-") else "o")
            if kind.startswith("pyo"):
                colour = "tab:purple"
        for ax, values in ((ax_ms, ms), (ax_ratio, ratio)):
            ax.plot(Ts, values, color=colour, linestyle=line, marker=marker, label=kind, linewidth=1.5, markersize=4)
    ax_ms.set(
        xscale="log",
        yscale="log",
        xlabel="T (tasks)",
        ylabel="ms per step (median)",
        title="MLP step time, CPU, 1 thread",
    )
    ax_ratio.set(
        xscale="log",
        yscale="log",
        xlabel="T (tasks)",
        ylabel="÷ naive summation (same run)",
        title="ratio to naive summation",
    )
    for ax in (ax_ms, ax_ratio):
        ax.set_xticks(Ts, [str(t) for t in Ts])
        ax.minorticks_off()
        ax.grid(True, which="major", alpha=0.3)
    ax_ratio.legend(fontsize=7, loc="upper left", ncol=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def markdown(
    rows: list[dict[str, Any]],
    mems: list[dict[str, Any]],
    tiny: dict[str, Any] | None,
    checks: list[dict[str, Any]],
    *,
    command: str,
    wall_s: float,
    plot_name: str,
) -> str:
    ctx = rows[0]
    m, v, g = ctx["machine"], ctx["versions"], ctx["git"]
    load = ", ".join(f"{x:.1f}" for x in m["loadavg_at_start"] or [])

    def table(header: list[str], body: list[list[Any]]) -> str:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
        return "\n".join(lines)

    parts = [
        "# Speed suite (CPU)",
        "",
        f"`{command}` — run {ctx['timestamp']}, {wall_s / 60:.1f} min. Machine: {m['cpu']}, {m['nproc']} CPUs "
        f"(load average at start {load}), torch {v['torch']} on {ctx['torch_threads']} intra-op thread, "
        f"torchjd {v['torchjd']}, pytorch_optimizer {v['pytorch_optimizer']}; gradsurgery at `{g['rev']}` "
        f"(library changes uncommitted: {g['library_dirty']}, digest `{g['library_digest']}`). Every number below is in "
        "`suite.jsonl` with its per-round times. The machine is shared and noisy: the variants run interleaved "
        "(one call of each per round, order rotated) and the tables give **ratios measured in the same run** — "
        "ratio of the medians, with the median of the per-round ratios in brackets.",
        "",
        "Models: "
        + "; ".join(
            f"**{r['model']}**: {Spec(**r['spec']).describe()}, " f"{r['shared_params'] / 1e6:.2f}M shared parameters"
            for r in {r["model"]: r for r in rows}.values()
        )
        + ". Timed rounds: "
        + ", ".join(f"{r['model']} T={r['T']}: {r['variants']['naive']['rounds']}" for r in rows)
        + ".",
        "",
        "Variants: `naive` = `sum(losses).backward(); step`; `floor` = T × `autograd.grad` and nothing else; "
        "`floor-batched` = the same T gradients from one vmapped backward; `gs-{method}-{loop,batched}` = ours in "
        "parameter mode with that engine; `gs-{method}-repr` = ours in representation mode "
        "(`opt.backward(losses, features=z)`); `gs-pcgrad-loop-bf16` = `storage_dtype=torch.bfloat16`; "
        "`torchjd-*` = `mtl_backward(losses, features=z)` + `jac_to_grad(encoder, aggregator)`; `autogram-*` = "
        "TorchJD's `autogram.Engine(encoder, batch_dim=None)` → `compute_gramian` → weighting → `losses.backward(w)`; "
        "`pyo-pcgrad` = pytorch-optimizer's `PCGrad.pc_backward`. Every other registered method "
        "(`gradsurgery.methods.REGISTRY`, built by `bench/methods.py` with the library's defaults) is timed "
        "as `gs-{name}-loop` (gradient methods) or `gs-{name}` (loss-weighting methods: one backward) on "
        + (", ".join(sorted({f"{r['model']} T={r['T']}" for r in rows if any(k in r["ratios"] for k in EVERY_METHOD_KINDS)}))
           or "no problem in this run")
        + ".",
        "",
        f"![step time vs T]({plot_name})",
        "",
        "## Step time ÷ naive summation",
        "",
        "Naive step, ms: "
        + ", ".join(f"{r['model']} T={r['T']}: {r['variants']['naive']['median_s'] * 1e3:.1f}" for r in rows)
        + ".",
        "",
        table(*ratio_table(rows, "over_naive")),
        "",
        "## Step time ÷ the T-backward floor",
        "",
        "Floor, ms: "
        + ", ".join(f"{r['model']} T={r['T']}: {r['variants']['floor']['median_s'] * 1e3:.1f}" for r in rows)
        + ".",
        "",
        table(*ratio_table(rows, "over_floor")),
        "",
        "## Ours ÷ peers (same method, same run, ratio of medians)",
        "",
        table(*peer_table(rows)),
        "",
    ]
    extra_sections = (
        (
            "Loss weighting: ÷ naive summation and ÷ TorchJD's scalarizer",
            "One backward of the method's objective of the losses (`gs-{name}`), against naive summation and "
            "against TorchJD's scalarizer of the same method (`torchjd.scalarization`, `bench/peers.py`: its "
            "documented loop, FAMO's second forward pass for `update` included) on the same model.",
            loss_table(rows),
        ),
        (
            "Cheap modes: ÷ the T-backward floor",
            "`-every{k}`: `every=k`, timed as whole periods (a sample is k consecutive steps, one refresh and k − 1 "
            "weighted backward passes, divided by k); the ideal is one floor step and k − 1 naive steps, "
            "(floor + (k − 1)·naive) / (k·floor), from the same run. `-tps{k}`: `tasks_per_step=k` (k backward "
            "passes a step); its ideal is `floor-tasks{k}` (the forward and those k backward passes, nothing else) "
            "÷ the floor.",
            cheap_table(rows),
        ),
        (
            "Granularity: per-block surgery ÷ the whole-model step",
            '`-module`: `granularity="module"`, `shared=` the trunk (one block per layer); `-parameter`: '
            '`granularity="parameter"` (one block per shared parameter); ÷ the same method\'s whole-model step.',
            granularity_table(rows),
        ),
    )
    for title, text, (header, body) in extra_sections:
        if body:
            parts += [f"## {title}", "", text, "", table(header, body), ""]
    if mems:
        parts += [
            "## Peak extra memory",
            "",
            "Peak resident memory minus the resident memory before the first step, each variant in a fresh "
            "process (`harness.peak_memory_during`): during the first 2 steps (the process's high-water mark: what "
            "a run must fit in), and during 2 later steps (the high-water mark reset after the first 2; what the "
            "first steps kept, such as the `(T, P)` buffer, still counts). The children run with glibc's "
            f"`MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}` fixed, so every tensor from 128 KiB up is mapped on its own and "
            "unmapped when freed: the resident set follows the live tensors instead of what glibc's heap keeps "
            "from earlier steps (without it, repeated runs of one variant differed by ±15 MiB). "
            + "; ".join(
                f"{mm['model']} T={mm['T']}: the fp32 `(T, P)` matrix J is {mm['T'] * mm['shared_params'] * 4 / 2**20:.1f} MiB"
                for mm in mems
            )
            + ".",
            "",
            table(*memory_table(mems)),
            "",
        ]
    if tiny is not None:
        ov = tiny["overhead_over_floor"]
        parts += [
            "## Tiny problem: overhead per step over the 2-backward floor",
            "",
            "The tiny problem (`bench/tiny.py`: x ∈ R², two conflicting losses); "
            f"floor {tiny['variants']['floor']['median_s'] * 1e6:.0f} µs, {tiny['variants']['floor']['rounds']} rounds. "
            f"`gs-{{method}}` use the default engine ({sorted(set(tiny['gs_engines'].values()))} by its rule on the CPU); "
            "`minimal-pcgrad` is the same PCGrad step written by hand with nothing to orchestrate "
            "(rows of J, Gram, non-finite check, closed-form weights, combine, inner step): "
            "the least any wrapper of this design pays here.",
            "",
            table(
                ["variant", "µs/step", "overhead µs", "overhead µs (paired)"],
                [
                    [
                        k,
                        f"{tiny['variants'][k]['median_s'] * 1e6:.0f}",
                        f"{ov[k]['of_medians_us']:.0f}",
                        f"{ov[k]['median_paired_us']:.0f}",
                    ]
                    for k in TINY_KINDS if k in ov
                ],
            ),
            "",
        ]
    parts += [
        "## Targets",
        "",
        "Timing figures: ratio of the medians (median of the per-round ratios in brackets). Memory figures: "
        'first 2 steps (later steps in brackets). "met" needs both within the bound, "mixed" means one '
        "is. The range is of the bracketed figure.",
        "",
        table(["target", "met", "mixed", "missed", "range"], target_summary(checks)),
        "",
        "<details><summary>Every case</summary>",
        "",
        table(
            ["target", "case", "measured", "bound", "met"],
            [
                [
                    c["target"],
                    c["case"],
                    format_check(c["value"], c["unit"])
                    + (f" ({format_check(c['paired'], c['unit'])})" if c.get("paired") is not None else ""),
                    ("≥ " if c["unit"] == "≥" else "≤ ") + format_check(c["bound"], c["unit"]),
                    {"yes": "yes", "mixed": "*mixed*", "no": "**no**"}[c["met"]],
                ]
                for c in checks
            ],
        ),
        "",
        "</details>",
        "",
    ]
    return "\n".join(parts)


def load_last_run(
    path: Path, run_id: str | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any] | None, float]:
    """The time, memory and tiny rows of the last complete run in ``path`` (one that ended with its
    targets row, not limited by ``--problems``), or of the run ``run_id`` (a partial one too)."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    ends = [
        i
        for i, r in enumerate(records)
        if r.get("kind") == "targets" and (r.get("run") == run_id or (run_id is None and not r.get("partial")))
    ]
    if not ends:
        raise SystemExit(f"no complete run{'' if run_id is None else ' ' + run_id} in {path}")
    last = ends[-1]
    run = [r for r in records[:last] if r.get("run") == records[last].get("run")]
    rows = [r for r in run if r["kind"] == "time"]
    mems = [r for r in run if r["kind"] == "memory"]
    tiny = next((r for r in run if r["kind"] == "tiny"), None)
    return rows, mems, tiny, records[last]["wall_s"]


def render(
    rows: list[dict[str, Any]],
    mems: list[dict[str, Any]],
    tiny: dict[str, Any] | None,
    checks: list[dict[str, Any]],
    *,
    out_dir: Path,
    command: str,
    wall_s: float,
    write: bool = True,
) -> None:
    """Print the tables and (``write``) write ``suite.md`` (keeping its hand-written notes) and the plot."""
    print("\nStep time ÷ naive summation (ratio of medians, median of per-round ratios in brackets)")
    print(harness.format_table(*ratio_table(rows, "over_naive")))
    print("\nStep time ÷ the T-backward floor")
    print(harness.format_table(*ratio_table(rows, "over_floor")))
    print("\nOurs ÷ peers (same method, ratio of medians)")
    print(harness.format_table(*peer_table(rows)))
    for title, (header, body) in (
        ("Loss weighting ÷ naive and ÷ TorchJD's scalarizer", loss_table(rows)),
        ("Cheap modes ÷ the floor (every=k: whole periods), with the ideal", cheap_table(rows)),
        ("Granularity ÷ the whole-model step", granularity_table(rows)),
    ):
        if body:
            print(f"\n{title}")
            print(harness.format_table(header, body))
    if mems:
        print("\nPeak extra RSS of 2 steps (fresh process each)")
        print(harness.format_table(*memory_table(mems)))
    if tiny is not None:
        ov = tiny["overhead_over_floor"]
        print(f"\nTiny problem: floor {tiny['variants']['floor']['median_s'] * 1e6:.0f} µs; overhead over it, µs")
        print(
            harness.format_table(
                ["variant", "µs", "paired µs"],
                [[k, ov[k]["of_medians_us"], ov[k]["median_paired_us"]] for k in TINY_KINDS if k in ov],
            )
        )
    print("\nTargets (every case: suite.md and the targets row of suite.jsonl)")
    print(harness.format_table(["target", "met", "mixed", "missed", "range (paired)"], target_summary(checks)))
    if not write:
        return

    plot_path = out_dir / "step_time_vs_T.png"
    plot(rows, plot_path)
    md = markdown(rows, mems, tiny, checks, command=command, wall_s=wall_s, plot_name=plot_path.name)
    md_path = out_dir / "suite.md"
    notes = md_path.read_text().partition(NOTES_MARKER)[2] if md_path.exists() else ""
    md_path.write_text(md + "\n\n" + NOTES_MARKER + (notes or "\n"))
    print(f"\nwrote {md_path} and {plot_path}")

