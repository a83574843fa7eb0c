"""What the study prints while it runs: a progress bar on a terminal, one line per finished unit otherwise.

Redirected to a file (or a CI log), a progress bar is hundreds of carriage-return redraws; there
each finished unit gets one line instead: its number, what it was, its result in a few words and its
time. Either way the first lines say where the results go and the last where they went.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO


class Progress:
    """Reports finished units to ``stream`` (default: stderr); a tqdm bar when it is a terminal."""

    def __init__(self, total: int, *, stream: TextIO | None = None, bar: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total = total
        self.done = 0
        interactive = self.stream.isatty() if bar is None else bar
        self._bar: Any = None
        if interactive:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc="study", unit="unit", file=self.stream, dynamic_ncols=True, smoothing=0.1)

    def say(self, text: str) -> None:
        """A line of its own (above the bar on a terminal)."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def finished(self, label: str, result: str, seconds: float) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=False)
            self._bar.update(1)
            return
        width = len(str(self.total))
        self.say(f"[{self.done:>{width}}/{self.total}] {label} ({seconds:.1f} s): {result}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
