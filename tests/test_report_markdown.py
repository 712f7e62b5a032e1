"""The reports' Markdown (issue 25): text is escaped only where Markdown would read it as markup, and every
string renders as itself, checked with an independent CommonMark renderer (markdown-it-py, GitHub's tables
and strikethrough on)."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from markdown_it import MarkdownIt

from napo.analysis.report import code_span, escape_markdown, markdown_table

RENDERER = MarkdownIt("commonmark").enable(["table", "strikethrough"])

PLAIN = [
    "dpo-run",
    "greedy, 1 beam(s), max 32 new tokens",
    "shapes (built-in)",
    "logp_margin",
    "a < b and c > d",
    "x & y",
    "50% of #3 + 4 = 7!",
    r"C:\path\to",
    "colour acc. ↑",
]

HOSTILE = [
    "![x](http://attacker.example/p.png) <img src=x onerror=alert(1)> | *b* `c`",
    "[link](http://example.com) [ref] [^1]",
    "**bold** __bold__ _it_ *it* ~~strike~~ ~one~",
    "<http://example.com> <b>tag</b> <!-- comment --> <?php ?>",
    "&amp; &#65; &#x41; &copy;",
    r"\*not emphasis\* \\ \` \[",
    "_leading and trailing_ snake_case_ a__b",
    "``double`` ```triple```",
    "$x + y$ costs $5",
    "line one\nline two\r\n\tthree\x00four",
]

LINE_STARTS = ["# heading", "## two", "- item", "+ item", "* item", "1. item", "12) item", "> quote", "= setext",
               "| a | b |", "    indented code", "***", "---", "___", "  - indented item"]  # fmt: skip


def _expected(text: str) -> str:
    """The text as one line, as a renderer shows it: a run of line breaks and control characters is a space."""
    return re.sub(r"[\r\n\t\x00]+", " ", text).strip()


def _inline_of_paragraph(markdown: str):
    tokens = RENDERER.parse(markdown)
    assert [t.type for t in tokens] == ["paragraph_open", "inline", "paragraph_close"], (markdown, tokens)
    return tokens[1].children


@pytest.mark.parametrize("text", PLAIN)
def test_text_that_needs_no_escaping_is_left_as_it_is(text):
    assert escape_markdown(text) == text
    assert markdown_table(pd.DataFrame({"model": [text]})).splitlines()[2] == f"| {text} |"


@pytest.mark.parametrize("text", PLAIN + HOSTILE)
def test_escaped_text_renders_as_itself_in_a_paragraph(text):
    children = _inline_of_paragraph(escape_markdown(text))
    assert {child.type for child in children} <= {"text"}, children  # no link, image, HTML, emphasis, code
    assert "".join(child.content for child in children) == _expected(text)


@pytest.mark.parametrize("text", LINE_STARTS + PLAIN)
def test_a_line_of_its_own_opens_no_block(text):
    children = _inline_of_paragraph(escape_markdown(text, line_start=True))
    assert {child.type for child in children} <= {"text"}, children
    assert "".join(child.content for child in children) == text.strip()


@pytest.mark.parametrize("text", PLAIN + HOSTILE)
def test_escaped_text_renders_as_itself_in_a_table_cell(text):
    frame = pd.DataFrame({text: [text, 1, 0.5]})
    tokens = RENDERER.parse(markdown_table(frame))
    cells = [t for t in tokens if t.type == "inline"]
    assert len(cells) == 4  # the header and three rows: nothing split a cell or ended the table
    for cell in cells[:2]:
        assert {child.type for child in cell.children} <= {"text"}, cell.children
        assert "".join(child.content for child in cell.children) == _expected(text)
    assert [cell.content for cell in cells[2:]] == ["1", "0.5"]


@pytest.mark.parametrize("text", ["metrics.json", "items-<model>.csv", "a|b", "`quoted`", " padded ", "x `` y", "*_[<"])
def test_a_code_span_shows_its_text_verbatim_in_a_paragraph_and_a_table(text):
    children = _inline_of_paragraph(f"Files: {code_span(text)}.")
    assert [child.type for child in children] == ["text", "code_inline", "text"], children
    assert children[1].content == text
    tokens = RENDERER.parse(markdown_table(pd.DataFrame({"metric": [text]}), code=("metric",)))
    cell = [t for t in tokens if t.type == "inline"][1]
    assert [(child.type, child.content) for child in cell.children] == [("code_inline", text)]
