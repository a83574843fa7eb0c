"""Which parameters are shared: reached, with a non-zero gradient, by more than one task.

The autograd graph alone cannot say it. When the tasks' outputs are fused — ``torch.stack(losses)``,
per-task losses computed as one vector (``((out - y) ** 2).mean(0)``), a ``torch.compile``d model whose
heads and trunk are one graph node — every loss's graph leads to every parameter, and a head receives
materialised zeros from the other tasks. So the first ``backward`` (and the first after the number of
tasks changes) looks at the values: a parameter that the graph says several tasks reach, but whose
gradient is non-zero for exactly one of them, belongs to that task (its *owner*). A parameter whose
gradients are all zero on that step keeps what the graph says, so a model that starts at an exact
zero (a zero-initialised head leaves the trunk a zero gradient) is not misread.

Later steps use the graph, and the owners: an owned parameter stays task-specific until another
task's gradient of it is non-zero (checked every step where the non-finite policy already reads flags
back to the host; with ``nonfinite="propagate"``, which never does, the first step's reading stands).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Sharing:
    """The shared set, fixed for a number of tasks, and the owners of the parameters that the graph
    would call shared but whose gradient only one task makes non-zero."""

    num_tasks: int
    shared: set[int] = field(default_factory=set)  # id(parameter)
    owners: dict[int, int] = field(default_factory=dict)  # id(parameter) → task

    def reached(self, ids: list[int], structural: list[list[bool]]) -> list[list[bool]]:
        """``structural`` (per task, per parameter: the gradient exists) with each owned parameter
        reached by its owner only."""
        if not self.owners:
            return structural
        return [
            [hit and (self.owners.get(i, t) == t) for i, hit in zip(ids, row)] for t, row in enumerate(structural)
        ]


def classify(
    ids: list[int], structural: list[list[bool]], nonzero: list[list[bool]]
) -> tuple[set[int], dict[int, int]]:
    """Shared parameters and owners from one step's gradients: ``structural[t][i]`` whether task ``t``'s
    gradient of parameter ``i`` exists, ``nonzero[t][i]`` whether it holds a non-zero (or non-finite)
    entry."""
    shared: set[int] = set()
    owners: dict[int, int] = {}
    for i, pid in enumerate(ids):
        reaching = [t for t, row in enumerate(structural) if row[i]]
        makers = [t for t in reaching if nonzero[t][i]]
        if len(makers) > 1 or (not makers and len(reaching) > 1):
            shared.add(pid)
        elif len(makers) == 1 and len(reaching) > 1:
            owners[pid] = makers[0]
    return shared, owners
