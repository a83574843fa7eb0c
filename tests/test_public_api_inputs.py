"""The public API as a demanding user calls it: ``out=`` of the functional API, GradDrop's leak tensor,
diagnostics of a skipped step, checkpoints of another granularity, plots of a run whose ``T``
changed, and the errors that name what is wrong (each case failed, or raised an unrelated error,
before its fix)."""

from __future__ import annotations

import copy

import matplotlib
import pytest
import torch
from torch import nn

import gradsurgery as gs
import gradsurgery.functional as F
from gradsurgery.errors import NonFiniteGradientError

matplotlib.use("Agg")


def _J(T: int = 3, P: int = 5) -> torch.Tensor:
    return torch.randn(T, P, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("function", ["mgda", "pcgrad", "upgrad", "imtl_g", "graddrop"])
def test_out_is_checked_before_anything_is_computed(function: str) -> None:
    call = getattr(F, function)
    J = _J()
    kept = J.clone()
    for out, match in (
        (J[0], "must not share memory with J"),
        (torch.empty(5, dtype=torch.int64), "floating-point dtype"),
        (torch.empty(4), r"shape \(5,\)"),
        (torch.empty(1, 5), r"shape \(5,\)"),
        (torch.empty(10)[::2], "contiguous rows"),
    ):
        with pytest.raises(ValueError, match=match):
            call(J, out=out)
        assert torch.equal(J, kept)
    batched = torch.randn(2, 3, 6)
    with pytest.raises(ValueError, match="must not share memory with J"):
        call(batched, out=batched[..., 0, :])
    with pytest.raises(ValueError, match=r"shape \(2, 6\)"):
        call(batched, out=torch.empty(6))


def test_a_graddrop_leak_tensor_outside_0_1_is_refused() -> None:
    J = _J()
    for leak in (torch.tensor([0.0, -1.0, 0.0]), torch.tensor([0.0, float("nan"), 0.0]), torch.tensor([0.0, 1.5, 0.0])):
        with pytest.raises(ValueError, match=r"leak must lie in \[0, 1\]"):
            F.graddrop(J, leak=leak)
        with pytest.raises(ValueError, match=r"leak must lie in \[0, 1\]"):
            gs.GradDrop(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1), leak=leak)
    F.graddrop(J, leak=torch.tensor([0.0, 0.5, 1.0]))


def test_diagnostics_of_a_skipped_step_say_so() -> None:
    torch.manual_seed(0)
    trunk, heads = nn.Linear(3, 4), nn.ModuleList(nn.Linear(4, 1) for _ in range(2))
    opt = gs.MGDA(torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.1), nonfinite="skip")
    x = torch.randn(6, 3)
    z = trunk(x)
    opt.backward([heads[0](z).pow(2).mean(), heads[1](z).pow(2).mean()])
    assert opt.diagnostics()["conflicts"] >= 0
    opt.step()
    opt.zero_grad()
    z = trunk(x)
    opt.backward([heads[0](z).pow(2).mean(), heads[1](z).pow(2).mean() * float("nan")])
    with pytest.raises(RuntimeError, match="this step is skipped"):
        opt.diagnostics()
    assert opt.last_gram is None and opt.last_weights is None


def test_a_stateful_checkpoint_of_another_granularity_is_refused() -> None:
    def build(granularity: str) -> tuple[gs.GradSurgery, nn.Sequential, nn.ModuleList]:
        torch.manual_seed(0)
        trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))
        heads = nn.ModuleList(nn.Linear(5, 1) for _ in range(3))
        opt = gs.GradVac(torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.1), seed=0, shared=trunk, granularity=granularity)
        return opt, trunk, heads

    opt, trunk, heads = build("parameter")
    z = trunk(torch.randn(8, 4))
    opt.backward([head(z).pow(2).mean() * (t + 1) - head(z).mean() * t for t, head in enumerate(heads)])
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    other, _, _ = build("all")
    with pytest.raises(ValueError, match=r"block shape \(4,\) but this wrapper has one block"):
        other.load_state_dict(saved)
    same, _, _ = build("parameter")
    same.load_state_dict(saved)


def test_the_conflict_rate_of_a_run_whose_number_of_tasks_changed() -> None:
    from gradsurgery.plot import plot_conflict_history

    two = {"norms": [1.0, 1.0], "cosine": [[1, -0.5], [-0.5, 1]], "conflicts": 1}
    four = {"norms": [1.0] * 4, "cosine": [[1.0] * 4] * 4, "conflicts": 3}  # 3 of 6 pairs
    ax = plot_conflict_history([two, four], window=1)
    assert [float(v) for v in ax.lines[0].get_ydata()] == [1.0, 0.5]
    with pytest.raises(ValueError, match="has no"):
        plot_conflict_history([{"weights": [1.0, 1.0]}])


def test_errors_name_what_is_wrong() -> None:
    from gradsurgery.plot import plot_cosine_heatmap

    G = torch.eye(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        F.pcgrad_weights(G, generator=0)
    with pytest.raises(ValueError, match=r"state must be the dict of \['targets'\]"):
        F.gradvac_weights(G, state={})
    with pytest.raises(NonFiniteGradientError):
        F.mgda_weights(G, normalization="loss", losses=[1.0, float("inf"), 1.0])
    opt = gs.MGDA(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1))
    state = opt.state_dict()
    state["gradsurgery"] = "x"
    with pytest.raises(TypeError, match=r"state_dict\['gradsurgery'\] must be the dict"):
        opt.load_state_dict(state)
    for bad in ([1.0, 0.5], []):
        with pytest.raises(ValueError, match="square T x T matrix"):
            plot_cosine_heatmap(bad)
    with pytest.raises(TypeError, match="a str"):
        gs.bibtex(3)  # type: ignore[arg-type]
