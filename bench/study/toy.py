"""Study 1: the two-task toy of the CAGrad paper (Liu et al., NeurIPS 2021, Fig. 1).

Two losses of ``x = (x1, x2)``: on the upper half-plane each is a logarithmic valley ``h_t``, on the
lower half a quadratic bowl ``q_t``, blended by ``c1 = max(tanh(x2/2), 0)`` and
``c2 = max(tanh(−x2/2), 0)``. The three starting points, Adam (lr 1e-3) and the 100,000 steps are the
paper's; CAGrad runs with the paper's ``c = 0.5``.

**Two paths, one answer.** The Gram-space and elementwise methods run as one batched problem: the
points of every method and start are one ``(M, 3, 2)`` tensor, so each step computes one closed-form
Jacobian for all of them (:func:`toy_jacobian`; the toy's parameters are 2-D, so a method's ``J`` is
``(3, T = 2, 2)``), makes one batched ``gs.functional`` call per method for its three starts
(``<function>_weights`` on the batched Gram matrix, or the elementwise ``<function>(J)``) and one
Adam step for all the points (:class:`BatchedAdam`: ``torch.optim.Adam``'s arithmetic, elementwise,
so the points do not interact). A loss-weighting method has no functional form: its starts run one at
a time through ``opt.backward``, the wrapper path (:func:`run_trajectory`), which is also the
reference the batched path is tested against (``tests/test_toy.py``: the same points after 200 steps,
to fp32 rounding). Each unit's time is in ``results.json`` (``unit_times``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from bench.methods import Options, kind, lookup, weights_function

from . import figures
from .methods import REPRESENTATION, label, make_optimizer
from .report import Report, Table, num

STARTS: tuple[tuple[float, float], ...] = ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0))
LR = 1e-3
PAPER_STEPS = 100_000
CAGRAD_C = 0.5  # the paper's toy value (the benchmarks' 0.4 is its NYUv2/Cityscapes one)
OPTIONS: Options = {"CAGrad": {"c": CAGRAD_C}}
LOWER = 5e-6
BOX = (-10.0, 10.0)
# Why a method the study compares is not run on the toy: it has no shared representation, so no
# representation mode; Adam is invariant to the gradient's scale, so Mean is Sum.
SKIPPED: dict[str, str] = {
    "mean": "equals Sum under Adam (scale-invariant)",
    **{name: "no shared representation in the toy" for name in REPRESENTATION},
}
NEGATIVE_LOSSES = "takes the logarithm of the losses, and the toy's losses go below 0"


def skip_reason(method: str) -> str | None:
    """Why ``method`` does not run on the toy, or ``None``."""
    if method in SKIPPED:
        return SKIPPED[method]
    loss = getattr(lookup(method), "loss", None)
    return NEGATIVE_LOSSES if loss is not None and loss.positive else None


def runs_on_toy(method: str) -> bool:
    return skip_reason(method) is None


def batched(method: str) -> bool:
    """Whether ``method`` runs its starts as one batched functional problem (else: the wrapper)."""
    return kind(method) != "loss"


@dataclass(frozen=True)
class ToyConfig:
    steps: int
    pareto_weights: int
    trajectory_points: int


def toy_losses(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L1, L2)`` at ``x[..., 0] = x1``, ``x[..., 1] = x2`` (any batch shape)."""
    x1, x2 = x[..., 0], x[..., 1]
    c1 = torch.tanh(x2 / 2).clamp_min(0)
    c2 = torch.tanh(-x2 / 2).clamp_min(0)
    h1 = torch.log((-(x1 + 7) / 2 + torch.tanh(x2)).abs().clamp_min(LOWER)) + 6
    h2 = torch.log((-(x1 - 3) / 2 - torch.tanh(x2) + 2).abs().clamp_min(LOWER)) + 6
    q1 = ((x1 - 7) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20
    q2 = ((x1 + 7) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20
    return c1 * h1 + c2 * q1, c1 * h2 + c2 * q2


def toy_jacobian(x: np.ndarray) -> np.ndarray:
    """``J`` ``(..., 2, 2)`` at ``x`` ``(..., 2)`` (NumPy, ``x``'s dtype): row ``t`` is ``∇L_t``, the gradient
    autograd gives for :func:`toy_losses`, in closed form — a sixth of autograd's cost per step, which
    the 100,000-step runs feel. Where autograd's clamps pass the gradient (``clamp_min`` at equality,
    ``abs`` at 0 with gradient 0), so does this."""
    x1, x2 = x[..., 0], x[..., 1]
    half = np.tanh(x2 / 2)
    c1, c2 = np.maximum(half, 0), np.maximum(-half, 0)
    dhalf = (1 - half * half) / 2
    dc1 = np.where(half >= 0, dhalf, 0)
    dc2 = np.where(half <= 0, -dhalf, 0)
    t = np.tanh(x2)
    dt = 1 - t * t
    u1 = -(x1 + 7) / 2 + t
    u2 = -(x1 - 3) / 2 - t + 2
    a1, a2 = np.abs(u1), np.abs(u2)
    inside1, inside2 = a1 >= LOWER, a2 >= LOWER
    h1 = np.log(np.maximum(a1, LOWER)) + 6
    h2 = np.log(np.maximum(a2, LOWER)) + 6
    # d log(max(|u|, LOWER)) / du: 1/u where |u| ≥ LOWER, else 0.
    r1 = np.where(inside1, 1 / np.where(inside1, u1, 1), 0)
    r2 = np.where(inside2, 1 / np.where(inside2, u2, 1), 0)
    bowl = 0.1 * (x2 + 8) ** 2
    q1 = ((x1 - 7) ** 2 + bowl) / 10 - 20
    q2 = ((x1 + 7) ** 2 + bowl) / 10 - 20
    dq_x2 = c2 * (0.02 * (x2 + 8))
    J = np.empty(x.shape[:-1] + (2, 2), dtype=x.dtype)
    J[..., 0, 0] = c1 * (-0.5 * r1) + c2 * ((x1 - 7) / 5)
    J[..., 0, 1] = dc1 * h1 + c1 * (r1 * dt) + dc2 * q1 + dq_x2
    J[..., 1, 0] = c1 * (-0.5 * r2) + c2 * ((x1 + 7) / 5)
    J[..., 1, 1] = dc1 * h2 - c1 * (r2 * dt) + dc2 * q2 + dq_x2
    return J


@dataclass
class Trajectory:
    method: str
    start: tuple[float, float]
    steps: int
    points: np.ndarray  # (n, 2): x every `every` steps, first and last step included
    every: int
    seconds: float  # wall time of the run; a batched run's is shared by its starts
    path: str  # "batched functional" or "wrapper"


def _recorder(steps: int, points: int, shape: tuple[int, ...]) -> tuple[int, torch.Tensor]:
    every = max(1, steps // points)
    return every, torch.empty(steps // every + 2, *shape)


def run_trajectory(
    method: str, start: tuple[float, float], steps: int, *, points: int, seed: int,
    tick: Callable[[int], None] = lambda n: None,
) -> Trajectory:
    """The wrapper path: ``steps`` Adam steps of ``gs.<Method>`` from ``start`` through
    ``opt.backward``, recording ``≈points`` positions."""
    x = torch.nn.Parameter(torch.tensor(start, dtype=torch.float32))
    opt = make_optimizer(method, torch.optim.Adam([x], lr=LR), seed=seed, num_tasks=2, options=OPTIONS)
    every, trace = _recorder(steps, points, (2,))
    trace[0] = x.detach()
    n = 1
    chunk = max(1, steps // 100)
    began = time.perf_counter()
    for step in range(1, steps + 1):
        opt.zero_grad()
        opt.backward(list(toy_losses(x)))
        opt.step()
        if step % every == 0 or step == steps:
            trace[n] = x.detach()
            n += 1
        if step % chunk == 0:
            tick(chunk)
    tick(steps % chunk)
    seconds = time.perf_counter() - began
    return Trajectory(method, start, steps, trace[:n].numpy().copy(), every, seconds, "wrapper")


def batched_update(method: str, *, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``J (S, 2, 2) → d (S, 2)`` for the starts side by side: one ``gs.functional`` call per step.

    A Gram-space method: ``gs.functional.gram`` of the batch, the method's batched
    ``<function>_weights`` (``bench.methods.weights_function``: the toy's CAGrad ``c``, a seeded
    generator, state carried across steps), then ``d = wᵀJ`` per start in fp32, as the wrapper's
    combine. An elementwise method (GradDrop): its batched ``<function>(J)``.
    """
    import gradsurgery.functional as F
    from bench.methods import aggregate_function

    if kind(method) == "elementwise":
        return aggregate_function(method, seed=seed, options=OPTIONS)
    weights = weights_function(method, seed=seed, options=OPTIONS)

    def update(J: torch.Tensor) -> torch.Tensor:
        w = weights(F.gram(J)).to(J.dtype)
        return (w.expand(J.shape[:-1]).unsqueeze(-2) @ J).squeeze(-2)

    return update


class BatchedAdam:
    """``torch.optim.Adam``'s update (its default single-tensor path, the same operations in the same
    order) on one tensor of independent points: Adam is elementwise, so each point follows its own
    Adam trajectory. Without the optimizer's bookkeeping it costs a fraction of ``opt.step()``."""

    def __init__(self, param: torch.Tensor, *, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.exp_avg = torch.zeros_like(param)
        self.exp_avg_sq = torch.zeros_like(param)
        self.steps = 0.0

    @torch.no_grad()
    def step(self, grad: torch.Tensor) -> None:
        beta1, beta2 = self.betas
        self.steps += 1
        self.exp_avg.lerp_(grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = self.lr / (1 - beta1**self.steps)
        denom = (self.exp_avg_sq.sqrt() / (1 - beta2**self.steps) ** 0.5).add_(self.eps)
        self.param.addcdiv_(self.exp_avg, denom, value=-step_size)


def run_batched(
    methods: Sequence[str], starts: Sequence[tuple[float, float]], steps: int, *, points: int, seed: int,
) -> dict[str, list[Trajectory]]:
    """The batched path: every start of every method in ``methods`` as one problem, ``steps`` Adam steps.

    The points are one ``(M, S, 2)`` tensor: one closed-form Jacobian and one Adam step
    (:class:`BatchedAdam`) per step for all of them, and per method one batched ``gs.functional`` call
    on its ``(S, 2, 2)`` slice.
    """
    x = torch.tensor([[list(s) for s in starts]] * len(methods), dtype=torch.float32)
    adam = BatchedAdam(x, lr=LR)
    updates = [batched_update(method, seed=seed) for method in methods]
    view = x.numpy()  # Adam updates x in place: the view follows it
    every, trace = _recorder(steps, points, tuple(x.shape))
    trace[0] = x
    n = 1
    grad = torch.empty_like(x)
    began = time.perf_counter()
    for step in range(1, steps + 1):
        J = torch.from_numpy(toy_jacobian(view))
        for i, update in enumerate(updates):
            grad[i] = update(J[i])
        adam.step(grad)
        if step % every == 0 or step == steps:
            trace[n] = x
            n += 1
    seconds = time.perf_counter() - began
    points_ = trace[:n].numpy()
    return {
        method: [Trajectory(method, (start[0], start[1]), steps, points_[:, m, s].copy(), every, seconds, "batched functional")
                 for s, start in enumerate(starts)]
        for m, method in enumerate(methods)
    }


def run_methods(methods: Sequence[str], steps: int, *, points: int, seed: int = 0) -> dict[str, list[Trajectory]]:
    """Every method in ``methods`` from every start of the paper, by the path it has (module docstring):
    the batched ones together, the others start by start."""
    together = [m for m in methods if batched(m)]
    out = run_batched(together, STARTS, steps, points=points, seed=seed) if together else {}
    for method in methods:
        if not batched(method):
            out[method] = [run_trajectory(method, start, steps, points=points, seed=seed) for start in STARTS]
    return {method: out[method] for method in methods}


def _grid(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    axis = np.linspace(*BOX, n)
    X1, X2 = np.meshgrid(axis, axis)
    with torch.no_grad():
        L1, L2 = toy_losses(torch.from_numpy(np.stack([X1, X2], axis=-1)))
    return X1, X2, L1.numpy(), L2.numpy()


def _minimize(alpha: float, X1: np.ndarray, X2: np.ndarray, L1: np.ndarray, L2: np.ndarray) -> np.ndarray:
    """``argmin_x αL1 + (1−α)L2``: from the best grid point, polished by L-BFGS in float64."""
    best = np.argmin(alpha * L1 + (1 - alpha) * L2)
    x = torch.tensor([X1.ravel()[best], X2.ravel()[best]], dtype=torch.float64, requires_grad=True)
    solver = torch.optim.LBFGS([x], lr=1.0, max_iter=100, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        solver.zero_grad()
        l1, l2 = toy_losses(x)
        value = alpha * l1 + (1 - alpha) * l2
        value.backward()
        return value

    solver.step(closure)
    return x.detach().numpy().copy()


def pareto_set(n_weights: int, *, grid: int = 201) -> np.ndarray:
    """Points of the Pareto set, ordered from the minimiser of ``L2`` to that of ``L1``, ``(m, 2)``.

    Sweeps the weighted-sum minimisers ``argmin_x αL1 + (1−α)L2`` for ``n_weights`` values of ``α``:
    each starts from the best point of a ``grid × grid`` grid of ``BOX²`` (so the sweep finds the global
    minimiser, not the nearest valley) and is polished by L-BFGS in float64. The front of this toy is
    convex (both losses are bowls ``c2·q_t`` below the x1-axis, where they reach ``−20``, against
    ``≥ −6.2`` above it), so the sweep traces the whole Pareto set.
    """
    X1, X2, L1, L2 = _grid(grid)
    return np.array([_minimize(alpha, X1, X2, L1, L2) for alpha in np.linspace(0.0, 1.0, n_weights)])


def average_loss_minimum(*, grid: int = 201) -> np.ndarray:
    """The minimiser of ``(L1 + L2)/2``: where the paper reports CAGrad (c = 0.5) ending from every
    start (Fig. 1; CAGrad provably converges to a minimum of the average loss for ``c < 1``)."""
    return _minimize(0.5, *_grid(grid))


def distance_to_polyline(point: np.ndarray, line: np.ndarray) -> float:
    """Euclidean distance from ``point`` to the polyline through the rows of ``line``."""
    a, b = line[:-1], line[1:]
    ab = b - a
    length2 = np.maximum((ab * ab).sum(axis=1), 1e-300)
    t = np.clip(((point - a) * ab).sum(axis=1) / length2, 0.0, 1.0)
    nearest = a + t[:, None] * ab
    return float(np.min(np.linalg.norm(nearest - point, axis=1)))


def min_norm(point: np.ndarray) -> float:
    """``min_{α∈[0,1]} ‖α∇L1 + (1−α)∇L2‖`` at ``point``: 0 exactly at Pareto-stationary points."""
    x = torch.tensor(point, dtype=torch.float64, requires_grad=True)
    l1, l2 = toy_losses(x)
    (g1,) = torch.autograd.grad(l1, x, retain_graph=True)
    (g2,) = torch.autograd.grad(l2, x)
    diff = g1 - g2
    denom = float(diff @ diff)
    alpha = 0.5 if denom == 0 else min(max(float((g2 - g1) @ g2) / denom, 0.0), 1.0)
    return float((alpha * g1 + (1 - alpha) * g2).norm())


def summarize(traj: Trajectory, pareto: np.ndarray, target: np.ndarray) -> dict[str, object]:
    """The numbers one run contributes to ``results.json``."""
    final = traj.points[-1]
    with torch.no_grad():
        l1, l2 = toy_losses(torch.tensor(final, dtype=torch.float64))
    stride = max(1, len(traj.points) // 200)
    return {
        "start": list(traj.start),
        "steps": traj.steps,
        "path": traj.path,
        "final": final.tolist(),
        "L1": float(l1),
        "L2": float(l2),
        "mean_loss": float((l1 + l2) / 2),
        "distance_to_pareto_set": distance_to_polyline(final, pareto),
        "distance_to_average_loss_minimum": float(np.linalg.norm(final - target)),
        "min_norm": min_norm(final),
        "seconds": traj.seconds,
        "trajectory_every": traj.every * stride,
        "trajectory": np.vstack([traj.points[::stride], traj.points[-1:]]).tolist(),
    }


TITLE = "Two-task toy (CAGrad paper, Fig. 1)"


def describe(data: dict[str, Any]) -> tuple[list[str], list[Table]]:
    """Notes and the final-point table for ``results.md`` / ``results.tex``."""
    if "steps" not in data:
        return [], []
    steps = data["steps"]
    shortfall = "" if steps >= PAPER_STEPS else f" — fewer than the paper's {PAPER_STEPS:,}, so trajectories may stop short"
    target = data["average_loss_minimum"]
    notes = [
        f"Adam (lr {LR:g}), **{steps:,} steps per run**{shortfall}; CAGrad c = {CAGRAD_C}. Gram-space and "
        "elementwise methods run the three starts as one batched `gs.functional` problem per step; "
        "loss-weighting methods run each start through `opt.backward` (the *path* in results.json). "
        f"Pareto set: weighted-sum minimisers ({data['pareto_weights']} weights, L-BFGS-polished). "
        "*dist. Pareto* is the distance from the final point to the Pareto set; *dist. ★* the distance to "
        f"the minimiser of (L1+L2)/2 at ({num(target[0], '.2f')}, {num(target[1], '.2f')}), where the paper "
        "reports CAGrad ending from every start; *min-norm* is min over α of ‖α∇L1 + (1−α)∇L2‖ at the final "
        "point (0 = Pareto-stationary).",
    ]
    rows = []
    for method, runs in data.get("runs", {}).items():
        for run in runs:
            rows.append([
                label(method), f"({num(run['start'][0], 'g')}, {num(run['start'][1], 'g')})",
                f"({num(run['final'][0], '.2f')}, {num(run['final'][1], '.2f')})", num(run["L1"], ".3f"),
                num(run["L2"], ".3f"), num(run["distance_to_pareto_set"], ".3f"),
                num(run["distance_to_average_loss_minimum"], ".3f"), num(run["min_norm"], ".1e"),
            ])
    table = Table(
        label="gradsurgery-toy",
        caption=f"CAGrad toy: final points after {steps:,} Adam steps (lr {LR:g}) from the paper's three starts.",
        columns=["Method", "Start", "Final x", "L1", "L2", "dist. Pareto", "dist. ★", "min-norm"],
        rows=rows, align="lllrrrrr",
    )
    return notes, [table] if rows else []


def prepare(cfg: ToyConfig, methods: Sequence[str], report: Report) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Register the study, compute the Pareto set and the average-loss minimum; returns the methods
    to run, the set and the minimum."""
    data = report.study("toy", TITLE, describe)
    chosen = [m for m in methods if runs_on_toy(m)]
    pareto = pareto_set(cfg.pareto_weights)
    target = average_loss_minimum()
    data.update({
        "steps": cfg.steps, "paper_steps": PAPER_STEPS, "lr": LR, "cagrad_c": CAGRAD_C, "starts": [list(s) for s in STARTS],
        "pareto_weights": cfg.pareto_weights, "skipped_methods": {m: skip_reason(m) for m in methods if not runs_on_toy(m)},
        "paths": {m: "batched functional" if batched(m) else "wrapper" for m in chosen},
        "runs": {}, "device": "cpu", "pareto_set": pareto.tolist(), "average_loss_minimum": target.tolist(),
    })
    return chosen, pareto, target


def units(methods: Sequence[str]) -> list[tuple[str, ...]]:
    """The toy's units of work: the batched methods together, each wrapper-path method alone."""
    together = tuple(m for m in methods if batched(m))
    return ([together] if together else []) + [(m,) for m in methods if not batched(m)]


def run_unit(cfg: ToyConfig, methods: Sequence[str], pareto: np.ndarray, target: np.ndarray) -> dict[str, list[dict[str, Any]]]:
    """One unit of work (in a worker process): ``methods`` from the three starts, summarised."""
    runs = run_methods(methods, cfg.steps, points=cfg.trajectory_points)
    return {method: [summarize(t, pareto, target) for t in trajs] for method, trajs in runs.items()}


def store(data: dict[str, Any], result: dict[str, list[dict[str, Any]]], seconds: float, cpu_seconds: float) -> str:
    """A finished unit into the study's data (with its wall and CPU time); returns its log line's result."""
    data["runs"].update(result)
    data.setdefault("unit_times", []).append(
        {"methods": list(result), "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2)})
    return headline(result)


def headline(result: dict[str, list[dict[str, Any]]]) -> str:
    """A finished unit's one-line result for the log: distances to the Pareto set per start."""
    return "; ".join(f"{label(m)} " + "/".join(f"{r['distance_to_pareto_set']:.2f}" for r in runs)
                     for m, runs in result.items()) + " from the Pareto set"


def draw(data: dict[str, Any], report: Report) -> None:
    """The trajectory figure from whatever runs have finished."""
    if not data.get("runs"):
        return
    X1, X2, L1, L2 = _grid(201)
    name = "toy_trajectories.png"
    figures.toy_trajectories(report.out / name, (X1, X2, (L1 + L2) / 2), np.asarray(data["pareto_set"]),
                             np.asarray(data["average_loss_minimum"]), data["runs"], data["steps"], PAPER_STEPS)
    report.add_figure("toy", name, f"Toy trajectories ({data['steps']:,} steps per run) over the contours of "
                      "(L1+L2)/2, Pareto set in gold, minimiser of (L1+L2)/2 as a gold star")
