"""Plots of the gradient diagnostics (optional: needs matplotlib, imported only when a plot is drawn).

Each function draws on a given ``Axes`` (or a new figure's) and returns it, so they compose into a
caller's own figure layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["plot_block_conflicts", "plot_conflict_history", "plot_cosine_heatmap"]


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("gradsurgery.plot needs matplotlib: pip install matplotlib") from err
    return plt


def _as_nested_floats(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    return value


def plot_cosine_heatmap(
    cos: torch.Tensor | Sequence[Sequence[float]],
    ax: Axes | None = None,
    task_names: Sequence[str] | None = None,
) -> Axes:
    """Heatmap of a ``T × T`` cosine-similarity matrix (e.g. ``gram_diagnostics(...)["cosine"]``).

    The colour scale is fixed to ``[-1, 1]`` with white at 0, so red (conflict) and blue (agreement)
    mean the same thing in every figure; cells are annotated with their value when ``T ≤ 12``.

    Args:
        cos: the ``T × T`` cosines, a tensor or nested sequences (``opt.diagnostics()["cosine"]``).
        ax: the matplotlib ``Axes`` to draw on (default: a new figure's).
        task_names: one label per task (default ``task 0``, ``task 1``, ...).

    Returns:
        The ``Axes`` drawn on.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: ``cos`` is not square, or ``task_names`` has not ``T`` entries.

    Examples:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> from gradsurgery.plot import plot_cosine_heatmap
        >>> ax = plot_cosine_heatmap([[1.0, -0.3], [-0.3, 1.0]], task_names=["depth", "segmentation"])
    """
    plt = _pyplot()
    nested = _as_nested_floats(cos)
    nested = nested.tolist() if hasattr(nested, "tolist") else nested  # a NumPy array
    if not isinstance(nested, (list, tuple)) or not nested or not all(isinstance(row, (list, tuple)) for row in nested):
        raise ValueError(f"cos must be a non-empty square T x T matrix (a sequence of rows), got {cos!r}")
    matrix = [[float(v) for v in row] for row in nested]
    T = len(matrix)
    if any(len(row) != T for row in matrix):
        raise ValueError(f"cos must be a square T x T matrix, got rows of lengths {[len(r) for r in matrix]}")
    names = list(task_names) if task_names is not None else [f"task {t}" for t in range(T)]
    if len(names) != T:
        raise ValueError(f"task_names must have {T} entries, got {len(names)}")
    ax = _axes(ax, plt, figsize=(1.0 + 0.6 * T, 0.8 + 0.6 * T))
    image = ax.imshow(matrix, vmin=-1.0, vmax=1.0, cmap="RdBu")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="cosine")
    ax.set_xticks(range(T), names, rotation=45, ha="right")
    ax.set_yticks(range(T), names)
    if T <= 12:
        for i in range(T):
            for j in range(T):
                # Dark cells need light text to stay readable.
                colour = "white" if abs(matrix[i][j]) > 0.6 else "black"
                ax.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", color=colour, fontsize=8)
    ax.set_title("gradient cosine similarity")
    return ax


def _axes(ax: Axes | None, plt: Any, *, figsize: tuple[float, float]) -> Axes:
    """``ax``, or a new figure's axes."""
    if ax is not None:
        return ax
    new: Axes = plt.subplots(figsize=figsize)[1]
    return new


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    out: list[float] = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_conflict_history(
    history: Sequence[Mapping[str, Any]],
    ax: Axes | None = None,
    *,
    steps: Sequence[int] | None = None,
    window: int = 25,
) -> Axes:
    """Conflict rate and task weights over training.

    Args:
        history: one diagnostics dict per logged step, as returned by
            :func:`gradsurgery.diagnostics.to_floats` (or ``gram_diagnostics``); each needs
            ``"conflicts"`` and ``"norms"``, and ``"weights"`` when the method has weights (GradDrop
            has none: only the conflict rate is drawn).
        ax: where to draw; the weights go on a twin y-axis on the right.
        steps: the training step of each entry (default ``0, 1, …``).
        window: entries averaged in the conflict rate, the fraction of task pairs ``i < j`` whose
            gradients had a negative inner product.

    Returns:
        The ``Axes`` drawn on (the weights' twin axis is ``ax.twinx()``'s).

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: ``history`` is empty, ``window < 1``, or ``steps`` has not one entry per entry.

    Examples:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> from gradsurgery.plot import plot_conflict_history
        >>> history = [{"conflicts": 1, "norms": [1.0, 1.0], "weights": [0.5, 1.5]}] * 10
        >>> ax = plot_conflict_history(history, window=5)
    """
    plt = _pyplot()
    if not history:
        raise ValueError("history is empty: log at least one diagnostics dict")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    xs = list(steps) if steps is not None else list(range(len(history)))
    if len(xs) != len(history):
        raise ValueError(f"steps has {len(xs)} entries but history has {len(history)}")
    for index, entry in enumerate(history):
        missing = [key for key in ("conflicts", "norms") if key not in entry]
        if missing:
            raise ValueError(
                f"history[{index}] has no {missing}: pass the nested dicts of a gradient method's diagnostics() "
                "(not flat=True, not a loss-weighting wrapper's, which has no per-task gradients)"
            )
    has_weights = all("weights" in entry for entry in history)
    weights = [[float(w) for w in _as_nested_floats(entry["weights"])] for entry in history] if has_weights else []
    # T may change between steps (after the gradients are cleared): each entry by its own pair count.
    counts = [len(_as_nested_floats(entry["norms"])) for entry in history]
    rate = [float(_as_nested_floats(entry["conflicts"])) / max(T * (T - 1) // 2, 1) for entry, T in zip(history, counts)]
    T = max(counts)
    ax = _axes(ax, plt, figsize=(6.0, 3.0))
    ax.plot(xs, _moving_average(rate, window), color="black", label="conflict rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel(f"conflict rate ({window}-entry mean)")
    lines = list(ax.get_lines())
    if has_weights:
        twin = ax.twinx()
        for t in range(T):
            twin.plot(xs, [w[t] if t < len(w) else float("nan") for w in weights], lw=0.8, alpha=0.8, label=f"w{t}")
        twin.set_ylabel("task weight")
        lines += twin.get_lines()
    ax.legend(lines, [str(line.get_label()) for line in lines], loc="upper right", fontsize=7)
    return ax


def plot_block_conflicts(
    history: Sequence[Mapping[str, Any]],
    ax: Axes | None = None,
    *,
    block_names: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    window: int = 25,
) -> Axes:
    """Conflict rate per block (layer) over training, from a ``granularity=`` run: one row per block,
    one column per logged step, the colour the fraction of task pairs ``i < j`` whose gradients on that
    block had a negative inner product (``window``-entry moving mean; white 0, red 1).

    A layer where the tasks conflict and one where they agree then read at a glance, which is what
    per-block surgery acts on.

    Args:
        history: one ``opt.diagnostics()`` report per logged step of a wrapper built with
            ``granularity=``: each has ``"blocks"``, one report (with ``"conflicts"`` and ``"norms"``)
            per block, in the order of ``opt.blocks``.
        ax: the matplotlib ``Axes`` to draw on (default: a new figure's).
        block_names: one label per block (default ``block 0``, ``block 1``, ...), e.g. the layers' names.
        steps: the training step of each entry (default ``0, 1, …``).
        window: entries averaged per cell.

    Returns:
        The ``Axes`` drawn on.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: ``history`` is empty or an entry has no ``"blocks"`` (no ``granularity=``), the
            entries have different numbers of blocks, ``window < 1``, or ``block_names``/``steps``
            have the wrong length.

    Examples:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> from gradsurgery.plot import plot_block_conflicts
        >>> agree, conflict = {"conflicts": 0, "norms": [1.0, 1.0]}, {"conflicts": 1, "norms": [1.0, 1.0]}
        >>> history = [{"blocks": [agree, conflict]}] * 10
        >>> ax = plot_block_conflicts(history, block_names=["encoder", "decoder"], window=5)
    """
    plt = _pyplot()
    if not history:
        raise ValueError("history is empty: log at least one diagnostics dict")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    counts = []
    for k, entry in enumerate(history):
        if "blocks" not in entry:
            raise ValueError(f"history[{k}] has no 'blocks': log opt.diagnostics() of a wrapper built with granularity=")
        counts.append(len(entry["blocks"]))
    B = counts[0]
    if any(count != B for count in counts):
        raise ValueError(f"the entries have different numbers of blocks: {sorted(set(counts))}")
    names = list(block_names) if block_names is not None else [f"block {b}" for b in range(B)]
    if len(names) != B:
        raise ValueError(f"block_names must have {B} entries, got {len(names)}")
    xs = list(steps) if steps is not None else list(range(len(history)))
    if len(xs) != len(history):
        raise ValueError(f"steps has {len(xs)} entries but history has {len(history)}")
    rates = []
    for b in range(B):
        blocks = [entry["blocks"][b] for entry in history]
        T = len(_as_nested_floats(blocks[0]["norms"]))
        pairs = max(T * (T - 1) // 2, 1)
        rates.append(_moving_average([float(_as_nested_floats(block["conflicts"])) / pairs for block in blocks], window))
    ax = _axes(ax, plt, figsize=(6.0, 0.8 + 0.3 * B))
    # Each column spans from its step to the next (the last one as wide as the one before it).
    edges = [*xs, xs[-1] + (xs[-1] - xs[-2] if len(xs) > 1 else 1)]
    image = ax.pcolormesh(edges, range(B + 1), rates, vmin=0.0, vmax=1.0, cmap="Reds")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=f"conflict rate ({window}-entry mean)")
    ax.set_yticks([b + 0.5 for b in range(B)], names)
    ax.invert_yaxis()  # the first block (the input side of a sequential model) on top
    ax.set_xlabel("step")
    ax.set_title("conflicts per block")
    return ax
