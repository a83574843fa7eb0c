"""``triton.jit`` as a type checker must see it. A kernel is launched as ``kernel[grid](...)`` with device
pointers and ``tl.constexpr`` values that no Python type describes, so the decorated kernel is ``Any``
(a checker that reads Triton's untyped code would instead call it like the plain function). Imported by
the ``_*_triton`` modules only: importing Triton is theirs to do, on first use."""

from __future__ import annotations

from typing import Any, Callable

import triton


def jit(fn: Callable[..., None] | None = None, **options: Any) -> Any:
    """``@jit`` or ``@jit(do_not_specialize=[...])``, exactly as ``triton.jit``."""
    return triton.jit(fn, **options)
