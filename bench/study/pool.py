"""The study's units of work on worker processes, one per core (two on the 2-core machines it is sized for).

A unit is a top-level function and its arguments (one toy batch, one seed of one method, one timing
run); it computes and returns a JSON-ready result, and touches nothing else. Every unit seeds itself
and runs on one thread, so its result does not depend on which worker ran it or on what ran beside
it: the numbers are those of a sequential run. The parent hands the units out in the order given
(longest first balances the two workers) and receives each result as it finishes; it alone writes
the report. With one worker (a 1-core machine) the units run in the parent, in order.
"""

from __future__ import annotations

import multiprocessing
import queue
import signal
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence


@dataclass(frozen=True)
class Unit:
    key: tuple[Any, ...]  # what the parent needs to file the result: (study, method, seed), ...
    label: str  # for the log
    fn: Callable[..., Any]  # a module-level function (picklable by reference)
    args: tuple[Any, ...] = ()


@dataclass
class Done:
    unit: Unit
    result: Any
    seconds: float  # wall time of the unit in its worker
    cpu_seconds: float
    worker: int


@dataclass(frozen=True)
class _Failure:
    text: str


def _threads_one() -> None:
    import torch

    # The models are tiny: intra-op threads only add contention and timing noise.
    torch.set_num_threads(1)


def _execute(unit: Unit, worker: int) -> Done:
    began, cpu = time.perf_counter(), time.process_time()
    result = unit.fn(*unit.args)
    return Done(unit, result, time.perf_counter() - began, time.process_time() - cpu, worker)


def _serve(worker: int, tasks: Any, results: Any) -> None:
    # Ctrl-C reaches the whole process group: the parent handles it and ends the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _threads_one()
    while True:
        item = tasks.get()
        if item is None:
            return
        index, unit = item
        try:
            done = _execute(unit, worker)
        except BaseException:
            results.put((index, _Failure(f"{unit.label} failed in worker {worker}:\n{traceback.format_exc()}")))
            return
        results.put((index, done))


class Pool:
    """``workers`` processes (``spawn``: forking a process whose torch thread pools exist can deadlock)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._processes: list[Any] = []
        if workers > 1:
            context = multiprocessing.get_context("spawn")
            self._tasks = context.Queue()
            self._results = context.Queue()
            self._processes = [context.Process(target=_serve, args=(w, self._tasks, self._results), daemon=True)
                               for w in range(workers)]
            for process in self._processes:
                process.start()

    def run(self, units: Sequence[Unit]) -> Iterator[Done]:
        """Each unit's :class:`Done`, in the order they finish; raises if a unit fails."""
        if not self._processes:
            _threads_one()
            for unit in units:
                yield _execute(unit, 0)
            return
        for item in enumerate(units):
            self._tasks.put(item)
        for _ in units:
            _, outcome = self._next()
            if isinstance(outcome, _Failure):
                raise RuntimeError(outcome.text)
            yield outcome

    def _next(self) -> tuple[int, Any]:
        while True:
            try:
                item: tuple[int, Any] = self._results.get(timeout=1.0)
                return item
            except queue.Empty:
                dead = [p for p in self._processes if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"a study worker died (exit code {dead[0].exitcode})") from None

    def close(self, *, now: bool = False) -> None:
        """End the workers: once idle, or ``now`` (an interrupted or failed run: units in flight are lost)."""
        for _ in self._processes:
            self._tasks.put(None)
        for process in self._processes:
            if not now:
                process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join(timeout=10)
        self._processes = []

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, kind: Any, *exc: Any) -> None:
        self.close(now=kind is not None)
