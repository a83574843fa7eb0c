"""User code as the type checkers see it (``.ci/typecheck``): what they must accept, and the mistakes
they must flag. A flagged line carries each checker's ignore for exactly that error, and an ignore a
checker finds unnecessary is itself an error, so a checker that stops catching a mistake fails the
step. Checked, never run (pytest does not collect this file)."""

from __future__ import annotations

import torch
from typing_extensions import assert_type

import gradsurgery as gs
from gradsurgery.hints import Diagnostics, LossWeightingDiagnostics

model = torch.nn.Linear(4, 3)
adam = torch.optim.Adam(model.parameters(), lr=1e-3)

# ---------------------------------------------------------------- accepted, with the types users get

opt = gs.PCGrad(adam, reduction="mean", seed=0, granularity="module", shared=model)
gs.CAGrad(adam, c=0.5, rescale="1+c", max_iter=20, backend="torch", sync="sharded")
gs.MGDA(adam, normalization="loss+", nonfinite="skip")
gs.GradDrop(adam, leak=[0.0, 0.5, 1.0])
gs.UPGrad(adam, pref_vector=torch.ones(3))
losses = list(model(torch.randn(8, 4)).pow(2).mean(0))
opt.zero_grad()
opt.backward(losses)
opt.pc_backward(losses)
opt.step()

report = opt.diagnostics()
assert_type(report, Diagnostics)
assert_type(report["norms"], list[float])
assert_type(report["cosine"], list[list[float]])
assert_type(report["conflicts"], int)
assert_type(opt.diagnostics(flat=True), dict[str, float])

uw = gs.UW(adam, num_tasks=3)
assert_type(uw.diagnostics(), LossWeightingDiagnostics)
assert_type(uw.diagnostics()["weights"], list[float])

J = torch.randn(3, 10)
assert_type(gs.functional.pcgrad(J, reduction="mean"), torch.Tensor)
assert_type(gs.functional.cagrad_weights(J @ J.T, c=0.2), torch.Tensor)
d, state = gs.functional.gradvac(J)  # a stateful method returns its new state beside the update
assert_type(state, dict[str, torch.Tensor])
assert_type(gs.functional.gram(J, backend="auto"), torch.Tensor)

# ---------------------------------------------------------------- mistakes each checker must flag

gs.PCGrad(adam, reduction="avg")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
gs.CAGrad(adam, rescale="1+c**2")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
gs.MGDA(adam, sed=0)  # type: ignore[call-arg]  # pyright: ignore[reportCallIssue]
gs.Sum(adam, sync="global")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
gs.UW(adam)  # type: ignore[call-arg]  # pyright: ignore[reportCallIssue]
gs.UW(adam, num_tasks=3, shared=model)  # type: ignore[call-arg]  # pyright: ignore[reportCallIssue]
gs.FairGrad(adam, alpha="2")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
gs.functional.mgda_weights(torch.eye(2), backend="cuda")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
gs.functional.graddrop_weights  # type: ignore[attr-defined]  # pyright: ignore[reportAttributeAccessIssue]
report["norm"]  # type: ignore[typeddict-item]  # pyright: ignore[reportGeneralTypeIssues]
