"""BibTeX for the library and for every method it implements (from each method's spec)."""

from __future__ import annotations

from .methods import REGISTRY

LIBRARY_BIBTEX = """@software{gradsurgery,
  title  = {gradsurgery: Gradient Surgery for Joint Training in PyTorch},
  author = {{The gradsurgery developers}},
  year   = {2026},
  version = {0.1.0},
  license = {MIT}
}"""

METHOD_BIBTEX: dict[str, str] = {method.name: method.bibtex for method in REGISTRY if method.bibtex}


def bibtex(method: str | None = None) -> str:
    """The library's BibTeX and every method's, or only the named method's.

    Args:
        method: a wrapper's name (``"PCGrad"``, ``"CAGrad"``, ...); ``None`` (default) for the library's
            entry followed by every method's, each paper once.

    Returns:
        The BibTeX entries, separated by blank lines.

    Raises:
        TypeError: ``method`` is not a str or None.
        ValueError: ``method`` names no method with a paper (the message lists the names).

    Examples:
        >>> import gradsurgery as gs
        >>> gs.bibtex("CAGrad").splitlines()[0]
        '@inproceedings{liu2021conflict,'
    """
    if method is None:  # each entry once (a method's loss and gradient forms share a paper)
        return "\n\n".join([LIBRARY_BIBTEX, *dict.fromkeys(METHOD_BIBTEX.values())])
    if not isinstance(method, str):
        raise TypeError(f"method must be a method's name (a str) or None, got {type(method).__name__}")
    if method not in METHOD_BIBTEX:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(METHOD_BIBTEX)}")
    return METHOD_BIBTEX[method]


def cite(method: str | None = None) -> None:
    """Print the BibTeX to cite: the library and every method, or only ``method``.

    Args:
        method: as for :func:`bibtex`.

    Returns:
        ``None``; the entries are printed.

    Raises:
        ValueError: as for :func:`bibtex`.

    Examples:
        >>> import gradsurgery as gs
        >>> gs.cite("PCGrad")  # doctest: +ELLIPSIS
        @inproceedings{yu2020gradient,
        ...
    """
    print(bibtex(method))
