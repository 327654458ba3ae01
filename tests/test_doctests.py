"""The documentation's code runs: every Python block of docs/, and the docstring converter used to render the API.

Each page's blocks run in order in one namespace (a later block may use what an earlier one defined), in a temporary
directory. ``python`` blocks are executed; ``pycon`` blocks (``>>>`` sessions) are doctests, so the output they show
is checked. A block may be left out only with an HTML comment ``<!-- not run: why -->`` on the line before it, and
never inside an "After" tab of a migration guide: every "after" snippet is run. The docstrings' own ``>>>``
examples are run by ``python -m pytest --doctest-modules src/gradstep`` (a separate CI command).
"""

from __future__ import annotations

import contextlib
import doctest
import importlib.util
import io
import os
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from gradstep.core import registry

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^(?P<indent> *)```(?P<info>[\w-]*)")
TAB = re.compile(r'^(?P<indent> *)=== "(?P<title>[^"]+)"')
NOT_RUN = re.compile(r"^\s*<!-- not run: (?P<why>.+?) -->\s*$")
RUN_LANGUAGES = ("python", "pycon")


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    tab: str | None  # the title of the tab the block is in, if any
    not_run: str | None  # why the block is not run, if it is not


def parse_blocks(text: str, page: str = "<text>") -> list[Block]:
    """The fenced code blocks of a Markdown page, with the tab each is in and any "not run" marker before it."""
    lines = text.split("\n")
    blocks: list[Block] = []
    tabs: list[tuple[int, str]] = []  # (indent, title) of the open tabs, outermost first
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip():
            # A line no deeper than a tab's title closes that tab (a tab's content is indented under its title).
            depth = len(line) - len(line.lstrip(" "))
            tabs = [(d, t) for d, t in tabs if d < depth]
        tab = TAB.match(line)
        if tab:
            tabs.append((len(tab["indent"]), tab["title"]))
            i += 1
            continue
        fence = FENCE.match(line)
        if not fence:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        code = textwrap.dedent("\n".join(lines[i + 1 : end]))
        previous = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        marker = NOT_RUN.match(previous)
        tab_title = tabs[-1][1] if tabs else None  # the innermost open tab
        blocks.append(Block(page, i + 1, fence["info"], code, tab_title, marker["why"] if marker else None))
        i = end + 1
    return blocks


SNIPPET = re.compile(r'^--8<-- "(?P<path>[^"]+)"$', re.MULTILINE)


def _expand_snippets(code: str) -> str:
    """Replace pymdownx.snippets' ``--8<-- "path"`` lines (paths from the repository root) by the files they include."""
    return SNIPPET.sub(lambda m: (ROOT / m["path"]).read_text(), code)


def _pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def _run_block(block: Block, namespace: dict[str, Any]) -> None:
    where = f"{block.page}:{block.line}"
    if block.language == "python":
        exec(compile(_expand_snippets(block.code), where, "exec"), namespace)
        return
    parser = doctest.DocTestParser()
    test = parser.get_doctest(block.code, namespace, where, block.page, block.line)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = io.StringIO()
    runner.run(test, out=report.write, clear_globs=False)
    assert runner.failures == 0, f"{where}: the session's output differs\n{report.getvalue()}"


@pytest.fixture
def in_tmp_dir(tmp_path: Path) -> Any:
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(old)


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_every_python_block_of_the_page_runs(page: Path, in_tmp_dir: Path) -> None:
    from gradstep.lab.peers import holocron_optim

    # holocron's package __init__ needs torchvision's compiled ops; its optimizers do not (see gradstep.lab.peers).
    # Registering holocron.optim first lets the guides' "before" blocks say ``from holocron.optim import ...``.
    with contextlib.suppress(ImportError):
        holocron_optim()
    blocks = [b for b in parse_blocks(page.read_text(), str(page.relative_to(ROOT))) if b.language in RUN_LANGUAGES]
    # The page's namespace is a real module, as a script's is (dataclasses look their module up in sys.modules).
    page_module = ModuleType("docs_page")
    sys.modules[page_module.__name__] = page_module
    namespace = page_module.__dict__
    before = set(registry._REGISTRY)
    try:
        for block in blocks:
            if block.not_run is None:
                with contextlib.redirect_stdout(io.StringIO()):
                    _run_block(block, namespace)
    finally:
        # A page may register its own optimizer (composing.md): the other tests must not see it. Entries that
        # gradstep's modules registered on import (gradstep.wrappers) stay, as their modules stay imported.
        for name in set(registry._REGISTRY) - before:
            if not registry._REGISTRY[name].cls.__module__.startswith("gradstep."):
                del registry._REGISTRY[name]
        del sys.modules[page_module.__name__]


def test_every_after_snippet_of_the_migration_guides_is_run() -> None:
    guides = sorted((DOCS / "migration").glob("*.md"))
    assert len(guides) == 6, [g.name for g in guides]  # torch.optim, fastai, holocron, ALF, GoMLX, rai_toolbox
    for guide in guides:
        blocks = parse_blocks(guide.read_text(), guide.name)
        after = [b for b in blocks if b.tab is not None and b.tab.startswith("After")]
        assert after, f"{guide.name} has no 'After' tab"
        for block in after:
            assert block.language in RUN_LANGUAGES, f"{guide.name}:{block.line}: an 'after' block is {block.language}"
            assert block.not_run is None, f"{guide.name}:{block.line}: an 'after' block is marked not run"
        # A "before" block left out must say why (the original is not installed, or is not Python).
        for block in blocks:
            if block.not_run is not None:
                assert block.not_run.strip(), f"{guide.name}:{block.line}: empty reason"


def test_block_parser_sees_tabs_markers_and_languages() -> None:
    text = "\n".join(
        [
            "intro",
            "",
            '=== "Before (ALF)"',
            "",
            "    <!-- not run: ALF is not installed -->",
            "    ```python",
            "    import alf",
            "    ```",
            "",
            '=== "After (gradstep)"',
            "",
            "    ```python",
            "    import gradstep",
            "    ```",
            "",
            "```go",
            "x := 1",
            "```",
        ]
    )
    blocks = parse_blocks(text)
    assert [(b.language, b.tab, b.not_run, b.code) for b in blocks] == [
        ("python", "Before (ALF)", "ALF is not installed", "import alf"),
        ("python", "After (gradstep)", None, "import gradstep"),
        ("go", None, None, "x := 1"),
    ]


# --- the docstring converter (docs/_griffe/rst_markup.py) ------------------------------------------------------------


def _converter() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rst_markup", DOCS / "_griffe" / "rst_markup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_math_block_and_roles_become_arithmatex_and_code() -> None:
    convert = _converter().rst_to_markdown
    text = "Adam:\n\n.. math::\n    m_t = \\beta_1 m_{t-1}\n\n"
    text += "see :class:`~gradstep.optim.adam.ScaleByAdam` and :math:`\\epsilon`."
    md = convert(text)
    assert "$$\nm_t = \\beta_1 m_{t-1}\n$$" in md
    assert "<code>ScaleByAdam</code>" in md and "$\\epsilon$" in md
    assert ".. math::" not in md and ":class:" not in md


def test_roles_link_only_through_optional_autorefs() -> None:
    convert = _converter().rst_to_markdown
    md = convert(":func:`chain` and :class:`Other`", resolve=lambda t: "gradstep.chain" if t == "chain" else None)
    assert '<autoref identifier="gradstep.chain" optional><code>chain()</code></autoref>' in md
    assert "<code>Other</code>" in md and 'identifier="Other"' not in md


def test_example_literal_block_becomes_a_google_examples_section() -> None:
    md = _converter().rst_to_markdown("Summary.\n\nExample::\n\n    >>> 1 + 1\n    2\n")
    assert md.endswith("Examples:\n    >>> 1 + 1\n    2")


def test_other_literal_blocks_become_fenced_code() -> None:
    md = _converter().rst_to_markdown("One step::\n\n    g = grad\n    p = p - lr * d\n\nAfter.")
    assert "One step:\n\n```text\ng = grad\np = p - lr * d\n```\n\nAfter." in md


def test_warning_directive_becomes_an_admonition_with_its_body_converted() -> None:
    md = _converter().rst_to_markdown(".. warning::\n    Differences: ``scale_clip`` is :math:`(0, 10)`.\n")
    assert md.startswith("!!! warning\n    Differences: `scale_clip` is $(0, 10)$.")


def test_simple_table_becomes_a_markdown_table_with_continuation_rows() -> None:
    text = "\n".join(
        [
            "=====  ===========",
            "name   meaning",
            "=====  ===========",
            "``a``  first line",
            "       goes on",
            "b      x|y",
            "=====  ===========",
        ]
    )
    md = _converter().rst_to_markdown(text)
    assert md.split("\n") == ["| name | meaning |", "|---|---|", "| `a` | first line goes on |", "| b | x\\|y |"]


def test_list_items_are_indented_for_python_markdown_and_html_looking_text_is_escaped() -> None:
    md = _converter().rst_to_markdown("* item\n  more\n\n  .. math::\n      x\n\nnot a <tag> here")
    assert md.split("\n")[:2] == ["* item", "    more"]
    assert "    $$\n    x\n    $$" in md
    assert "&lt;tag>" in md
