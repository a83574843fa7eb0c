"""The documentation runs as written.

- Every ```python block of the site's pages (docs/*.md as the site shows them: the README's included
  sections and the pages generated from the method registry, see docs/hooks.py) and of README.md
  runs, in order, in one namespace per page. Each page starts from the quick start's first block
  (the model, loader and loss the pages share); README.md also gets a ``J`` for its functional
  example.
- A block right after ``<!-- docs-test: not run (reason) -->`` is shown and not run: only for a block
  that needs GPUs or several processes (the examples/ scripts cover those on the CPU, below).
- A ```diff block (the migration recipes) runs its ``+`` side (gradsurgery's code); its ``-`` side (the
  other library's) must compile, and the page's "**R lines removed, A added**" must count the diff.
- Every public docstring's example runs (doctest), and has Args/Returns/Raises/Examples sections.
- The examples/ scripts run, the DDP one on two processes.

docs/lightning.md and docs/accelerate.md run in tests/test_lightning.py and tests/test_accelerate.py
(with assertions on the trainer's state), not here.
"""

from __future__ import annotations

import doctest
import importlib.util
import inspect
import os
import pydoc
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import gradsurgery as gs

ROOT = Path(__file__).resolve().parents[1]
RUN_ELSEWHERE = {"lightning.md": "tests/test_lightning.py", "accelerate.md": "tests/test_accelerate.py"}
FIXTURES = {"README.md": "J = torch.randn(3, 64)  # three tasks' gradients of 64 shared values\n"}
NOT_RUN = re.compile(r"<!-- docs-test: not run \((?P<reason>[^)]+)\) -->\s*$")
FENCE = re.compile(r"^```(?P<lang>\w*)\n(?P<body>.*?)^```$", flags=re.M | re.S)
COUNT = re.compile(r"\*\*(\d+) lines? removed, (\d+) added\*\*")


def _hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HOOKS = _hooks()
PAGES = {**HOOKS.site_markdown(), "README.md": (ROOT / "README.md").read_text(encoding="utf-8")}


def blocks(text: str) -> list[tuple[str, str, str | None]]:
    """``(language, code, reason it is not run or None)`` of every fenced block, in order."""
    out = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        reason = NOT_RUN.match(before)
        out.append((match.group("lang"), match.group("body"), reason.group("reason") if reason else None))
    return out


def diff_sides(diff: str) -> tuple[str, str, int, int]:
    """A unified-diff-style block → (the ``-`` side, the ``+`` side, lines removed, lines added)."""
    theirs, ours, removed, added = [], [], 0, 0
    for line in diff.splitlines():
        mark, code = (line[:1], line[1:]) if line else (" ", "")
        if mark == "-":
            theirs.append(code)
            removed += 1
        elif mark == "+":
            ours.append(code)
            added += 1
        else:
            assert mark == " ", f"a diff line must start with '-', '+' or a space: {line!r}"
            theirs.append(code)
            ours.append(code)
    return "\n".join(theirs) + "\n", "\n".join(ours) + "\n", removed, added


SETUP = next(code for lang, code, _ in blocks(PAGES["quickstart.md"]) if lang == "python")
RUNNABLE = sorted(
    page
    for page, text in PAGES.items()
    if page not in RUN_ELSEWHERE and any(lang in ("python", "diff") and reason is None for lang, _, reason in blocks(text))
)


@pytest.mark.parametrize("page", RUNNABLE)
def test_the_code_of_the_page_runs(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    monkeypatch.chdir(tmp_path)  # pages save checkpoints and figures
    torch.manual_seed(0)
    namespace: dict[str, Any] = {"__name__": "docs"}
    if page != "quickstart.md":
        exec(compile(SETUP, "quickstart.md (setup)", "exec"), namespace)
    exec(FIXTURES.get(page, ""), namespace)
    ran = 0
    for number, (lang, code, reason) in enumerate(blocks(PAGES[page])):
        if reason is not None or lang not in ("python", "diff"):
            continue
        if lang == "diff":
            code = diff_sides(code)[1]
        exec(compile(code, f"{page} (block {number})", "exec"), namespace)
        ran += 1
    assert ran > 0


def test_the_migration_diffs_count_their_lines() -> None:
    checked = 0
    for page, text in PAGES.items():
        diffs = [code for lang, code, _ in blocks(text) if lang == "diff"]
        if not diffs:
            continue
        stated = COUNT.findall(text)
        assert len(stated) == len(diffs), f"{page}: say '**R lines removed, A added**' once per diff"
        for code, (removed, added) in zip(diffs, stated):
            theirs, _, counted_removed, counted_added = diff_sides(code)
            compile(theirs, f"{page} (the other library's side)", "exec")  # their code is real Python
            assert (counted_removed, counted_added) == (int(removed), int(added)), page
            checked += 1
    assert checked == 4  # Pytorch-PCGrad, pytorch-optimizer, TorchJD, LibMTL


def test_blocks_that_do_not_run_are_rare_and_say_why() -> None:
    skipped = [(page, reason) for page, text in PAGES.items() for lang, _, reason in blocks(text) if reason is not None]
    assert len(skipped) <= 2, skipped
    for page, reason in skipped:
        assert re.search(r"GPU|process", reason), f"{page}: a block is not run only for GPUs or several processes ({reason})"


def test_the_pages_run_elsewhere_are_run_there() -> None:
    for page, test in RUN_ELSEWHERE.items():
        assert f'"docs" / "{page}"' in (ROOT / test).read_text(encoding="utf-8"), f"{test} no longer runs docs/{page}"


# ---------------------------------------------------------------------- generated pages


def test_every_registered_method_has_a_page_and_a_place_in_the_navigation() -> None:
    pages = HOOKS.method_pages()
    navigation = str(HOOKS.methods_nav())
    for method in gs.REGISTRY:
        page = f"methods/{method.name.lower()}.md"
        assert f"::: gradsurgery.{method.name}\n" in pages[page]
        assert f"'{page}'" in navigation
        assert f"[`gs.{method.name}`]({method.name.lower()}.md)" in HOOKS.methods_table()
    assert set(pages) == {f"methods/{m.name.lower()}.md" for m in gs.REGISTRY}


@pytest.mark.parametrize("name", ["PCGrad", "CAGrad", "MGDA", "UPGrad", "NashMTL"])
def test_a_method_page_compares_with_the_official_code_and_the_libraries(name: str) -> None:
    page = HOOKS.method_page(gs.methods.by_name(name))
    table = page.split("## Compared with the official code, TorchJD and LibMTL", 1)[1]
    assert table.count("\n|") >= 3  # the header, its rule and at least one row


def test_includes_fail_loudly_on_a_missing_section() -> None:
    with pytest.raises(ValueError, match='no section "Not a heading"'):
        HOOKS.expand('<!-- include README.md "Not a heading" -->', "contract.md")


def test_readme_links_are_rewritten_for_the_site() -> None:
    text = "[a](docs/lightning.md), [b](#methods), ![c](bench/results/step_time_vs_T.png), [d](tests/test_docs.py)"
    assert HOOKS.rewrite_links(text, ROOT / "README.md", "contract.md") == (
        "[a](lightning.md), [b](methods/index.md#methods), ![c](benchmarks/step_time_vs_T.png), d"
    )


def test_docstring_roles_become_markdown() -> None:
    text = "See :class:`~gradsurgery.GradSurgery` and :mod:`._cone`, then::\n\n    code\n\nand ::\n"
    converted = HOOKS.markdown_docstring(text)
    assert '<autoref identifier="gradsurgery.GradSurgery" optional><code>GradSurgery</code></autoref>' in converted
    assert "``._cone``" in converted and "then:\n\n    code" in converted and "::" not in converted


# ---------------------------------------------------------------------- docstrings


def _public_callables() -> dict[str, Any]:
    from gradsurgery import citation, diagnostics, frameworks, functional, plot

    out: dict[str, Any] = {f"gs.{name}": cls for name, cls in gs.WRAPPERS.items()}
    out.update({f"gs.functional.{name}": getattr(functional, name) for name in functional.__all__})
    out.update({"gs.backward": frameworks.backward, "gradsurgery.frameworks.unwrap": frameworks.unwrap})
    out.update({"gs.bibtex": citation.bibtex, "gs.cite": citation.cite})
    out.update({f"gradsurgery.diagnostics.{name}": getattr(diagnostics, name) for name in diagnostics.__all__})
    out.update({f"gradsurgery.plot.{name}": getattr(plot, name) for name in plot.__all__})
    return out


PUBLIC = _public_callables()


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_the_docstring_has_its_sections_and_its_example_runs(name: str, one_thread: None) -> None:
    obj = PUBLIC[name]
    doc = inspect.getdoc(obj) or ""
    sections = ["Args:", "Examples:"] + ([] if inspect.isclass(obj) else ["Returns:"])
    if inspect.isclass(obj) or "functional" in name or "raise " in inspect.getsource(obj):
        sections.append("Raises:")  # (a function that raises nothing itself has no Raises section)
    missing = [s for s in sections if not re.search(rf"^{s}$", doc, flags=re.M)]
    assert not missing, f"{name}'s docstring has no {missing}"
    if "plot" in name:
        pytest.importorskip("matplotlib")
    tests = doctest.DocTestFinder(recurse=False).find(obj, name, globs={})
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in tests:
        runner.run(test)
    assert runner.tries > 0 and runner.failures == 0


def test_every_wrapper_documents_every_option_of_its_signature() -> None:
    for name, cls in gs.WRAPPERS.items():
        doc = inspect.getdoc(cls) or ""
        args = doc.split("\nArgs:\n", 1)[1].split("\nRaises:\n", 1)[0]
        documented = set(re.findall(r"^    (\w+): ", args, flags=re.M))
        parameters = set(inspect.signature(cls).parameters)
        assert documented == parameters, f"{name}: documented {sorted(documented ^ parameters)} differ from the signature"


def test_help_shows_the_method_and_the_common_options() -> None:
    text = pydoc.render_doc(gs.CAGrad, renderer=pydoc.plaintext)
    assert "conflict-averse gradient descent" in text
    options = ["c", "rescale", "max_iter", "shared", "reduction", "nonfinite", "engine", "backend", "sync", "every", "tasks_per_step"]
    for option in options:
        assert re.search(rf"^ \|      {option}: ", text, flags=re.M), f"help(gs.CAGrad) does not describe {option}"
    assert "_supports" not in text and "_cone" not in text and "wrapper_class.<locals>" not in text


# ---------------------------------------------------------------------- examples/


def _run(command: list[str], **kwargs: Any) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_examples_train_multitask_runs() -> None:
    out = _run([sys.executable, str(ROOT / "examples" / "train_multitask.py"), "--steps", "20"])
    assert [line.split(":")[0].strip() for line in out.splitlines()] == ["Sum", "Mean", "PCGrad", "CAGrad", "MGDA"]


def test_examples_ddp_train_on_two_processes_prints_the_single_process_losses(tmp_path: Path) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run"]  # torchrun, from this interpreter's torch
    script = str(ROOT / "examples" / "ddp_train.py")
    one = _run([sys.executable, script, "--steps", "6", "--checkpoint", str(tmp_path / "one.pt")], cwd=tmp_path)
    two = _run(
        [*torchrun, "--standalone", "--nproc_per_node", "2", script, "--steps", "6", "--checkpoint", str(tmp_path / "two.pt")],
        cwd=tmp_path,
    )

    def losses(out: str) -> list[float]:
        return [float(v) for line in out.splitlines() if line.startswith("step") for v in line.split(":")[1].split()]

    assert losses(one) == pytest.approx(losses(two), abs=2e-4) and len(losses(one)) == 6
    assert (tmp_path / "two.pt").exists()
