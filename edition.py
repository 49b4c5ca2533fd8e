"""The reader's edition: each paper file as a page of notes beside code, generated from the source.

    python edition.py                  # writes edition/ (ignored by git): index, one page a file
    python edition.py --out DIR        # the same pages anywhere else

A page is one table read top to bottom, one row per definition or comment block. On the left: the
module, class and function docstrings and the full-line comments, shown exactly as written (a
monospace block that keeps every space, since they hold unicode maths and aligned tables); on the
right: the code they introduce, highlighted by pygments. Every line of the file is on the page
once, in order: docstring lines on the left without their quotes, comment lines on the left
without their `#`, all other lines on the right. Below the table: the paper note's "Equation ->
function -> test" table, each test linked to its file.

Citation tags link into the paper: `[CoCa §3.1, Eq. 2]` opens the versioned arXiv PDF at the page
of Eq. 2. PAPERS holds each paper's arXiv id and version (the one its module docstring cites) and
the page of every section, equation, table, figure, footnote and appendix the code cites; a tag
that PAPERS lacks is a problem (`citation_problems`, tested), not a silent link to page one.

The pages cover the four paper files and the shared modules they build their models from (those
imported above the fence line). Files are read as text (tokenize, ast), never imported: building
needs the standard library and pygments only, and takes about a second.
"""

import argparse
import ast
import fnmatch
import html
import io
import os
import re
import sys
import time
import tokenize
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

try:  # a dependency of this page generator only (it comes with pytest's requirements)
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import PythonLexer
except ImportError:
    raise SystemExit("error: edition.py highlights code with pygments: pip install pygments") \
        from None

ROOT = Path(__file__).resolve().parent
PAPER_FILES = ["coca.py", "virtex.py", "uniter.py", "oscar.py"]  # the order of the index

# --- The papers: arXiv versions and the pages of what the code cites ----------------------------
#
# Pages are 1-based PDF pages of the cited version (`#page=n` in a PDF viewer). Where the PDF was
# not at hand the page is None: the link opens the PDF at its first page, and the key stays, so
# that a tag the map does not know is still told apart from one whose page is unknown.
# A section links to the page where it starts; a named paragraph (`§4, VQA`, `§3.2 "Attentional
# Poolers"`) to the page where that paragraph starts; sub-tables (`Table 8b`) to their table.

PAPERS = {
    "coca": dict(
        name="CoCa", arxiv="2205.01917", version=2,  # TMLR 2022 = v2 (14 Jun 2022)
        pages={
            "§3.1": 3, "§3.2": 4, "§3.3": 6,
            "§3.2 Decoupled Text Decoder": 5, "§3.2 Attentional Poolers": 5,
            "§3.2 Pretraining Efficiency": 5,
            "§4.1": 6, "§4.2": 7, "§4.2.1": 8, "§4.2.2": 8,
            "§4.2.2 Zero-Shot Image Classification": 9, "§4.2.3": 10, "§4.3": 11,
            "Eq. 2": 4, "Eq. 3": 4, "Eq. 4": 5,
            "Fig. 2": 4,
            "Table 1": 5, "Table 2": 7, "Table 3": 9, "Table 4": 9, "Table 7": 11, "Table 8": 12,
            "Table 9": 18,
            "App. B": 18,
        }),
    "virtex": dict(
        name="VirTex", arxiv="2006.06666", version=3,  # CVPR 2021 = v3
        # Cited by part name, not number (virtex.py's docstring lists the parts); the pages of
        # v3 are not established here, so every link opens the PDF at its first page.
        pages={
            "§Method": None, "§Method: visual backbone": None, "§Method: textual head": None,
            "§Method: bicaptioning": None, "§Implementation": None,
            "§Ablations: pretraining tasks": None, "§Downstream": None,
            "§Downstream: linear probe": None, "§Captioning": None,
        }),
    "uniter": dict(
        name="UNITER", arxiv="1909.11740", version=3,  # ECCV 2020 with the appendix = v3
        pages={
            "§3.1": 4, "§3.2": 5, "§4": 8, "§4.1": 8, "§4.2": 10, "§A.2": 19, "§A.7": 25,
            "Eq. 1": 5, "Eq. 2": 6, "Eq. 3": 6, "Eq. 4": 7, "Eq. 5": 25, "Eq. 6": 25,
            "Fig. 1": 2, "Table 2": 9, "Table 3": 12,
            "fn. 3": 4, "fn. 5": 5, "fn. 7": 5, "fn. 12": 8,
            "Alg. 1": 26,
        }),
    "oscar": dict(
        name="Oscar", arxiv="2004.06165", version=5,  # the ECCV 2020 version: v5 (26 Jul 2020)
        pages={
            "§3": 3, "§3 Input": 4, "§3 Discussion": 6, "§3 Implementation Details": 6,
            "§4": 7, "§4 Image-Text Retrieval": 7, "§4 Image Captioning": 7, "§4 VQA": 8,
            "§5.1": 8, "§5.3": 11,
            "Eq. 1": 5, "Eq. 2": 5, "Eq. 3": 6, "Eq. 4": 6,
            "Fig. 3": 4, "Table 1": 9, "Table 2": 10,
            "App. A": 18,
        }),
}
NAMES = {paper["name"]: key for key, paper in PAPERS.items()}  # "CoCa" -> "coca"


def pdf_url(paper: str, page: int | None) -> str:
    """The versioned arXiv PDF of `paper` (a PAPERS key), opened at `page` when it is known."""
    entry = PAPERS[paper]
    url = f"https://arxiv.org/pdf/{entry['arxiv']}v{entry['version']}"
    return url if page is None else f"{url}#page={page}"


# --- Citations: finding the tags and what each one points at ------------------------------------
#
# A tag is a bracket that opens with a paper's name or a section sign: `[CoCa §3.1, Eq. 2]`,
# `[UNITER §3.2, Eq. 3; §A.7, Eq. 6, Algorithm 1; code]`, `[VirTex §Method: bicaptioning]`, and in
# a paper file `[§4.1]` for its own paper. Its parts (split at `;`) are read only when they open
# with a paper name or a locator, so `code ...`, `Rennie et al. 2017` or `BERT §3.1` inside a tag
# link nowhere. A part may switch paper (`[UNITER §3.1, Oscar §3]`).

_PAPER = "|".join(re.escape(name) for name in NAMES)
TAG = re.compile(rf"\[(?=(?:{_PAPER})\b|§)([^\[\]]*)(?:\]|$)")
LOCATOR = re.compile(
    rf"(?P<paper>\b(?:{_PAPER})\b)"
    r"|(?P<section>§(?:[A-Z]\.\d+|\d+(?:\.\d+)*|[A-Z][a-z]+(?::\s+[a-z]+(?:\s+[a-z]+)*)?))"
    r"|(?P<eq>\bEqs?\.\s?\d+(?:\s?[-–]\s?\d+)?)"
    r"|(?P<table>\bTables?\s\d+[a-z]?(?:\([a-z]\))?(?:,\s\d+[a-z]?)*)"
    r"|(?P<fig>\bFigs?\.\s?\d+[a-z]?(?:\([a-z]\))?)"
    r"|(?P<app>\b(?:App\.|Appendix)\s[A-Z]\b)"
    r"|(?P<fn>\bfn\.\s?\d+)"
    r"|(?P<alg>\b(?:Alg\.|Algorithm)\s\d+)")
# A named paragraph right after a section: `§3.2 "Attentional Poolers"`, `§4, VQA` or `§3 Input`
# (capitalised words up to the end of the part); `§3.1, Eq. 2`, `§4.2.2, after CLIP`, `§3: R = 4`
# and `§4 captioning inference` are not.
PARAGRAPH = re.compile(r'\s"(?P<quoted>[^"\n]+)"'
                       r"|(?:,\s+|\s)(?P<named>[A-Z][\w-]*(?:\s[A-Z][\w-]*)*)(?=\s*$)")


@dataclass
class Citation:
    """One linked piece of a tag: text[start:end] cites `key` of `paper`."""
    start: int
    end: int
    paper: str
    key: str


def _keys(kind: str, text: str) -> list[tuple[int, int, str]]:
    """The map keys of one locator match, as (start, end, key) relative to the match: `Eqs. 2-4`
    -> Eq. 2 (its first); `Table 8b` -> Table 8; `Tables 2, 4` -> Table 2 and Table 4 (two
    links); `Appendix B` -> App. B; `Algorithm 1` -> Alg. 1; white space collapsed."""
    flat = " ".join(text.split())
    if kind == "section":
        return [(0, len(text), flat)]
    if kind == "app":
        return [(0, len(text), "App. " + flat.split()[-1])]
    numbers = list(re.finditer(r"(\d+)[a-z]?(?:\([a-z]\))?", text))
    if kind == "table":
        return [(m.start() if i else 0, m.end(), "Table " + m.group(1))
                for i, m in enumerate(numbers)]
    label = {"eq": "Eq.", "fig": "Fig.", "fn": "fn.", "alg": "Alg."}[kind]
    return [(0, len(text), f"{label} {numbers[0].group(1)}")]


def citations(text: str, default: str | None = None) -> list[Citation]:
    """Every linked piece of every tag in `text`, in order. `default`: the paper a tag without a
    paper name cites (the paper file's own), None where such tags link nowhere (shared/)."""
    return [c for tag in TAG.finditer(text) for c in locators(tag.group(1), default, tag.start(1))]


def locators(content: str, paper: str | None, offset: int = 0) -> list[Citation]:
    """The linked pieces of a tag's content (what is between the brackets), or of a cell that
    holds only locators (the paper column of a note's table), positions shifted by `offset`."""
    found = []
    for part in re.split(r"(;)", content):
        start = offset
        offset += len(part)
        if part == ";":
            continue
        lead = len(part) - len(part.lstrip())
        if not LOCATOR.match(part, lead):
            continue  # `code ...`, another work: not a citation of a paper here
        name_start = None
        for match in LOCATOR.finditer(part, lead):
            kind = match.lastgroup
            if kind == "paper":
                paper, name_start = NAMES[match.group(0)], match.start()
                continue
            if paper is None:
                continue
            pieces = _keys(kind, match.group(0))
            if kind == "section":
                paragraph = PARAGRAPH.match(part, match.end())
                if paragraph and paragraph.group("named") and LOCATOR.match(
                        part, paragraph.start("named")):
                    paragraph = None  # `§4.2.3, Appendix B`: a second locator, not a name
                if paragraph:
                    name = paragraph.group("quoted") or paragraph.group("named")
                    key = f"{pieces[0][2]} {' '.join(name.split())}"
                    pieces = [(0, paragraph.end() - match.start(), key)]
            for i, (a, b, key) in enumerate(pieces):
                a += match.start()
                if i == 0 and name_start is not None:
                    a = name_start  # "CoCa §3.1" is one link: the name reads as part of it
                found.append(Citation(start + a, start + match.start() + b, paper, key))
                name_start = None
    return found


def cite_href(citation: Citation) -> str:
    """The link of a citation: the PDF at the key's page (no page when unknown or missing)."""
    return pdf_url(citation.paper, PAPERS[citation.paper]["pages"].get(citation.key))


def citation_problems(text: str, default: str | None = None) -> list[str]:
    """The citations in `text` whose key PAPERS lacks, as "Paper key" strings."""
    return [f"{PAPERS[c.paper]['name']} {c.key}" for c in citations(text, default)
            if c.key not in PAPERS[c.paper]["pages"]]


def linked(text: str, default: str | None, found: list[Citation] | None = None) -> str:
    """`text` as HTML, each citation piece (`found`, by default the tags' pieces) an <a> to its
    page; data-paper and data-cite name the map entry, so a test can check the address."""
    out, at = [], 0
    for c in citations(text, default) if found is None else found:
        out.append(html.escape(text[at:c.start], quote=False))
        piece = html.escape(text[c.start:c.end], quote=False)
        out.append(f'<a class="cite" href="{html.escape(cite_href(c))}" data-paper="{c.paper}" '
                   f'data-cite="{html.escape(c.key)}">{piece}</a>')
        at = c.end
    out.append(html.escape(text[at:], quote=False))
    return "".join(out)


# --- Reading a file: which lines are notes, which are code, and the rows ------------------------

@dataclass
class Block:
    """Consecutive lines shown as one note: a docstring ("doc") or a comment block ("comment")."""
    kind: str
    lines: list[int] = field(default_factory=list)
    anchor: str | None = None  # a section comment's id ("section-3", "fence")


@dataclass
class Row:
    """One row of the page: notes on the left, the code lines they introduce on the right."""
    notes: list[Block] = field(default_factory=list)
    code: list[int] = field(default_factory=list)
    anchor: str | None = None  # the qualified name of the definition whose docstring is here

    def has_code(self, lines: list[str]) -> bool:
        return any(lines[i - 1].strip() for i in self.code)


SECTION = re.compile(r"#\s*---\s*(\d+)\.")  # "# --- 4. Objectives -----"
FENCE = re.compile(r"#\s*=====")  # "# ===== below: train.py's contract, not in the paper ====="


def definitions(tree: ast.Module) -> list[tuple[str, ast.AST]]:
    """(qualified name, node) of the module's classes and functions and of the methods and nested
    classes of its classes, in source order ("CoCa", "CoCa.forward", "contrastive_loss")."""
    found = []

    def visit(body, prefix):
        for node in body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((prefix + node.name, node))
                if isinstance(node, ast.ClassDef):
                    visit(node.body, f"{prefix}{node.name}.")
    visit(tree.body, "")
    return found


def read_rows(text: str) -> tuple[list[str], list[Row]]:
    """Split a Python source into rows. A line is a note when it belongs to a docstring (module,
    class, function; one that fills its lines) or is a full-line comment at bracket depth 0 that
    does not continue the trailing comment of the line above (`x = 1  # a long comment` then
    `#   its second line` keeps to the code it annotates). A comment inside brackets stays in the
    code too: a row never splits an expression. A row starts at each comment block and at the
    first line (decorator or `def`) of each definition with a docstring, unless the row so far
    holds notes and blank lines only: then the two share it, the comment above a definition
    beside its docstring."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line opens no line
    kind = {i: "code" for i in range(1, len(lines) + 1)}
    code, comments, depth = set(), {}, 0
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.OP and tok.string in {"(", "[", "{"}:
            depth += 1
        elif tok.type == tokenize.OP and tok.string in {")", "]", "}"}:
            depth -= 1
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = depth
        elif tok.type not in {tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER}:
            code.update(range(tok.start[0], tok.end[0] + 1))

    tree = ast.parse(text)
    starts, docs, anchors = set(), {}, {}
    owners = [("", tree)] + definitions(tree)
    for name, node in owners:
        doc = node.body[0] if node.body else None
        if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                and isinstance(doc.value.value, str)):
            continue
        before = lines[doc.lineno - 1].encode()[:doc.col_offset]
        after = lines[doc.end_lineno - 1].encode()[doc.end_col_offset:]
        if before.strip() or after.strip():
            continue  # shares its lines with code: shown as code
        header = doc.lineno if node is tree else min(
            [d.lineno for d in node.decorator_list] + [node.lineno])
        starts.add(header)
        anchors[header] = name or None
        for i in range(doc.lineno, doc.end_lineno + 1):
            kind[i], docs[i] = "doc", doc.lineno

    continuing = set()  # comment lines that carry on the trailing comment above them
    for i in sorted(comments):
        if i in code or kind[i] == "doc":
            continue
        above = i - 1
        carries_on = (above in continuing or (above in code and above in comments)) \
            and re.match(r"\s*#\s{2,}\S", lines[i - 1])
        if comments[i] > 0 or carries_on:
            if carries_on:
                continuing.add(i)
            continue
        kind[i] = "comment"
        if kind.get(above) != "comment":
            starts.add(i)

    rows, row = [], None
    for i in range(1, len(lines) + 1):
        if i in starts and (row is None or row.has_code(lines)):
            row = None
        if row is None:
            row = Row()
            rows.append(row)
        if i in anchors and anchors[i] and row.anchor is None:
            row.anchor = anchors[i]
        if kind[i] == "code":
            row.code.append(i)
            continue
        previous = row.notes[-1] if row.notes else None
        same = previous is not None and previous.kind == kind[i] and previous.lines[-1] == i - 1 \
            and (kind[i] == "comment" or docs[previous.lines[0]] == docs[i])
        if not same:
            previous = Block(kind[i])
            row.notes.append(previous)
            first = lines[i - 1].strip()
            if kind[i] == "comment" and SECTION.match(first):
                previous.anchor = f"section-{SECTION.match(first).group(1)}"
            elif kind[i] == "comment" and FENCE.match(first):
                previous.anchor = "fence"
        previous.lines.append(i)
    return lines, rows


def note_text(block: Block, lines: list[str]) -> str:
    """What the left column shows of a block: a docstring without its quotes, a comment block
    without its `#` and one space after it; the block's common indentation removed, every other
    space kept; blank first and last lines dropped."""
    raw = [lines[i - 1] for i in block.lines]
    if block.kind == "doc":
        raw[0] = re.sub(r'^\s*[rRuU]?("""|\'\'\')', "", raw[0])
        raw[-1] = re.sub(r'("""|\'\'\')\s*$', "", raw[-1])
        body = raw[1:]
        indent = min((len(s) - len(s.lstrip()) for s in body if s.strip()), default=0)
        shown = [raw[0].strip()] + [s[indent:].rstrip() for s in body]
    else:
        shown = [re.sub(r"^\s*# ?", "", s).rstrip() for s in raw]
    while shown and not shown[0].strip():
        shown.pop(0)
    while shown and not shown[-1].strip():
        shown.pop()
    return "\n".join(shown)


# --- The page ------------------------------------------------------------------------------------

FORMATTER = HtmlFormatter(nowrap=True, style="default")
LEXER = PythonLexer()
COMMENT_SPAN = re.compile(r'(<span class="c1">)(.*?)(</span>)', re.DOTALL)
MODULE_SPAN = re.compile(r'<span class="nn">(shared\.\w+)</span>')


def code_html(lines: list[str], numbers: list[int], default: str | None, pages: dict) -> str:
    """The highlighted code of a row, blank lines at either end dropped; the citations in its
    trailing comments linked; an imported shared module linked to its page when it has one."""
    while numbers and not lines[numbers[0] - 1].strip():
        numbers = numbers[1:]
    while numbers and not lines[numbers[-1] - 1].strip():
        numbers = numbers[:-1]
    if not numbers:
        return ""
    out = highlight("\n".join(lines[i - 1] for i in numbers), LEXER, FORMATTER).rstrip("\n")
    out = COMMENT_SPAN.sub(lambda m: m.group(1) + linked(html.unescape(m.group(2)), default)
                           + m.group(3), out)
    return MODULE_SPAN.sub(lambda m: f'<a class="module" href="{pages[m.group(1)]}">'
                           f'<span class="nn">{m.group(1)}</span></a>' if m.group(1) in pages
                           else m.group(0), out)


def markdown_table(text: str, heading: re.Pattern) -> list[list[str]]:
    """The first table after the first heading line that matches `heading`: its header and rows,
    cells stripped and `\\|` unescaped; [] when there is none."""
    lines, at = text.split("\n"), None
    for i, line in enumerate(lines):
        if line.startswith("#") and heading.search(line):
            at = i
            break
    if at is None:
        return []
    table = []
    for line in lines[at + 1:]:
        if line.startswith("|"):
            cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
            if not all(re.fullmatch(r"\s*:?-+:?\s*", c) for c in cells):
                table.append([c.strip().replace("\\|", "|") for c in cells])
        elif table:
            break
    return table


def inline_markdown(text: str) -> str:
    """A table cell's `code` and **bold** as HTML, everything else escaped."""
    out = []
    for i, piece in enumerate(re.split(r"(`[^`]*`)", text)):
        if i % 2:
            out.append(f"<code>{html.escape(piece[1:-1])}</code>")
        else:
            out.append(re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(piece)))
    return "".join(out)


def tests_by_name() -> dict[str, str]:
    """Every test function of tests/, by name, with the file that defines it (read as text)."""
    found = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for name in re.findall(r"^\s*def (test_\w+)", path.read_text(), re.MULTILINE):
            found.setdefault(name, f"tests/{path.name}")
    return found


@dataclass
class Source:
    """A file the edition renders: its path in the project, its page in the output folder, the
    paper it belongs to (None for shared/), and the note whose table lists its tests."""
    path: str
    page: str
    paper: str | None
    note: str
    note_heading: re.Pattern
    note_rows: Callable[[list], list] | None = None  # picks the table's rows about this file


def sources() -> list[Source]:
    """The four paper files, then the shared modules any of them imports above its fence line
    (the model's building blocks), by name."""
    found, shared = [], set()
    for name in PAPER_FILES:
        text = (ROOT / name).read_text()
        above = FENCE.split(text, maxsplit=1)[0] if FENCE.search(text) else text
        shared |= set(re.findall(r"^\s*from\s+shared\.(\w+)\s+import", above, re.MULTILINE))
        found.append(Source(name, name.replace(".py", ".html"), name[:-3],
                            f"reference/{name[:-3]}.md",
                            re.compile(r"function\s*(→|->)\s*test", re.IGNORECASE)))
    for module in sorted(shared):
        path = f"shared/{module}.py"
        if (ROOT / path).is_file():
            mentions = re.compile(rf"shared[./]{module}\b")  # the README rows about it
            found.append(Source(path, f"shared/{module}.html", None, "reference/README.md",
                                re.compile(r"shared equations"),
                                lambda rows, m=mentions: [r for r in rows
                                                          if m.search(" ".join(r))]))
    return found


CSS = """
* { box-sizing: border-box; }
body { margin: 0; color: #1f2328; background: #fff;
       font: 15px/1.5 "DejaVu Sans", "Segoe UI", Helvetica, Arial, sans-serif; }
a { color: #0b57b0; }
header.top { padding: 14px 24px 10px; border-bottom: 1px solid #d8d4c8; background: #fcfbf7; }
header.top h1 { font-size: 20px; margin: 2px 0 4px; }
header.top p { margin: 2px 0; }
.crumbs, .links { font-size: 14px; color: #57534a; }
nav.toc { margin: 8px 0 2px; font-size: 13px; line-height: 1.5; columns: 2 30em;
          column-gap: 32px; }
nav.toc p { margin: 0 0 3px; break-inside: avoid; padding-left: 1.2em; text-indent: -1.2em; }
nav.toc a { text-decoration: none; margin-right: 0.5em; }
nav.toc a.section { font-weight: bold; }
nav.toc a.def { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12px; }
table.edition { width: 100%; table-layout: fixed; border-collapse: collapse; }
table.edition col.notes, table.edition col.code { width: 50%; }
table.edition td { vertical-align: top; padding: 6px 10px; overflow-x: auto; }
table.edition td.notes { background: #f7f5ef; border-right: 1px solid #e2ddd0; }
table.edition tr + tr td { border-top: 1px solid #eeebe3; }
table.edition tr:target td { background: #fff6d6; }
pre { margin: 0; font-family: "DejaVu Sans Mono", Menlo, Consolas, "Liberation Mono", monospace;
      font-size: clamp(11px, 0.79vw, 14px); line-height: 1.45; white-space: pre-wrap;
      overflow-wrap: anywhere; tab-size: 4; }
pre.doc { color: #1f2328; }
pre.comment { color: #4d4a40; }
pre + pre { margin-top: 0.8em; }
pre.section { font-weight: bold; color: #1f2328; }
pre.fence { font-weight: bold; color: #8a3b12; }
a.cite { text-decoration: none; border-bottom: 1px solid #9db8dc; }
a.cite:hover, a.module:hover { background: #e8f0fb; }
a.module { text-decoration: none; }
div.tested { margin-top: 6px; font-size: 12px; color: #57534a; }
section.tests { padding: 8px 24px 32px; }
section.tests h2 { font-size: 18px; margin: 18px 0 6px; }
table.tests { width: 100%; table-layout: fixed; border-collapse: collapse; font-size: 13px; }
table.tests th, table.tests td { border: 1px solid #e2ddd0; padding: 4px 6px; text-align: left;
                                 vertical-align: top; overflow-wrap: anywhere; }
table.tests th { background: #f7f5ef; }
table.tests tr:target td { background: #fff6d6; }
table.tests code, div.tested code { font-size: 12px; }
p.files { margin: 4px 0 0; font-size: 12px; color: #57534a; }
main.index { max-width: 60em; margin: 0 auto; padding: 8px 24px 40px; }
main.index li { margin: 6px 0; }
"""


def relative(target: Path, page_dir: Path) -> str:
    """A link from a page in `page_dir` to `target`, as a relative URL."""
    return Path(os.path.relpath(target, page_dir)).as_posix()


@dataclass
class NoteTable:
    """The note's "Equation -> function -> test" rows about one file, as HTML cells, with what
    they say of the file's definitions: `rows[n - 1]` is footer row n (id test-row-n); `named`
    maps a qualified name to the rows whose function column names it; `files` maps a row to the
    test files it names (the file's own test file when it names none)."""
    header: list[str]
    rows: list[list[str]]
    named: dict[str, list[int]]
    files: dict[int, list[str]]


def note_table(source: Source, anchors: set[str], tests: dict[str, str], link) -> NoteTable:
    """Read the note's table for `source`. A function named in a row that has a row of its own
    on the page (`anchors`) links to it; a test name (`test_x`, globs as `test_x_*`) links to
    the file that defines it; a file name (`test_losses.py`) to that file. `link(path)` is the
    relative URL of a project file."""
    note = ROOT / source.note
    table = markdown_table(note.read_text(), source.note_heading) if note.is_file() else []
    header, body = (table[0], table[1:]) if table else ([], [])
    if source.note_rows:
        body = source.note_rows(body)
    module = Path(source.path).with_suffix("").as_posix().replace("/", ".") + "."
    own = f"tests/test_{Path(source.path).stem}.py"
    result = NoteTable(header, [], {}, {})
    for n, cells in enumerate(body, 1):
        rendered, files = [], []
        for column, cell in zip(header, cells):
            column, shown = column.lower(), inline_markdown(cell)
            if column == "paper":  # bare locators of this file's paper: `§3.1, Eq. 2`
                shown = linked(cell, source.paper, locators(cell, source.paper))
            for name in re.findall(r"`([^`]+)`", cell) if column != "paper" else []:
                target = None
                if column in {"function", "code"}:
                    bare = re.sub(r"\(.*$", "", name).strip()  # `f(a, b)` -> f
                    bare = bare[len(module):] if bare.startswith(module) else bare
                    if bare in anchors:
                        result.named.setdefault(bare, []).append(n)
                        target = f"#{bare}"
                elif column in {"test", "tests"}:
                    if re.fullmatch(r"(tests/)?test_\w+\.py", name):
                        found = [name if name.startswith("tests/") else f"tests/{name}"]
                    else:
                        found = sorted({f for t, f in tests.items() if fnmatch.fnmatch(t, name)})
                    found = [f for f in found if (ROOT / f).is_file()]
                    files += found
                    target = link(found[0]) if len(found) == 1 else None
                if target:
                    code = f"<code>{html.escape(name)}</code>"
                    shown = shown.replace(code, f'<a href="{html.escape(target)}">{code}</a>', 1)
            if column in {"test", "tests"}:
                files = sorted(set(files)) or ([own] if (ROOT / own).is_file() else [])
                shown += '<p class="files">in ' + ", ".join(
                    f'<a href="{link(f)}">{f}</a>' for f in files) + "</p>"
            rendered.append(shown)
        result.rows.append(rendered)
        result.files[n] = files
    return result


def notes_html(row: Row, lines: list[str], paper: str | None, table: NoteTable, link) -> str:
    """The left cell: each block in its own <pre>, citations linked; under a definition the
    note's table names, its test files and a link to those rows of the table."""
    out = []
    for block in row.notes:
        classes = block.kind + ("" if not block.anchor else
                                " fence" if block.anchor == "fence" else " section")
        anchor = f' id="{block.anchor}"' if block.anchor else ""
        out.append(f'<pre class="{classes}"{anchor}>'
                   f"{linked(note_text(block, lines), paper)}</pre>")
    if row.anchor in table.named:
        numbers = table.named[row.anchor]
        files = sorted({f for n in numbers for f in table.files[n]})
        out.append('<div class="tested">tested: ' + ", ".join(
            f'<a href="{link(f)}">{f}</a>' for f in files) + " · " + ", ".join(
            f'<a href="#test-row-{n}">row {n}</a>' for n in numbers)
            + " of the table below</div>")
    return "".join(out)


def page_html(source: Source, out: Path, pages: dict[str, str], tests: dict[str, str]) -> str:
    """The page of one file. `pages`: shared module -> link from this page, for the imports;
    `tests`: test name -> file (tests_by_name)."""
    page_dir = (out / source.page).parent
    lines, rows = read_rows((ROOT / source.path).read_text())
    paper, own = source.paper, f"tests/test_{Path(source.path).stem}.py"

    def link(path: str) -> str:  # a project file, from this page
        return relative(ROOT / path, page_dir)

    table = note_table(source, {row.anchor for row in rows if row.anchor}, tests, link)
    body = []
    for row in rows:
        code = code_html(lines, row.code, paper, pages)
        anchor = f' id="{html.escape(row.anchor)}"' if row.anchor else ""
        body.append(f'<tr{anchor}><td class="notes">{notes_html(row, lines, paper, table, link)}'
                    f'</td><td class="code">{f"<pre class=code>{code}</pre>" if code else ""}'
                    f"</td></tr>")

    # The header: the module docstring's first line, the links, the contents (each section
    # comment, then the top-level definitions under it).
    title = note_text(rows[0].notes[0], lines).split("\n")[0] if rows[0].notes else source.path
    links = [f'source: <a href="{link(source.path)}">{source.path}</a>']
    if paper:
        entry = PAPERS[paper]
        links.append(f'paper: <a href="{pdf_url(paper, None)}">arXiv {entry["arxiv"]}'
                     f'v{entry["version"]} (PDF)</a>')
    links.append(f'note: <a href="{link(source.note)}">{source.note}</a>')
    if (ROOT / own).is_file():
        links.append(f'tests: <a href="{link(own)}">{own}</a>')
    if table.rows:
        links.append('<a href="#tests">equation → function → test</a>')
    contents = [[]]
    for row in rows:
        for block in row.notes:
            if block.anchor:
                label = note_text(block, lines).split("\n")[0].strip("-= ")
                contents.append([f'<a class="section" href="#{block.anchor}">'
                                 f"{html.escape(label)}</a>"])
        if row.anchor and "." not in row.anchor:
            contents[-1].append(f'<a class="def" href="#{html.escape(row.anchor)}">'
                                f"{html.escape(row.anchor)}</a>")
    contents = "".join(f"<p>{' '.join(line)}</p>" for line in contents if line)

    footer = ""
    if table.rows:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
        cells = "".join(f'<tr id="test-row-{n}">' + "".join(f"<td>{c}</td>" for c in row)
                        + "</tr>" for n, row in enumerate(table.rows, 1))
        footer = (f'<section class="tests" id="tests"><h2>Equation → function → test</h2>'
                  f'<p>From <a href="{link(source.note)}">{source.note}</a>; each test links to '
                  f'the file that holds it.</p><table class="tests"><thead><tr>{head}</tr></thead>'
                  f"<tbody>{cells}</tbody></table></section>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(source.path)}: the reader's edition</title>"
            f"<style>{CSS}{FORMATTER.get_style_defs('pre.code')}"
            f"pre.code {{ background: transparent; }}</style></head><body>"
            f'<header class="top"><p class="crumbs"><a href="'
            f'{relative(out / "index.html", page_dir)}">the reader\'s edition</a>'
            f" · {html.escape(source.path)}</p><h1>{linked(title, paper)}</h1>"
            f'<p class="links">{" · ".join(links)}</p><nav class="toc">{contents}</nav></header>'
            f'<table class="edition"><colgroup><col class="notes"><col class="code"></colgroup>'
            f'<tbody>{"".join(body)}</tbody></table>{footer}</body></html>\n')


def index_html(built: list[Source], out: Path) -> str:
    """The front page: the papers, then the shared modules, each with its note and paper."""
    items = {True: [], False: []}
    for source in built:
        text = (ROOT / source.path).read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        title = html.escape(doc.split("\n")[0])
        extra = ""
        if source.paper:
            entry = PAPERS[source.paper]
            note = relative(ROOT / source.note, out)
            extra = (f' · <a href="{pdf_url(source.paper, None)}">arXiv {entry["arxiv"]}'
                     f'v{entry["version"]}</a> · note <a href="{note}">{source.note}</a>')
        items[source.paper is not None].append(
            f'<li><a href="{source.page}"><code>{source.path}</code></a>: {title}{extra}</li>')
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>The reader's edition</title><style>{CSS}</style></head><body>"
            f'<main class="index"><h1>The reader\'s edition</h1>'
            f"<p>Each file as a page: docstrings and comments on the left, exactly as written; the "
            f"code they introduce on the right. Citation tags open the paper's PDF at the cited "
            f"page. Generated from the source by <code>python edition.py</code>.</p>"
            f'<h2>The papers</h2><ul>{"".join(items[True])}</ul>'
            f'<h2>The shared building blocks they import</h2><ul>{"".join(items[False])}</ul>'
            f"</main></body></html>\n")


def build(out: Path) -> list[Path]:
    """Write every page and the index into `out`; return the paths written."""
    out = Path(out).resolve()
    built, written = sources(), []
    tests = tests_by_name()
    for source in built:
        page = out / source.page
        page.parent.mkdir(parents=True, exist_ok=True)
        shared_pages = {f"shared.{Path(s.path).stem}": relative(out / s.page, page.parent)
                        for s in built if s.paper is None}
        page.write_text(page_html(source, out, shared_pages, tests))
        written.append(page)
    (out / "index.html").write_text(index_html(built, out))
    written.append(out / "index.html")
    problems = sorted({p for s in built for p in citation_problems(
        (ROOT / s.path).read_text(), s.paper)})
    for problem in problems:
        print(f"warning: PAPERS has no page entry for [{problem}]", file=sys.stderr)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "edition",
                        help="the folder to write the pages into (default: edition/)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    written = build(args.out)
    print(f"wrote {len(written)} pages to {args.out} in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
