"""The toy study in a second process, so it uses the core the other studies leave idle.

The toy's 2-parameter steps are pure Python overhead (~1 ms each) on one thread, and the other studies
also run on one thread: side by side they take the time of the longer one, which is what buys the toy
twice the steps in the default run's budget. The child only computes; it sends progress ticks and each
finished method's runs through a queue, and the parent folds them into the report whenever it polls,
so the report is only ever touched by the parent's main thread.
"""

from __future__ import annotations

import multiprocessing
import queue
import signal
import time
import traceback
from typing import Any, Sequence

import numpy as np

from . import toy
from .report import MakeBar, Report

_POLL_INTERVAL_S = 0.25


def _work(cfg: toy.ToyConfig, methods: Sequence[str], pareto: np.ndarray, channel: Any) -> None:
    import torch

    # Ctrl-C goes to the whole process group: the parent handles it and then stops this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    try:
        toy.run_methods(
            cfg, methods, pareto,
            tick=lambda n: channel.put(("tick", n)),
            on_method=lambda method, runs: channel.put(("method", method, runs)),
        )
    except BaseException:
        channel.put(("error", traceback.format_exc()))
        raise
    channel.put(("done", time.process_time()))


class BackgroundToy:
    """Starts the toy in a child process; :meth:`poll` folds its results into the report."""

    def __init__(self, cfg: toy.ToyConfig, methods: Sequence[str], report: Report, make_bar: MakeBar) -> None:
        self.report = report
        self.data, chosen, pareto = toy.prepare(cfg, methods, report)
        # spawn, not fork: forking a process that has initialised torch's thread pools can deadlock.
        context = multiprocessing.get_context("spawn")
        self.channel = context.Queue()
        self.process = context.Process(target=_work, args=(cfg, chosen, pareto, self.channel), daemon=True)
        self.process.start()
        self.bar = make_bar(toy.total_steps(cfg, chosen), "toy (2nd process)")
        self.done = False
        self.cpu_s: float | None = None  # the child's CPU time, once it is done
        self.last_poll = 0.0

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "tick":
            self.bar.update(message[1])
        elif kind == "method":
            self.data["runs"][message[1]] = message[2]
            self.report.flush()
        elif kind == "error":
            raise RuntimeError(f"the toy study failed in its process:\n{message[1]}")
        elif kind == "done":
            self.done = True
            self.cpu_s = message[1]

    def poll(self) -> None:
        """Fold in whatever the child has sent (cheap: at most every 0.25 s, never blocks)."""
        now = time.monotonic()
        if self.done or now - self.last_poll < _POLL_INTERVAL_S:
            return
        self.last_poll = now
        while True:
            try:
                self._handle(self.channel.get_nowait())
            except queue.Empty:
                return

    def finish(self) -> None:
        """Wait for the child and fold in everything it sent."""
        while not self.done:
            try:
                self._handle(self.channel.get(timeout=1.0))
            except queue.Empty:
                if not self.process.is_alive():
                    raise RuntimeError(f"the toy process died (exit code {self.process.exitcode})") from None
        self.process.join()
        self.bar.close()

    def stop(self) -> None:
        """Keep what has arrived, end the child (interrupted runs)."""
        self.last_poll = 0.0
        try:
            self.poll()
        finally:
            self.process.terminate()
            self.process.join(timeout=10)
            self.bar.close()
