"""Per-block Gram matrices and per-block combines: the same two passes over ``J``, with its columns
partitioned into blocks (one per parameter, module or group) that each get their own ``T × T`` Gram
matrix and their own weights.

A block is a list of column spans ``(start, stop)``. ``gram_blocks`` returns ``(B, T, T)`` — the split-K
partial sums are taken per block (no split straddles two) and summed per block in the second stage —
and ``combine_blocks`` writes ``out[cols] = W[b]ᵀ J[:, cols]`` for the columns of each block ``b``, one
program per tile of a block. The references do the same with one ``gram_reference`` /
``combine_reference`` per span.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Sequence

import torch

from ._checks import check_matrix, check_triton_device, check_triton_dtype, check_triton_matrix
from .combine import combine_reference_unchecked
from .gram import _FP_FUSION, _REDUCE_BLOCK, _REDUCE_SPLITS, gram_reference

Blocks = Sequence[Sequence[tuple[int, int]]]  # per block: its column spans [start, stop)

# Columns per first-stage program (at most; a span's last program takes the rest) and per combine tile.
_SPLIT_COLUMNS = 1 << 16
_INTERPRETED_TILE = 1 << 14
_TILE = 4096


class BlockLayout:
    """Blocks of columns (each a list of spans ``(start, stop)``) and, made once on first use, the
    Triton plans that go with them (device tensors: the split ranges, the combine's tiles)."""

    def __init__(self, blocks: Blocks) -> None:
        self.blocks = [list(spans) for spans in blocks]
        self._gram_plans: dict[torch.device, BlockPlan] = {}
        self._tile_plans: dict[tuple[int, int, torch.device, bool], TilePlan] = {}

    def __len__(self) -> int:
        return len(self.blocks)

    def clipped(self, lo: int, hi: int) -> BlockLayout:
        """The same blocks restricted to the columns ``[lo, hi)``, shifted to start at 0 (a rank's shard)."""
        return BlockLayout(
            [[(max(a, lo) - lo, min(b, hi) - lo) for a, b in spans if max(a, lo) < min(b, hi)] for spans in self.blocks]
        )

    def gram_plan(self, device: torch.device) -> BlockPlan:
        if device not in self._gram_plans:
            self._gram_plans[device] = block_plan(self.blocks, device)
        return self._gram_plans[device]

    def tile_plan(self, lo: int, hi: int, device: torch.device, *, interpreted: bool) -> TilePlan:
        key = (lo, hi, device, interpreted)
        if key not in self._tile_plans:
            self._tile_plans[key] = tile_plan(self.blocks, lo, hi, device, interpreted=interpreted)
        return self._tile_plans[key]


class BlockPlan(NamedTuple):
    """Where each program of ``gram_blocks`` / ``combine_blocks`` works, as device tensors: built once
    per layout (the summation order, hence the bits, depend on it and on nothing else)."""

    split_start: torch.Tensor  # (S,) int64 column ranges of the first stage, block after block
    split_stop: torch.Tensor
    block_first: torch.Tensor  # (B,) int64: the block's first split, and how many it has
    block_count: torch.Tensor
    num_blocks: int


class TilePlan(NamedTuple):
    """The combine's tiles for the output columns ``[lo, hi)`` (positions relative to ``lo``)."""

    tile_start: torch.Tensor
    tile_stop: torch.Tensor
    tile_block: torch.Tensor
    block_p: int


def block_plan(blocks: Blocks, device: torch.device) -> BlockPlan:
    starts: list[int] = []
    stops: list[int] = []
    first: list[int] = []
    count: list[int] = []
    for spans in blocks:
        first.append(len(starts))
        for start, stop in spans:
            for a in range(start, stop, _SPLIT_COLUMNS):
                starts.append(a)
                stops.append(min(a + _SPLIT_COLUMNS, stop))
        count.append(len(starts) - first[-1])
    return BlockPlan(_indices(device, starts), _indices(device, stops), _indices(device, first), _indices(device, count), len(blocks))


def tile_plan(blocks: Blocks, lo: int, hi: int, device: torch.device, *, interpreted: bool) -> TilePlan:
    block_p = _INTERPRETED_TILE if interpreted else _TILE
    starts: list[int] = []
    stops: list[int] = []
    owners: list[int] = []
    for b, spans in enumerate(blocks):
        for start, stop in spans:
            start, stop = max(start, lo), min(stop, hi)
            for a in range(start, stop, block_p):
                starts.append(a - lo)
                stops.append(min(a + block_p, stop) - lo)
                owners.append(b)
    return TilePlan(_indices(device, starts), _indices(device, stops), _indices(device, owners), block_p)


def _indices(device: torch.device, values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


def gram_blocks_reference(J: torch.Tensor, blocks: Blocks) -> torch.Tensor:
    """``(B, T, T)``: each block's Gram matrix, summed over its spans (fp32 accumulation; fp64 for fp64)."""
    check_matrix(J, "J")
    T = J.shape[0]
    out = [sum((gram_reference(J[:, a:b]) for a, b in spans), torch.zeros(T, T, dtype=_acc(J), device=J.device)) for spans in blocks]
    return torch.stack(out) if out else torch.zeros(0, T, T, dtype=_acc(J), device=J.device)


def combine_blocks_reference(
    W: torch.Tensor, J: torch.Tensor, out: torch.Tensor, blocks: Blocks, *, lo: int = 0, accumulate: bool = False
) -> torch.Tensor:
    """``out[c − lo] (+)= W[b]ᵀ J[:, c − lo]`` for the columns ``c`` of each block inside ``[lo, lo + P)``
    (``J`` and ``out`` hold those columns); return ``out``."""
    hi = lo + J.shape[1]
    for b, spans in enumerate(blocks):
        for start, stop in spans:
            start, stop = max(start, lo), min(stop, hi)
            if start < stop:
                combine_reference_unchecked(W[b], J[:, start - lo : stop - lo], out[start - lo : stop - lo], accumulate=accumulate)
    return out


def gram_blocks(J: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """Triton ``gram_blocks_reference``: one first-stage launch over every block's columns, one second
    stage summing each block's partials; ``(B, T, T)`` fp32, each exactly symmetric, bit-reproducible."""
    check_triton_matrix(J, "J")
    T = J.shape[0]
    S = plan.split_start.shape[0]
    G = torch.zeros(plan.num_blocks, T, T, dtype=torch.float32, device=J.device)
    if S == 0:
        return G
    from . import _blocks_triton as kernels

    block_t = max(16, 1 << (T - 1).bit_length())
    block_p = ((1 << 16) if kernels.INTERPRETED else 4096) // block_t
    partials = torch.empty(S, block_t, block_t, dtype=torch.float32, device=J.device)
    on_cuda = J.device.type == "cuda"
    with torch.cuda.device(J.device) if on_cuda else contextlib.nullcontext():
        kernels._segment_partials_kernel[(S,)](
            J, partials, plan.split_start, plan.split_stop, T, J.stride(0) if T > 1 else 0,
            BT=block_t, BLOCK_P=block_p, UPCAST=kernels.INTERPRETED and J.dtype == torch.bfloat16,
            enable_fp_fusion=_FP_FUSION,
        )  # fmt: skip
        kernels._block_reduce_kernel[(-(-block_t * block_t // _REDUCE_BLOCK), plan.num_blocks)](
            partials, G, plan.block_first, plan.block_count, T,
            BT=block_t, BLOCK_E=_REDUCE_BLOCK, SPLITS=_REDUCE_SPLITS, enable_fp_fusion=_FP_FUSION,
        )  # fmt: skip
    return G


def combine_blocks(W: torch.Tensor, J: torch.Tensor, out: torch.Tensor, plan: TilePlan, *, accumulate: bool = False) -> torch.Tensor:
    """Triton ``combine_blocks_reference`` for the tiles of ``plan``; return ``out``."""
    check_triton_matrix(J, "J")
    check_triton_dtype(out, "out")
    check_triton_device(W, "W")
    N = plan.tile_start.shape[0]
    if N == 0:
        return out
    from . import _blocks_triton as kernels

    on_cuda = J.device.type == "cuda"
    with torch.cuda.device(J.device) if on_cuda else contextlib.nullcontext():
        kernels._combine_tiles_kernel[(N,)](
            W, J, out, plan.tile_start, plan.tile_stop, plan.tile_block, J.shape[0], W.stride(0),
            J.stride(0) if J.shape[0] > 1 else 0, ACCUMULATE=accumulate, BLOCK_P=plan.block_p,
            enable_fp_fusion=_FP_FUSION,
        )  # fmt: skip
    return out


def _acc(J: torch.Tensor) -> torch.dtype:
    return torch.float64 if J.dtype == torch.float64 else torch.float32
