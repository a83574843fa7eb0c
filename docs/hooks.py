"""The build step of the documentation site (an mkdocs hook, no plugin to install).

- One page per method of ``gradsurgery.methods.REGISTRY`` (``methods/<name>.md``) and the methods
  table of ``methods/index.md`` are generated here, so a method added to the registry gets its page,
  its row and its place in the navigation without a hand edit.
- ``<!-- include FILE "Heading" -->`` in a page is replaced by that section of FILE (the README holds
  the contract, the semantics table, the study and the benchmarks; the site shows them, it does not
  copy them). Links in an included section are rewritten for the site.
- ``bench/results/README.md`` and ``suite.md`` (with the plot) become pages under ``benchmarks/``.
- :class:`RstRoles`, a griffe extension loaded by mkdocstrings, reads the docstrings'
  reStructuredText habits (``:class:`x```, ``text ::``) as Markdown.

``tests/test_docs.py`` imports this file to run the code blocks of the pages as the site shows them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

INCLUDE = re.compile(r'<!-- include (?P<file>\S+) "(?P<heading>[^"]+)" -->')
GENERATED_TABLE = "<!-- generated: methods table -->"
# Files of the repository shown on the site, under these paths (docs/ itself is the site's root).
MAPPED = {
    "bench/results/README.md": "benchmarks/results.md",
    "bench/results/suite.md": "benchmarks/suite.md",
    "bench/results/step_time_vs_T.png": "benchmarks/step_time_vs_T.png",
}
# README sections linked by anchor (``#methods``) and the page that shows them.
ANCHORS = {
    "methods": "methods/index.md",
    "semantics": "methods/index.md",
    "the-training-loop-contract": "contract.md",
    "options": "contract.md",
    "guarantees": "contract.md",
    "backends": "contract.md",
    "benchmarks": "benchmarks.md",
    "distributed-training": "distributed.md",
}
KINDS = ("Gram-space methods", "Elementwise methods", "Loss-weighting methods", "Baselines")


# ---------------------------------------------------------------------- the methods


def _registry() -> tuple[Any, ...]:
    from gradsurgery.methods import REGISTRY

    return REGISTRY


def kind(method: Any) -> str:
    if method.loss is not None:
        return "Loss-weighting methods"
    if method.combine is not None:
        return "Elementwise methods"
    if method.function is None:
        return "Baselines"
    return "Gram-space methods"


def slug(method: Any) -> str:
    return method.name.lower()


def _paper(bibtex: str) -> str:
    title = re.search(r"title\s*=\s*\{(.+?)\},?\s*$", bibtex, flags=re.M)
    year = re.search(r"year\s*=\s*\{?(\d{4})", bibtex)
    venue = re.search(r"(?:booktitle|journal)\s*=\s*\{(.+?)\},?\s*$", bibtex, flags=re.M)
    if title is None:
        return "—"
    name = title.group(1).replace("{", "").replace("}", "")
    parts = [f"*{name}*", venue.group(1) if venue else None, year.group(1) if year else None]
    return ", ".join(p for p in parts if p)


def methods_table() -> str:
    """Every registered method: its page, functional pair, options and paper."""
    rows = ["| wrapper | functional | options (defaults) | kind | paper |", "|---|---|---|---|---|"]
    for method in _registry():
        options = ", ".join(f"`{o.name}={o.default!r}`" for o in method.options)
        if method.random:
            options = ", ".join(filter(None, [options, "`seed`"]))
        if method.function is None:
            functional = "—"
        elif method.combine is not None:
            functional = f"`{method.function}` (on `J`)"
        else:
            functional = f"`{method.function}`, `{method.function}_weights`"
        kind_name = kind(method).removesuffix(" methods").removesuffix("s")
        rows.append(
            f"| [`gs.{method.name}`]({slug(method)}.md) | {functional} | {options or '—'} | {kind_name} | {_paper(method.bibtex)} |"
        )
    return "\n".join(rows)


def semantics_rows(method: Any) -> str:
    """The rows of the README's semantics table about ``method`` (ours, the official code, the
    libraries), as a table of their own; empty when the table has none."""
    text = rewrite_links(section(ROOT / "README.md", "Semantics"), ROOT / "README.md", f"methods/{slug(method)}.md")
    lines = [line for line in text.splitlines() if line.startswith("|")]
    if len(lines) < 3:
        return ""
    key = re.sub(r"[^a-z0-9]", "", method.name.lower())
    rows = []
    for line in lines[2:]:
        first = line.split("|")[1].strip()
        words = first.replace("*", "").split(" ", 1)
        if re.sub(r"[^a-z0-9]", "", words[0].lower()) == key:
            label = words[1] if len(words) > 1 else "method"
            rows.append("| " + label + " |" + line.split("|", 2)[2])
    if not rows:
        return ""
    header = lines[0].split("|", 2)
    return "\n".join(["| |" + header[2], lines[1], *rows])


def method_page(method: Any) -> str:
    """The page of one method: summary, facts from the spec, the class documentation (math, options,
    common options, example), the functional pair, the comparison rows and the BibTeX."""
    facts = [f"| wrapper | `gs.{method.name}(optimizer, ...)` |"]
    if method.function is not None and method.combine is None:
        facts.append(f"| functional | `gs.functional.{method.function}(J, ...)`, `gs.functional.{method.function}_weights(G, ...)` |")
    elif method.function is not None:
        facts.append(f"| functional | `gs.functional.{method.function}(J, ...)` (elementwise: it needs `J`, not only `G`) |")
    facts.append(f"| kind | {kind(method)[:-1].lower()} |")
    if callable(method.reads_losses):
        facts.append("| reads the loss values | with some options (see below) |")
    elif method.reads_losses or method.loss is not None:
        facts.append("| reads the loss values | yes |")
    if method.random:
        facts.append("| random | draws from the wrapper's own seeded `torch.Generator` (`seed=`; saved in `state_dict()`) |")
    if method.state is not None:
        facts.append(f"| state across steps | {method.state.doc} (saved in `state_dict()`) |")
    if method.fixed:
        facts.append("| fixed options | " + ", ".join(f"`{k}={v!r}`" for k, v in method.fixed.items()) + " |")
    if method.bibtex:
        facts.append(f"| paper | {_paper(method.bibtex)} |")
    parts = [
        f"# {method.name}",
        method.summary(),
        "| | |\n|---|---|\n" + "\n".join(facts),
        "## Documentation",
        f"::: gradsurgery.{method.name}\n    options:\n"
        "      show_root_heading: false\n      show_root_toc_entry: false\n      members: false",
    ]
    compared = semantics_rows(method)
    if compared:
        parts += ["## Compared with the official code, TorchJD and LibMTL", compared]
    if method.function is not None:
        parts += ["## Functional API"]
        names = [method.function] if method.combine is not None else [method.function, f"{method.function}_weights"]
        parts += [f"::: gradsurgery.functional.{name}\n    options:\n      heading_level: 3" for name in names]
    if method.bibtex:
        parts += ["## Cite", f'```bibtex\n{method.bibtex}\n```', f'`gs.bibtex("{method.name}")` returns this entry.']
    return "\n\n".join(parts) + "\n"


def method_pages() -> dict[str, str]:
    """``docs-relative path → Markdown`` of every generated method page."""
    return {f"methods/{slug(m)}.md": method_page(m) for m in _registry()}


def methods_nav() -> list[Any]:
    nav: list[Any] = [{"Overview": "methods/index.md"}]
    for name in KINDS:
        members = [{m.name: f"methods/{slug(m)}.md"} for m in _registry() if kind(m) == name]
        if members:
            nav.append({name: members})
    return nav


# ---------------------------------------------------------------------- included sections


def section(path: Path, heading: str) -> str:
    """The section of a Markdown file under ``heading`` (the heading line included), up to the next
    heading of the same or a higher level. Raises ``ValueError`` when the heading is not there."""
    lines = path.read_text(encoding="utf-8").splitlines()
    fenced = False
    start = level = None
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        match = None if fenced else re.match(r"(#+) (.*)", line)
        if match is None:
            continue
        if start is None and match.group(2).strip() == heading:
            start, level = i, len(match.group(1))
        elif start is not None and len(match.group(1)) <= level:
            return "\n".join(lines[start:i]).rstrip() + "\n"
    if start is None:
        raise ValueError(f'{path.relative_to(ROOT)} has no section "{heading}" (docs include it)')
    return "\n".join(lines[start:]).rstrip() + "\n"


def _site_target(target: str, source: Path) -> str | None:
    """Where a link of ``source`` (a repository file) points on the site, docs-relative; ``None``
    when the site does not show it."""
    path, _, anchor = target.partition("#")
    if not path:
        page = ANCHORS.get(anchor)
        return None if page is None else f"{page}#{anchor}"
    repo_path = os.path.normpath(os.path.join(os.path.relpath(source.parent, ROOT), path)).replace(os.sep, "/")
    if repo_path.startswith("docs/"):
        site = repo_path.removeprefix("docs/")
    else:
        site = MAPPED.get(repo_path)
    if site is None:
        return None
    return f"{site}#{anchor}" if anchor else site


def rewrite_links(text: str, source: Path, page: str) -> str:
    """Point the links of ``text`` (from ``source``) at the site, relative to ``page``; a link to a file
    the site does not show becomes its text."""

    def fix(match: re.Match[str]) -> str:
        bang, label, target = match.group(1), match.group(2), match.group(3)
        if re.match(r"[a-z]+://", target):
            return match.group(0)
        site = _site_target(target, source)
        if site is None:
            return label if not bang else ""
        path, _, anchor = site.partition("#")
        relative = os.path.relpath(path, os.path.dirname(page) or ".").replace(os.sep, "/")
        return f"{bang}[{label}]({relative}{'#' + anchor if anchor else ''})"

    text = re.sub(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)", fix, text)
    # Reference-style notes ("[Pytorch-PCGrad]: the widely copied port") are prose, not link targets.
    notes = re.findall(r"^\[([^\]]+)\]: (?![a-z]+://)", text, flags=re.M)
    text = re.sub(r"^\[([^\]]+)\]: (?![a-z]+://)(.*)$", r"*\1*: \2", text, flags=re.M)
    for note in notes:
        text = text.replace(f"[{note}]", note)
    return text


def expand(markdown: str, page: str) -> str:
    """``markdown`` of ``page`` (docs-relative) with its includes and generated parts filled in."""

    def include(match: re.Match[str]) -> str:
        source = ROOT / match.group("file")
        return rewrite_links(section(source, match.group("heading")), source, page)

    markdown = INCLUDE.sub(include, markdown)
    return markdown.replace(GENERATED_TABLE, methods_table())


def site_markdown() -> dict[str, str]:
    """Every Markdown page of the site as it is built: ``docs-relative path → text``."""
    pages = {p.relative_to(DOCS).as_posix(): p.read_text(encoding="utf-8") for p in DOCS.rglob("*.md")}
    pages.update(method_pages())
    for source, target in MAPPED.items():
        if target.endswith(".md"):
            pages[target] = rewrite_links((ROOT / source).read_text(encoding="utf-8"), ROOT / source, target)
    return {page: expand(text, page) for page, text in pages.items()}


# ---------------------------------------------------------------------- mkdocs events


def on_config(config: Any, **kwargs: Any) -> Any:
    def replace(items: list[Any]) -> list[Any]:
        out = []
        for item in items:
            if isinstance(item, dict):
                item = {
                    key: methods_nav() if value == "methods/index.md" else replace(value) if isinstance(value, list) else value
                    for key, value in item.items()
                }
            out.append(item)
        return out

    if config.get("nav"):
        config["nav"] = replace(config["nav"])
    return config


def on_files(files: Any, config: Any, **kwargs: Any) -> Any:
    from mkdocs.structure.files import File

    for page, text in method_pages().items():
        files.append(File.generated(config, page, content=text))
    for source, target in MAPPED.items():
        if target.endswith(".md"):
            text = rewrite_links((ROOT / source).read_text(encoding="utf-8"), ROOT / source, target)
            files.append(File.generated(config, target, content=text))
        else:
            files.append(File.generated(config, target, abs_src_path=str(ROOT / source)))
    return files


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    return expand(markdown, page.file.src_uri)


# ---------------------------------------------------------------------- docstrings


ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj):`(~?)([^`]+)`")


def markdown_docstring(text: str) -> str:
    """reStructuredText habits of the docstrings, as Markdown: ``:class:`~a.B``` becomes a code span
    linked to ``a.B`` when the site documents it; ``text ::`` before a literal block becomes ``text:``
    (``::`` alone disappears); the indented block after it is already a Markdown code block."""

    def role(match: re.Match[str]) -> str:
        short, target = match.group(1), match.group(2)
        shown = target.rsplit(".", 1)[-1] if short else target
        if target.startswith(".") or "." not in target:
            return f"``{shown}``"
        return f'<autoref identifier="{target}" optional><code>{shown}</code></autoref>'

    text = ROLE.sub(role, text)
    text = re.sub(r"(\S)::[ \t]*$", r"\1:", text, flags=re.M)
    return re.sub(r"[ \t]+::[ \t]*$", "", text, flags=re.M)


try:
    import griffe
except ImportError:  # the hooks run without griffe; only mkdocstrings loads the extension
    griffe = None  # type: ignore[assignment]

if griffe is not None:

    class RstRoles(griffe.Extension):  # type: ignore[misc,name-defined]
        """Docstrings as Markdown (see :func:`markdown_docstring`), before mkdocstrings parses them."""

        def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
            if obj.docstring is not None:
                obj.docstring.value = markdown_docstring(obj.docstring.value)
