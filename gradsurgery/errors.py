"""Exception types raised by gradsurgery (all subclasses of ``ValueError``)."""

from __future__ import annotations


class NonFiniteGradientError(ValueError):
    """A task's gradient (or the Gram matrix built from it) holds NaN or ±Inf.

    ``tasks`` lists the offending task indices.
    """

    def __init__(self, message: str, *, tasks: list[int]) -> None:
        super().__init__(message)
        self.tasks = tasks
