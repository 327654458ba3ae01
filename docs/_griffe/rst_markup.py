"""Render gradstep's reST-flavoured docstrings as Markdown for mkdocstrings (a griffe extension).

gradstep's docstrings are Google-style sections (``Args:``, ``Attributes:``) written with reST markup: ``.. math::``
blocks, ``:math:`` and ``:class:`` roles, ``.. warning::`` directives, ``Example::`` literal blocks and simple
tables. mkdocstrings parses the sections but renders the text as Markdown, where that markup would show as is.
This extension rewrites each docstring once the object tree is loaded, without touching the source:

* ``.. math::`` blocks become ``$$ ... $$`` and ``:math:`x``` becomes ``$x$`` (pymdownx.arithmatex, MathJax);
* ``:class:``/``:func:``/... roles become inline code wrapped in an *optional* autoref: a link where the target is
  documented on the site, plain code elsewhere (never a broken-link warning);
* ``.. warning::``/``.. note::`` become admonitions; ``X::`` literal blocks become fenced code blocks, and
  ``Example::`` becomes a Google ``Examples:`` section (mkdocstrings renders its ``>>>`` lines as code);
* reST simple tables (``=====  =====``) become Markdown tables; double-backtick literals become single-backtick code.

The conversion is a plain function, :func:`rst_to_markdown`, so the tests can check it without mkdocs.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from typing import Any

Resolver = Callable[[str], "str | None"]

_ADMONITIONS = ("warning", "note", "seealso", "important", "tip", "caution", "danger", "attention", "hint")
_DIRECTIVE = re.compile(r"^\.\. (?P<name>[a-z]+)::\s*(?P<rest>.*)$")
_TABLE_BORDER = re.compile(r"^=+( +=+)+ *$")
_INLINE = re.compile(
    r":(?P<role>[a-z]+):`(?P<role_body>[^`]+)`"  # :math:`x`, :class:`~a.b.C`
    r"|``(?P<literal>.+?)``"  # ``code``
    r"|`(?P<code>[^`]+)`",  # `interpreted text`: code in Markdown too
    re.DOTALL,
)
_CODE_ROLES = {"class", "func", "meth", "mod", "attr", "data", "obj", "exc", "const", "ref"}


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _block(lines: list[str], start: int, base: int) -> tuple[list[str], int]:
    """The lines from ``start`` that are blank or indented deeper than ``base``; returns them and the next index."""
    end = start
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > base):
        end += 1
    while end > start and not lines[end - 1].strip():
        end -= 1  # trailing blank lines belong to what follows
    return lines[start:end], end


def _dedent(lines: list[str]) -> list[str]:
    depth = min((_indent(line) for line in lines if line.strip()), default=0)
    return [line[depth:] if line.strip() else "" for line in lines]


def _escape_text(text: str) -> str:
    # "<name" outside code reads as an HTML tag in Markdown and disappears from the page.
    return re.sub(r"<(?=[A-Za-z/!])", "&lt;", text)


def _role(role: str, body: str, resolve: Resolver | None) -> str:
    body = " ".join(body.split())
    if role == "math":
        return f"${body.strip()}$"
    title_target = re.match(r"^(?P<title>.+?)\s*<(?P<target>[^>]+)>$", body)
    if title_target:
        title, target = title_target["title"], title_target["target"]
    else:
        target = body.lstrip("~")
        title = target.rsplit(".", 1)[-1] if body.startswith("~") else target
    if role in ("func", "meth") and not title.endswith(")"):
        title += "()"
    code = f"<code>{html.escape(title)}</code>"
    identifier = resolve(target) if resolve is not None and role in _CODE_ROLES else None
    if identifier is None:
        return code
    # An optional autoref links where the target is documented and stays plain code elsewhere, without a warning.
    return f'<autoref identifier="{html.escape(identifier)}" optional>{code}</autoref>'


def convert_inline(text: str, resolve: Resolver | None = None) -> str:
    """Roles, literals and HTML-looking text of a run of prose (may span lines)."""
    out: list[str] = []
    pos = 0
    for match in _INLINE.finditer(text):
        out.append(_escape_text(text[pos : match.start()]))
        if match["role"] is not None:
            out.append(_role(match["role"], match["role_body"], resolve))
        else:
            code = match["literal"] if match["literal"] is not None else match["code"]
            code = " ".join(code.split("\n"))
            fence = "``" if "`" in code else "`"
            pad = " " if code.startswith("`") or code.endswith("`") else ""
            out.append(f"{fence}{pad}{code}{pad}{fence}")
        pos = match.end()
    out.append(_escape_text(text[pos:]))
    return "".join(out)


def _table(lines: list[str], start: int, resolve: Resolver | None) -> tuple[list[str], int] | None:
    """A reST simple table starting at ``start`` as Markdown table lines, and the index after it."""
    border = lines[start]
    base = _indent(border)
    spans = [(m.start(), m.end()) for m in re.finditer(r"=+", border)]
    borders = [start]
    i = start + 1
    while i < len(lines) and lines[i].strip() and len(borders) < 3:
        if _TABLE_BORDER.match(lines[i].strip()) and _indent(lines[i]) == base:
            borders.append(i)
        i += 1
    if len(borders) == 2:  # no header: top and bottom borders only
        header_rows: list[list[str]] = []
        body_lines = lines[borders[0] + 1 : borders[1]]
    elif len(borders) == 3:
        header_rows = [_cells(line, spans) for line in lines[borders[0] + 1 : borders[1]]]
        body_lines = lines[borders[1] + 1 : borders[2]]
    else:
        return None
    rows: list[list[str]] = []
    for line in body_lines:
        cells = _cells(line, spans)
        if rows and not cells[0]:  # a blank first column continues the row above
            rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells)]
        else:
            rows.append(cells)
    header = [" ".join(col).strip() for col in zip(*header_rows)] if header_rows else [""] * len(spans)
    pad = " " * base

    def row(cells: list[str]) -> str:
        return pad + "| " + " | ".join(convert_inline(c, resolve).replace("|", "\\|") for c in cells) + " |"

    md = [row(header), pad + "|" + "---|" * len(spans)] + [row(r) for r in rows]
    return md, borders[-1] + 1


def _cells(line: str, spans: list[tuple[int, int]]) -> list[str]:
    cells = []
    for k, (lo, _hi) in enumerate(spans):
        hi = spans[k + 1][0] if k + 1 < len(spans) else len(line)
        cells.append(line[lo:hi].strip())
    return cells


_BULLET = re.compile(r"^(?P<marker>[*+-] |\d+\. )")


def _list_indents(lines: list[str]) -> list[str]:
    """Indent the body of each list item by 4 spaces past its marker, as Python-Markdown needs (reST: the marker's
    width), so that maths, code and nested lists stay inside the item."""
    out = list(lines)
    i = 0
    while i < len(out):
        bullet = _BULLET.match(out[i].lstrip(" "))
        if not bullet:
            i += 1
            continue
        base = _indent(out[i])
        width = len(bullet["marker"])
        shift = 4 - width
        j = i + 1
        while j < len(out):
            line = out[j]
            if line.strip() and _indent(line) < base + width:
                break
            if not line.strip():
                # A blank line ends the item unless the item goes on after it.
                k = j
                while k < len(out) and not out[k].strip():
                    k += 1
                if k == len(out) or _indent(out[k]) < base + width:
                    break
            elif shift > 0:
                out[j] = " " * shift + line
            j += 1
        i += 1
    return out


def rst_to_markdown(text: str, resolve: Resolver | None = None) -> str:
    """Convert one docstring (already dedented) from gradstep's reST markup to Markdown.

    ``resolve(target)`` turns a role's target (``TrustRatio``, ``~gradstep.core.ops.FOREACH``) into the full
    identifier of an object that may have a page, or ``None``.
    """
    lines = _list_indents(text.split("\n"))
    out: list[str] = []
    prose: list[str] = []

    def flush() -> None:
        if prose:
            out.extend(convert_inline("\n".join(prose), resolve).split("\n"))
            prose.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        pad = " " * _indent(line)
        directive = _DIRECTIVE.match(stripped)
        if directive and directive["name"] == "math":
            flush()
            body, i = _block(lines, i + 1, _indent(line))
            math = ([directive["rest"]] if directive["rest"] else []) + _dedent(body)
            math = [m for m in math if m.strip()]
            out.extend(["", pad + "$$", *(pad + m for m in math), pad + "$$", ""])
            continue
        if directive and directive["name"] in _ADMONITIONS:
            flush()
            body, i = _block(lines, i + 1, _indent(line))
            kind = "info" if directive["name"] == "seealso" else directive["name"]
            title = f' "{directive["rest"]}"' if directive["rest"] else ""
            inner = rst_to_markdown("\n".join(_dedent(body)), resolve).split("\n")
            out.extend(["", f"{pad}!!! {kind}{title}", *((pad + "    " + b) if b.strip() else "" for b in inner), ""])
            continue
        if _TABLE_BORDER.match(stripped):
            table = _table(lines, i, resolve)
            if table is not None:
                flush()
                md, i = table
                out.extend(["", *md, ""])
                continue
        if stripped.endswith("::") and not stripped.startswith(".."):
            nxt = i + 1
            while nxt < len(lines) and not lines[nxt].strip():
                nxt += 1
            if nxt < len(lines) and _indent(lines[nxt]) > _indent(line):
                body, end = _block(lines, nxt, _indent(line))
                lead = stripped[:-2].rstrip()
                if lead in ("Example", "Examples"):
                    # A Google "Examples:" section: mkdocstrings renders its >>> lines as Python code.
                    flush()
                    # (no blank line after the title: griffe would not see a section then)
                    out.extend([pad + "Examples:", *body])
                    i = end
                    continue
                if lead:
                    prose.append(pad + lead + ("" if stripped.endswith(" ::") else ":"))
                flush()
                code = _dedent(body)
                language = "pycon" if code and code[0].startswith(">>>") else "text"
                out.extend(["", pad + "```" + language, *(pad + c if c else "" for c in code), pad + "```", ""])
                i = end
                continue
        if not stripped:
            flush()
            out.append("")
        else:
            prose.append(line)
        i += 1
    flush()
    # Collapse the runs of blank lines the blocks above may leave.
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip("\n")


try:  # the extension class needs griffe (installed with mkdocstrings); the converter above does not
    from griffe import Extension
except ImportError:  # pragma: no cover - only the tests import this module without the docs extra
    Extension = object  # type: ignore[assignment,misc]


class RstToMarkdown(Extension):  # type: ignore[misc,valid-type]
    """griffe extension: rewrite every docstring of the loaded packages with :func:`rst_to_markdown`."""

    def on_object(self, *, obj: Any, loader: Any = None, **kwargs: Any) -> None:
        docstring = getattr(obj, "docstring", None)
        if docstring is None or getattr(obj, "is_alias", False):
            return
        docstring.value = rst_to_markdown(docstring.value, _resolver(obj))


def _resolver(obj: Any) -> Resolver:
    """Resolve a role's target the way Sphinx would: absolute, else in the class, the module, then the package."""
    scopes = []
    if obj.is_class:
        scopes.append(obj)
    if obj.parent is not None and obj.parent.is_class:
        scopes.append(obj.parent)
    module = obj if obj.is_module else obj.module
    scopes.append(module)
    if module.parent is not None:
        scopes.append(module.parent)

    def resolve(target: str) -> str | None:
        if target.startswith("gradstep.") or target == "gradstep":
            return target
        for scope in scopes:
            try:
                member = scope[target]
            except Exception:  # griffe raises KeyError, or AliasResolutionError for an external alias
                continue
            try:
                return str(member.canonical_path if getattr(member, "is_alias", False) else member.path)
            except Exception:
                return f"{scope.path}.{target}"
        return None

    return resolve
