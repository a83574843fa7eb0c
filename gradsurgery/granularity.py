"""``granularity=``: the method run separately on blocks of the shared parameters.

``"all"`` (default) is one block: the whole model's Gram matrix. ``"parameter"`` makes each shared
parameter a block, ``"module"`` each module of ``shared=`` that holds parameters of its own (a layer),
an ``nn.Module`` the same for that module, and a list of parameter groups those groups. Each block gets
its own ``T × T`` Gram matrix and its own weights, so a layer where the tasks conflict is treated
differently from one where they agree (GradVac's layer-wise mode, Recon's per-layer conflict scores).

The per-block Gram matrices come out of the same single pass over ``J`` as the whole one (the split-K
partial sums are summed per block), the ``B`` solves run as one batched solve, and the combine stays one
pass with each block's weights: per-block surgery costs the same two passes.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .hints import GRANULARITIES


Spans = list[tuple[int, int]]


class Granularity:
    """A checked ``granularity=``: how to cut the shared parameters into blocks."""

    def __init__(self, value: Any, params: list[torch.Tensor], shared: Any) -> None:
        self.kind = "groups"
        self.groups: list[set[int]] = []
        if isinstance(value, str):
            if value not in GRANULARITIES:
                raise ValueError(f"granularity must be one of {GRANULARITIES}, a module or a list of parameter groups, got {value!r}")
            self.kind = value
            if value == "module":
                if not isinstance(shared, torch.nn.Module):
                    raise ValueError(
                        'granularity="module" takes its modules from shared= (a module); pass shared=model, or '
                        "granularity=model"
                    )
                self.groups = _leaf_modules(shared)
            return
        if isinstance(value, torch.nn.Module):
            self.kind = "module"
            self.groups = _leaf_modules(value)
            return
        if isinstance(value, (torch.Tensor, str)) or not isinstance(value, Sequence):
            raise ValueError(f"granularity must be one of {GRANULARITIES}, a module or a list of parameter groups, got {value!r}")
        held = {id(p) for p in params}
        seen: dict[int, int] = {}
        for g, group in enumerate(value):
            if isinstance(group, (torch.Tensor, str)) or not isinstance(group, Sequence):
                raise ValueError(f"granularity[{g}] must be a list of parameters, got {type(group).__name__}")
            ids = set()
            for k, p in enumerate(group):
                if not isinstance(p, torch.Tensor):
                    raise TypeError(f"granularity[{g}][{k}] is a {type(p).__name__}, not a parameter")
                if id(p) not in held:
                    raise ValueError(f"granularity[{g}][{k}] (shape {tuple(p.shape)}) is not a parameter of the optimizer")
                if id(p) in seen:
                    raise ValueError(
                        f"granularity[{g}][{k}] (shape {tuple(p.shape)}) is also in granularity[{seen[id(p)]}]: "
                        "the groups must not overlap"
                    )
                seen[id(p)] = g
                ids.add(id(p))
            self.groups.append(ids)

    @property
    def whole(self) -> bool:
        return self.kind == "all"

    def blocks(self, params: list[torch.Tensor], columns: list[slice]) -> list[Spans]:
        """The blocks of the buffer's ``params`` (with their ``columns``) as column spans. Every shared
        parameter must be in exactly one group."""
        if self.kind == "parameter":
            return [[(c.start, c.stop)] for c in columns]
        owner = {pid: g for g, ids in enumerate(self.groups) for pid in ids}
        out: list[Spans] = [[] for _ in self.groups]
        for p, c in zip(params, columns):
            g = owner.get(id(p))
            if g is None:
                where = "a module of its own" if self.kind == "module" else "any group"
                raise ValueError(
                    f"a shared parameter (shape {tuple(p.shape)}) is not in {where} of granularity=: the groups must "
                    "cover every shared parameter"
                )
            out[g].append((c.start, c.stop))
        return [_merged(spans) for spans in out]


def _leaf_modules(module: torch.nn.Module) -> list[set[int]]:
    """The parameters each module holds directly (a layer), for every module that holds some."""
    groups = []
    for child in module.modules():
        own = {id(p) for p in child.parameters(recurse=False)}
        if own:
            groups.append(own)
    return groups


def _merged(spans: Spans) -> Spans:
    """Adjacent spans joined (a layer's weight and bias are neighbours in the buffer)."""
    out: Spans = []
    for start, stop in sorted(spans):
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], stop)
        else:
            out.append((start, stop))
    return out
